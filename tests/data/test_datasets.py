"""Readers on the shared real data (when present) and on tiny data generated in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import (
    COCO_OFFICIAL,
    make_coco,
    make_folder,
    make_fss,
    make_voc,
    save_mask,
    save_rgb,
)

from pipeline.data.labels import COCO_CLASSES, VOC_CLASSES, coco_class_name, prompt_name
from pipeline.data.readers import BadRecordError
from pipeline.data.registry import create_dataset, list_datasets
from pipeline.errors import UserError


def test_shipped_class_lists_match_split_files(splits_dir: Path) -> None:
    assert list(VOC_CLASSES) == (splits_dir / "pascal" / "classes.txt").read_text().split()
    assert list(COCO_CLASSES) == (splits_dir / "coco" / "classes.txt").read_text().split()


def test_official_coco_names_map_onto_the_split_names() -> None:
    assert [coco_class_name(n) for n in COCO_OFFICIAL] == list(COCO_CLASSES)


def test_prompt_names_are_natural_words() -> None:
    assert prompt_name("diningtable") == "dining table"
    assert prompt_name("tvmonitor") == "tv monitor"
    assert prompt_name("pottedplant") == "potted plant"
    assert prompt_name("motorbike") == "motorbike"
    assert prompt_name("hotel_slipper") == "hotel slipper"
    assert {prompt_name(n).replace(" ", "") for n in COCO_CLASSES} == set(COCO_CLASSES)


def test_voc_sample_masks_keep_palette_indices_and_ignore_border(voc_sample: Path) -> None:
    ds = create_dataset("voc", root=voc_sample)
    assert ds.ids == ["2011_000003", "2011_000006", "2011_000025"] and ds.lists == []
    assert [ds.classes_present(i) for i in range(3)] == [[5, 15], [9, 15, 18], [6, 7]]
    record = ds.load(0)
    assert record.image.shape == (338, 500, 3) and record.image.dtype == np.uint8
    assert record.mask.shape == (338, 500) and (record.mask == 255).sum() == 16224
    assert ds.image_size(1) == (375, 500)
    assert ds.describe()["class_names"][14] == "person"


def test_coco128_folder_reader(coco128: Path) -> None:
    ds = create_dataset("folder", root=coco128)
    assert len(ds) == 128 and ds.class_names == list(COCO_CLASSES)
    record = ds.load(0)
    assert record.mask.shape == record.image.shape[:2] and record.mask.max() <= 80


def test_voc_split_lists_and_list_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    assert create_dataset("voc", root=root, split="val").ids == ["2008_000001", "2008_000003"]
    assert len(create_dataset("voc", root=root, split="train")) == 3  # no train list: every masked image
    (tmp_path / "one.txt").write_text("2008_000002\n")
    ds = create_dataset("voc", root=root, list_file=tmp_path / "one.txt")
    assert ds.ids == ["2008_000002"] and ds.classes_present(0) == [15]
    assert ds.describe()["lists"] == [str(tmp_path / "one.txt")]
    with pytest.raises(UserError, match="split"):
        create_dataset("voc", root=root, split="test")


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    ds = create_dataset("voc", root=root)
    save_mask(root / "SegmentationClassAug" / "2008_000001.png", np.zeros((5, 5), np.uint8), mode="P")
    with pytest.raises(BadRecordError, match=r"2008_000001\.png: mask size 5x5 differs"):
        ds.load(0)
    save_mask(root / "SegmentationClassAug" / "2008_000002.png", np.full((12, 16), 21, np.uint8), mode="P")
    with pytest.raises(BadRecordError, match=r"2008_000002\.png: class value 21 outside 1\.\.20"):
        ds.load(1)
    (root / "JPEGImages" / "2008_000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadRecordError, match=r"2008_000003\.jpg: unreadable image"):
        ds.load(2)
    with pytest.raises(BadRecordError, match=r"2008_000003\.jpg"):
        ds.image_size(2)


@pytest.mark.reliability
def test_truncated_jpeg_is_a_bad_record(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    save_rgb(root / "JPEGImages" / "2008_000001.jpg", 120, 160)
    path = root / "JPEGImages" / "2008_000001.jpg"
    path.write_bytes(path.read_bytes()[:400])
    save_mask(root / "SegmentationClassAug" / "2008_000001.png", np.zeros((120, 160), np.uint8), mode="P")
    with pytest.raises(BadRecordError, match="unreadable image"):
        create_dataset("voc", root=root).load(0)


def test_skip_bad_records_and_moves_on(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    (root / "SegmentationClassAug" / "2008_000002.png").write_bytes(b"garbage")
    strict, lenient = create_dataset("voc", root=root), create_dataset("voc", root=root, skip_bad=True)
    for ds in (strict, lenient):
        with pytest.raises(BadRecordError) as caught:
            ds.load(1)
    with pytest.raises(BadRecordError):
        strict.record_bad(1, caught.value)
    lenient.record_bad(1, caught.value)
    assert lenient.skipped == [("2008_000002", str(caught.value))]
    assert lenient.describe()["skipped"] == 1


def test_missing_root_and_folders_fail_at_creation(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset root not found"):
        create_dataset("voc", root=tmp_path / "nowhere")
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError, match="SegmentationClassAug"):
        create_dataset("voc", root=tmp_path / "voc")
    with pytest.raises(UserError, match="images/"):
        create_dataset("folder", root=tmp_path)
    with pytest.raises(UserError, match="val2014"):
        create_dataset("coco", root=tmp_path, split="val")


def test_unknown_reader_and_option(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="known: coco, folder, fss, mosaic4, voc"):
        create_dataset("ade20k", root=tmp_path)
    with pytest.raises(UserError, match="no option 'mask_dir'"):
        create_dataset("voc", root=tmp_path, mask_dir=tmp_path)
    assert list_datasets() == ["coco", "folder", "fss", "mosaic4", "voc"]


def test_folder_reader_and_list_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    ds = create_dataset("folder", root=root)
    assert ds.ids == ["im0", "im1", "im2"] and ds.class_names == ["cat", "dog", "kite"]
    assert [ds.classes_present(i) for i in range(3)] == [[1], [2], [3]]
    (tmp_path / "list.txt").write_text("im2\nim9\n")
    listed = create_dataset("folder", root=root, list_file=tmp_path / "list.txt")
    assert listed.load(0).image_id == "im2"
    with pytest.raises(BadRecordError, match=r"im9\.jpg: image file is missing"):
        listed.load(1)


def test_folder_rejects_colour_masks(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    Image.new("RGB", (10, 10)).save(root / "masks" / "im0.png")
    with pytest.raises(BadRecordError, match="single-channel"):
        create_dataset("folder", root=root).load(0)


def test_coco_rendering_larger_first_and_crowd_ignore(tmp_path: Path) -> None:
    ds = create_dataset("coco", root=make_coco(tmp_path / "coco"), split="val", crowd="ignore")
    assert ds.ids == ["COCO_val2014_000000000003", "COCO_val2014_000000000007"]
    table, tv, airplane = (COCO_CLASSES.index(n) + 1 for n in ("diningtable", "tvmonitor", "aeroplane"))
    small_on_large = ds.load(1).mask
    assert small_on_large[6, 6] == tv and small_on_large[15, 20] == table  # the small tv stays visible
    crowd = ds.load(0).mask
    assert crowd[2, 5] == airplane and crowd[10, 25] == 255 and crowd[10, 12] == 0 and crowd[13, 3] == tv
    assert ds.classes_present(0) == [airplane, tv]
    assert ds.describe()["lists"][0].endswith("instances_val2014.json")


def test_coco_size_mismatch_and_unknown_category(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    save_rgb(root / "val2014" / "COCO_val2014_000000000003.jpg", 8, 8)
    with pytest.raises(BadRecordError, match=r"instances_val2014\.json: mask size 30x20 differs"):
        create_dataset("coco", root=root, split="val").load(0)
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 99, "name": "unicorn"})
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="unknown COCO category 'unicorn'"):
        create_dataset("coco", root=root, split="val")


def test_coco_prerendered_masks(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    mask = np.zeros((20, 30), np.uint8)
    mask[:5] = 80
    save_mask(tmp_path / "masks" / "COCO_val2014_000000000007.png", mask)
    ds = create_dataset("coco", root=root, split="val", mask_dir=tmp_path / "masks")
    assert ds.ids == ["COCO_val2014_000000000007"] and ds.classes_present(0) == [80]


def test_fss_classes_file_order_and_binary_masks(tmp_path: Path) -> None:
    root = make_fss(tmp_path / "fss")
    (tmp_path / "test.txt").write_text("owl\ncat\n")
    ds = create_dataset("fss", root=root, classes_file=tmp_path / "test.txt")
    assert ds.class_names == ["owl", "cat"] and ds.ids[:3] == ["owl/1", "owl/2", "owl/3"]
    assert [ds.image_class(i) for i in range(len(ds))] == [1, 1, 1, 2, 2, 2]
    rgb, grey = ds.load(3), ds.load(4)  # cat/1 has an RGB mask, cat/2 a grey one
    assert set(np.unique(rgb.mask)) == {0, 2} and set(np.unique(grey.mask)) == {0, 2}
    assert len(create_dataset("fss", root=root)) == 15


def test_fss_split_from_splits_dir_and_missing_class(tmp_path: Path) -> None:
    root = make_fss(tmp_path / "fss")
    (tmp_path / "splits" / "fss").mkdir(parents=True)
    (tmp_path / "splits" / "fss" / "val.txt").write_text("yak\n")
    assert create_dataset("fss", root=root, split="val", splits_dir=tmp_path / "splits").class_names == ["yak"]
    (tmp_path / "splits" / "fss" / "test.txt").write_text("yak\nzebra\n")
    with pytest.raises(UserError, match="zebra"):
        create_dataset("fss", root=root, split="test", splits_dir=tmp_path / "splits")


def test_fss_too_many_classes_for_uint8(tmp_path: Path) -> None:
    for n in range(255):
        (tmp_path / f"class{n:03d}").mkdir()
    with pytest.raises(UserError, match="do not fit a uint8 mask"):
        create_dataset("fss", root=tmp_path)
