"""The feature store: round trip, attributes, plain-zarr readability, damaged shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from synthetic_data import (
    TINY_CLASSES,
    TINY_SIZES,
    assert_same_store,
    write_folder_dataset,
)
from synthetic_data import TINY_SHARD as SHARD
from synthetic_data import TINY_VIEWS as VIEWS
from synthetic_data import tiny_extract_config as tiny_config

from pipeline.data.registry import create_dataset
from pipeline.data.augment import augment_view, resolve_augment, view_numbers
from pipeline.data.views import ViewParams
from pipeline.encode.shards import planned_view
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.encode.prompts import TEMPLATES
from pipeline.encode.shards import classes_in
from pipeline.store.layout import FORMAT_VERSION, open_store, read_text, store_attrs
from pipeline.store.splits import done_shards


pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, ExtractConfig]:
    """(data root, store, config): one extraction with text, shared by the read-only tests."""
    base = tmp_path_factory.mktemp("store")
    data = write_folder_dataset(base / "data")
    config = tiny_config(data, base / "store")
    extract(config=config, quiet=True)
    return data, base / "store", config


def test_arrays_shapes_and_sharding(tiny):
    _, path, _ = tiny
    group = open_store(path)["folder/train"]
    n = len(TINY_SIZES) * VIEWS
    features = group["features"]
    assert features.shape == (n, 4, 32) and features.dtype == np.float16
    assert features.chunks == (1, 4, 32) and features.shards == (SHARD, 4, 32)
    assert group["masks"].shape == (n, 32, 32) and group["masks"].dtype == np.uint8
    assert group["shard_done"].shape == (-(-n // SHARD),)
    assert done_shards(group).all()
    assert group["view_valid"][...].all()
    assert np.array_equal(group["view_image"][...], np.repeat(np.arange(len(TINY_SIZES)), VIEWS))
    assert np.isfinite(features[...].astype(np.float32)).all()
    assert np.abs(features[...].astype(np.float32)).max() > 0  # written, not the fill value


def test_masks_and_plan_match_views_rendered_again(tiny):
    data, path, config = tiny
    group = open_store(path)["folder/train"]
    dataset = create_dataset("folder", root=data, split="train")
    masks, classes = group["masks"][...], group["view_classes"][...]
    augment = resolve_augment(config.augment, class_names=dataset.class_names)
    assert group.attrs["meta"]["augment"] == augment.to_dict()  # the augmentation is part of the split's identity
    for v, index in enumerate(group["view_image"][...]):
        record = dataset.load(int(index))
        _, mask = augment_view(image=record.image, mask=record.mask, config=augment, size=32, seed=config.seed,
                               image_index=int(index), view_index=v % VIEWS)
        assert np.array_equal(masks[v], mask), v
    assert np.array_equal(classes, classes_in(masks, len(TINY_CLASSES)))
    assert classes.any(axis=0).all()  # every class shows up somewhere, so the comparison means something


def test_store_describes_itself(tiny):
    _, path, _ = tiny
    root = open_store(path)
    attrs = store_attrs(root)
    assert attrs["format_version"] == FORMAT_VERSION
    assert attrs["encoder"] == "test-vit"
    assert attrs["weights"] == {"pretrained": False, "source": "random-init", "sha256": None}
    assert attrs["pretrained"] is False
    assert attrs["input_size"] == 32 and attrs["grid"] == [2, 2]
    assert attrs["vision_dim"] == 32 and attrs["text_dim"] == 32
    assert np.allclose(attrs["mean"], [0.48145466, 0.4578275, 0.40821073])
    assert np.allclose(attrs["std"], [0.26862954, 0.26130258, 0.27577711])
    assert {"torch", "zarr", "numpy", "open_clip_torch"} <= set(attrs["versions"])
    assert attrs["created"].startswith("20")
    text = root["text"]
    assert text.attrs["templates"] == list(TEMPLATES) and text.attrs["encoder"] == "test-vit"
    names, emb = read_text(root)
    assert names == list(TINY_CLASSES) and emb.shape == (3, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    split = root["folder/train"].attrs
    assert split["kind"] == "views" and split["num_views"] == len(TINY_SIZES) * VIEWS
    assert split["class_names"] == list(TINY_CLASSES) and split["shard_size"] == SHARD
    assert split["meta"]["seed"] == 0 and split["meta"]["views"] == VIEWS
    assert split["image_ids"] == [f"img{n:03d}" for n in range(len(TINY_SIZES))]


_PLAIN_READER = """
import json, sys
import dask.array as da
import numpy as np
import zarr
root = zarr.open_group(sys.argv[1], mode="r")
group = root["folder/train"]
shard = group.attrs["shard_size"]
lazy = da.from_zarr(sys.argv[1], component="folder/train/features", chunks=(shard, -1, -1))
print(json.dumps({
    "encoder": root.attrs["fusioner"]["encoder"],
    "shape": list(group["features"].shape),
    "sum_zarr": float(group["features"][...].astype(np.float64).sum()),
    "sum_dask": float(lazy.astype(np.float64).sum().compute()),
    "mask_sum": int(group["masks"][...].astype(np.int64).sum()),
    "names": root["text"].attrs["names"],
    "pipeline_imported": any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules),
}))
"""


def test_readable_with_plain_zarr_and_dask_without_this_package(tiny, tmp_path):
    _, path, _ = tiny
    result = subprocess.run([sys.executable, "-c", _PLAIN_READER, str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    group = open_store(path)["folder/train"]
    features = group["features"][...].astype(np.float64)
    assert seen["pipeline_imported"] is False
    assert seen["encoder"] == "test-vit" and seen["shape"] == list(features.shape)
    assert seen["sum_zarr"] == pytest.approx(features.sum(), rel=1e-9)
    assert seen["sum_dask"] == pytest.approx(features.sum(), rel=1e-9)
    assert seen["mask_sum"] == int(group["masks"][...].astype(np.int64).sum())
    assert seen["names"] == list(TINY_CLASSES)


def test_consolidated_metadata_opens_without_warnings_and_names_its_coordinates(tiny):
    """Plain zarr and dask read each split's consolidated metadata; names and ids are coordinate arrays."""
    import dask.array as da

    _, path, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing or broken consolidation warns (xarray) or raises (zarr)
        split = zarr.open_consolidated(str(path / "folder" / "train"), mode="r")
        whole = zarr.open_consolidated(str(path), mode="r")
        assert split.metadata.consolidated_metadata is not None
        names = list(split["class_name"][...])
        assert names == list(TINY_CLASSES) and split["class_name"].metadata.dimension_names == ("class_name",)
        assert list(split["image_id"][...]) == [f"img{n:03d}" for n in range(len(TINY_SIZES))]
        assert split["view_classes"].metadata.dimension_names == ("view", "class_name")
        assert split["image_hw"].metadata.dimension_names == ("image_id", "hw")
        assert whole["folder/train"].attrs["num_views"] == split.attrs["num_views"]
        assert whole["text"].attrs["names"] == list(TINY_CLASSES)
        column = da.from_zarr(str(path / "folder" / "train"), component="view_classes")[:, names.index("dog")]
        assert np.array_equal(column.compute(), open_store(path)["folder/train/view_classes"][:, 1])


def test_xarray_opens_a_split_and_selects_by_class_name(tiny):
    xr = pytest.importorskip("xarray")  # not a dependency: checked where it is installed
    _, path, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ds in (xr.open_zarr(str(path / "folder" / "train")), xr.open_zarr(str(path), group="folder/train")):
            dog = ds.sel(class_name="dog").view_classes.values
            assert np.array_equal(dog, open_store(path)["folder/train/view_classes"][:, 1])
            hw = open_store(path)["folder/train/image_hw"][1].tolist()
            assert ds.sel(image_id="img001").image_hw.values.tolist() == hw
            assert ds.features.dims == ("view", "token", "channel")


def test_the_read_benchmark_times_the_loaders_path_and_the_old_one_on_the_same_views(tiny):
    from pipeline.bench.extract import DEFAULT_DATA, time_reads

    _, path, _ = tiny
    reads = time_reads(store=str(path), batch_size=4, batches=2, seed=0)
    assert [r.mode for r in reads] == ["memory", "zarr", "zarr, one selection per batch"]
    assert len({r.bytes for r in reads}) == 1 and reads[0].bytes > 0
    assert DEFAULT_DATA.parents[1] == Path(__file__).resolve().parents[2].parent / "shared"  # ../shared


def _shard_file(store: Path, array: str, shard: int) -> Path:
    return store / "folder" / "train" / array / "c" / str(shard) / "0" / "0"


@pytest.mark.reliability
def test_damaged_unfinished_shards_are_written_again(tiny, tmp_path):
    data, path, config = tiny
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    last = -(-len(TINY_SIZES) * VIEWS // SHARD) - 1
    for shard in (1, last):  # a full shard and the short last one
        feats = _shard_file(copy, "features", shard)
        feats.write_bytes(feats.read_bytes()[: feats.stat().st_size // 2])  # killed mid-write
        _shard_file(copy, "masks", shard).write_bytes(b"\x00" * 17)
        zarr.open_group(str(copy), mode="r+")["folder/train/shard_done"][shard] = 0
    report = extract(config=tiny_config(data, copy), quiet=True)
    assert report.shards_run == 2 and report.shards_skipped == last - 1
    assert_same_store(path, copy)


@pytest.mark.reliability
def test_damaged_chunk_of_a_done_shard_fails_loudly(tiny, tmp_path):
    _, path, _ = tiny
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    for array in ("features", "masks"):
        target = _shard_file(copy, array, 2)
        raw = bytearray(target.read_bytes())
        raw[5] ^= 0xFF  # inside the first chunk of the shard; the index sits at the end
        target.write_bytes(bytes(raw))
    group = open_store(copy)["folder/train"]
    assert done_shards(group).all()
    for array in ("features", "masks"):
        with pytest.raises(ValueError, match="checksum"):
            group[array][2 * SHARD]
        assert np.array_equal(group[array][0], zarr.open_group(str(path))["folder/train"][array][0])


@pytest.mark.reliability
def test_split_left_half_created_by_a_kill_is_planned_again(tiny, tmp_path):
    data, path, _ = tiny
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    group = zarr.open_group(str(copy), mode="r+")["folder/train"]
    group.attrs.put({})  # the attributes (with the plan signature) are written last
    group["shard_done"][...] = 0
    report = extract(config=tiny_config(data, copy), quiet=True)
    assert report.shards_run == group["shard_done"].shape[0]
    assert_same_store(path, copy)


def test_real_photos_round_trip(coco128, voc_sample, tmp_path):
    """Real JPEGs and palette PNGs: stored masks equal views rendered again, VOC's 255 border kept."""
    ids = sorted(p.stem for p in (coco128 / "images").glob("*.jpg"))[:4]
    (tmp_path / "list.txt").write_text("\n".join(ids) + "\n")
    coco = ExtractConfig(backbone="test-timm", out=str(tmp_path / "coco"), dataset="folder", data_root=str(coco128),
                         dataset_options={"list_file": str(tmp_path / "list.txt")}, views=2, input_size=32,
                         random_init=True, device="cpu")
    voc = ExtractConfig(backbone="test-timm", out=str(tmp_path / "voc"), dataset="voc", data_root=str(voc_sample),
                        split="val", eval_resize=True, input_size=32, random_init=True, device="cpu")
    for config, split, readers in ((coco, "folder/train", ("folder", coco128)), (voc, "voc/val", ("voc", voc_sample))):
        extract(config=config, quiet=True)
        group = open_store(config.out)[split]
        dataset = create_dataset(readers[0], root=readers[1], split=config.split, **config.dataset_options)
        assert group.attrs["image_ids"] == dataset.ids
        numbers = view_numbers(group["view_image"][...])
        for v, index in enumerate(group["view_image"][...]):
            params = ViewParams(box=tuple(int(x) for x in group["view_box"][v]), flip=bool(group["view_flip"][v]),
                                jitter=tuple(float(x) for x in group["view_jitter"][v]))
            record = dataset.load(int(index))
            _, mask = planned_view(record, meta=group.attrs["meta"], kind=group.attrs["kind"], image_index=int(index),
                                   view_number=int(numbers[v]), params=params, size=32)
            assert np.array_equal(group["masks"][v], mask)
        assert group["view_classes"][...].any()
    voc_group = open_store(voc.out)["voc/val"]
    assert group is not None and (voc_group["masks"][...] == 255).any()
    assert np.array_equal(voc_group["view_box"][:, :2], np.zeros((3, 2)))  # whole images, resized


def test_a_bare_split_name_is_accepted_when_unambiguous():
    from pipeline.store.splits import match_split

    names = ["coco/train", "folder/val", "voc/val"]
    assert match_split(names, "train") == "coco/train"
    assert match_split(names, "folder/val") == "folder/val"
    assert match_split(names, "val") is None  # two stores' val: ambiguous
    assert match_split(names, "test") is None and match_split(names, "voc/train") is None


def test_opening_a_split_checks_the_store_once_and_still_refuses_damage(tiny, tmp_path, monkeypatch):
    """``list_splits`` reads every array's metadata: ``open_split`` made that check three times (docs/benchmarks.md,
    "Opening a split"), now once, and a damaged array is still one line."""
    import pipeline.store.reader
    import pipeline.store.splits
    from pipeline.errors import UserError
    from pipeline.store.reader import open_split

    calls = []
    checked = pipeline.store.splits.list_splits

    def counted(root):
        calls.append(root.path)
        return checked(root)

    monkeypatch.setattr(pipeline.store.splits, "list_splits", counted)
    monkeypatch.setattr(pipeline.store.reader, "list_splits", counted)
    _, path, _ = tiny
    assert open_split(store=path, split="train").split == "folder/train"  # a bare name, resolved
    assert len(calls) == 1
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    (copy / "folder" / "train" / "view_box" / "zarr.json").write_text("{not json")
    with pytest.raises(UserError, match="zarr.json"):
        open_split(store=copy, split="train")
