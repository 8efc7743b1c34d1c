"""Issue 10: extraction follows the released recipe (normalisation, raw class names, padded windows)
and records each choice in the store, refusing to mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import tiny_extract_config, write_folder_dataset

from pipeline.data.labels import VOC_CLASSES
from pipeline.data.views import window_boxes
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.encode.registry import DATASET_STATS, get_spec
from pipeline.errors import UserError
from pipeline.store.layout import open_or_create_store, open_store, read_text, store_identity

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


def _voc_root(root: Path, images: int = 2) -> Path:
    """A VOC layout (JPEGImages + SegmentationClassAug) with no split lists."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)
    for n in range(images):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{n}.jpg")
        mask = np.zeros((40, 48), np.uint8)
        mask[5:20, 5:30] = 11  # diningtable
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"im{n}.png")
    return root


def _voc_extract(tmp_path: Path, out: str, **changes) -> Path:
    config = ExtractConfig(backbone="test-vit", out=str(tmp_path / out), dataset="voc",
                           data_root=str(tmp_path / "voc"), input_size=32, random_init=True, device="cpu",
                           views=1, **changes)
    extract(config=config, quiet=True)
    return tmp_path / out


@pytest.fixture
def voc(tmp_path):
    return _voc_root(tmp_path / "voc")


def test_voc_views_are_normalised_with_the_released_pascal_statistics(tmp_path, voc):
    auto = _voc_extract(tmp_path, "auto", vision_only=True)
    clip = _voc_extract(tmp_path, "clip", vision_only=True, normalize="encoder")
    recorded = open_store(auto)["voc/train"].attrs["meta"]["normalize"]
    assert recorded == {"name": "pascal", "mean": list(DATASET_STATS["pascal"][0]),
                        "std": list(DATASET_STATS["pascal"][1])}
    assert recorded["mean"] == [0.4554, 0.4298, 0.3955] and recorded["std"] == [0.1181, 0.1189, 0.1338]
    assert open_store(clip)["voc/train"].attrs["meta"]["normalize"]["mean"] == list(get_spec("test-vit").mean)
    a = np.asarray(open_store(auto)["voc/train/features"][:], np.float32)
    b = np.asarray(open_store(clip)["voc/train/features"][:], np.float32)
    assert not np.allclose(a, b, atol=1e-2)


def test_folder_data_keeps_the_encoders_normalisation(tmp_path):
    data = write_folder_dataset(tmp_path / "data", sizes=((40, 40),))
    extract(config=tiny_extract_config(data, tmp_path / "s", vision_only=True, views=1), quiet=True)
    assert open_store(tmp_path / "s")["folder/train"].attrs["meta"]["normalize"]["name"] == "encoder"


def test_paper_readers_embed_the_raw_class_names_and_natural_words_are_an_option(tmp_path):
    raw = ExtractConfig(backbone="test-text", out=str(tmp_path / "raw"), dataset="voc", text_only=True, device="cpu",
                        random_init=True)
    extract(config=raw, quiet=True)
    group = open_store(tmp_path / "raw")["text"]
    assert group.attrs["class_words"] == "raw"
    assert group.attrs["prompt_names"]["diningtable"] == "diningtable"
    natural = ExtractConfig(backbone="test-text", out=str(tmp_path / "nat"), dataset="voc", text_only=True,
                            device="cpu", class_words="natural", random_init=True)
    extract(config=natural, quiet=True)
    assert open_store(tmp_path / "nat")["text"].attrs["prompt_names"]["diningtable"] == "dining table"
    names, emb_raw = read_text(open_store(tmp_path / "raw"))
    _, emb_nat = read_text(open_store(tmp_path / "nat"))
    row = names.index("diningtable")
    assert not np.allclose(emb_raw[row], emb_nat[row])
    assert names == list(VOC_CLASSES)


def test_a_text_store_refuses_the_other_class_words(tmp_path):
    extract(config=ExtractConfig(backbone="test-text", out=str(tmp_path / "t"), dataset="voc", text_only=True,
                                 device="cpu", random_init=True), quiet=True)
    again = ExtractConfig(backbone="test-text", out=str(tmp_path / "t"), dataset="voc", text_only=True, device="cpu",
                          class_words="natural", extra_names=["zebra"], random_init=True)
    with pytest.raises(UserError, match="raw names"):
        extract(config=again, quiet=True)


def test_the_last_partial_window_is_padded_as_released():
    boxes = window_boxes(height=300, width=100, size=64, stride=42)
    xs, ys = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert xs == [0, 42]  # 42 + 64 = 106 > 100: padded, not slid back to 36
    assert ys == [0, 42, 84, 126, 168, 210, 252]  # every step is the stride; 252 + 64 = 316 > 300
    assert window_boxes(height=300, width=100, size=64, stride=42, last="slide")[-1] == (36, 236, 100, 300)


def test_the_activation_is_part_of_the_store_identity(tmp_path):
    common = dict(encoder="clip-l", weights={"pretrained": True, "source": "x"}, input_size=224, grid=(16, 16),
                  vision_dim=768, text_dim=768, mean=(0, 0, 0), std=(1, 1, 1))
    open_or_create_store(tmp_path / "s", identity=store_identity(activation="gelu", **common))
    with pytest.raises(UserError, match="activation"):
        open_or_create_store(tmp_path / "s", identity=store_identity(activation="quick_gelu", **common))


@pytest.mark.fullsize
def test_extraction_records_quick_gelu_for_openai_clip(tmp_path):
    data = write_folder_dataset(tmp_path / "data", sizes=((40, 40),))
    extract(config=tiny_extract_config(data, tmp_path / "s", backbone="clip-b", vision_only=True, views=1), quiet=True)
    assert open_store(tmp_path / "s").attrs["fusioner"]["activation"] == "quick_gelu"


def _coco_episode_lists(root: Path, images_by_key: dict[str, list[str]]) -> Path:
    folder = root / "coco" / "val"
    folder.mkdir(parents=True)
    (folder / "fold0.json").write_text(json.dumps(images_by_key))
    return root


def test_episodes_restrict_a_coco_extraction_to_the_scored_images(tmp_path):
    from synthetic_data import make_coco

    from pipeline.encode.plan import open_extraction_dataset

    coco = make_coco(tmp_path / "coco")
    lists = _coco_episode_lists(tmp_path / "splits", {"0": ["val2014/COCO_val2014_000000000007.jpg"]})
    config = ExtractConfig(backbone="test-vit", out=str(tmp_path / "s"), dataset="coco", data_root=str(coco),
                           split="val", episodes=str(lists), episode_folds=[0])
    dataset = open_extraction_dataset(config)
    assert dataset.ids == ["COCO_val2014_000000000007"]
    assert any("coco20i folds [0]" in entry for entry in dataset.describe()["lists"])
    missing = _coco_episode_lists(tmp_path / "other", {"4": ["val2014/COCO_val2014_000000999999.jpg"]})
    with pytest.raises(UserError, match="1 image\\(s\\) of the coco20i episodes .* \\(first: COCO_val2014_000000999999"):
        open_extraction_dataset(ExtractConfig(**{**vars(config), "episodes": str(missing)}))


def test_episodes_need_a_reader_with_standard_lists(tmp_path):
    from pipeline.encode.plan import open_extraction_dataset

    data = write_folder_dataset(tmp_path / "data", sizes=((40, 40),))
    with pytest.raises(UserError, match="`episodes` knows the episode lists of"):
        open_extraction_dataset(tiny_extract_config(data, tmp_path / "s", episodes=str(tmp_path)))
