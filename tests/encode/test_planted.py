"""Planted feature stores: ordinary stores whose tokens are known functions of the class-name embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.synthetic import make_class_scenes, split_lists
from pipeline.encode.planted import PlantedConfig, patch_labels, planted_table, write_planted
from pipeline.errors import UserError
from pipeline.store.layout import open_or_create_store, open_store, store_attrs, store_identity, write_text
from pipeline.store.reader import open_split

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["cat", "dog", "bus", "car", "bowl", "cup"]


def _text_store(path: Path, *, dim: int = 24, seed: int = 3) -> np.ndarray:
    """A text store holding made-up embeddings (only the rows matter to the generator)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((len(NAMES), dim)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    root = open_or_create_store(path, identity=store_identity(
        encoder="test-text", weights={"pretrained": False, "source": "random-init"}, input_size=0, grid=None,
        vision_dim=None, text_dim=dim, mean=(0, 0, 0), std=(1, 1, 1)))
    write_text(root, names=NAMES, embeddings=table, meta={"encoder": "test-text", "class_words": "natural"})
    return table


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("planted")
    root = make_class_scenes(out=work / "data", class_names=NAMES, count=8, size=(48, 64))
    train, val = split_lists(root=root, out=work)
    text = _text_store(work / "text")
    return {"work": work, "root": root, "train": train, "val": val, "text": text}


def _config(scenes: dict, out: Path, **kw) -> PlantedConfig:
    defaults = dict(out=str(out), text_store=str(scenes["work"] / "text"), data_root=str(scenes["root"]),
                    split="val", dataset_options={"list_file": str(scenes["val"])}, input_size=32, patch=8, dim=40)
    return PlantedConfig(**{**defaults, **kw})


def test_each_patch_gets_the_majority_label_of_its_pixels() -> None:
    mask = np.zeros((1, 4, 8), np.uint8)
    mask[0, :, :4] = 2  # left patch: all class 2
    mask[0, :3, 4:] = 255  # right patch: 12 of 16 pixels ignored
    mask[0, 3, 4:] = 1
    labels = patch_labels(mask, patch=4, num_classes=3)
    assert labels.tolist() == [[2, 4]]  # ignore is row K + 1
    tie = np.zeros((1, 2, 2), np.uint8)
    tie[0, 0] = 1
    assert patch_labels(tie, patch=2, num_classes=1).tolist() == [[0]]  # a tie goes to the lower label


def test_noise_free_tokens_are_the_mapped_embedding_of_the_class_under_each_patch(scenes, tmp_path) -> None:
    out = tmp_path / "planted"
    report = write_planted(config=_config(scenes, out, noise=0.0), quiet=True)
    split = open_split(store=out, split="folder/val")
    assert split.grid == (4, 4) and split.kind == "windows" and not split.pretrained
    feats, masks = split.features(slice(None)).astype(np.float32), split.masks(slice(None))
    table = planted_table(text=scenes["text"], dim=40, map_seed=0)
    expected = table[patch_labels(masks, patch=8, num_classes=len(NAMES))]
    np.testing.assert_allclose(feats, expected, atol=2e-3)  # float16 storage
    # The map keeps the geometry of the names: cosines of tokens follow cosines of embeddings.
    text = scenes["text"]
    mapped = table[1:-1] / np.linalg.norm(table[1:-1], axis=1, keepdims=True)
    assert np.corrcoef((mapped @ mapped.T)[np.triu_indices(6, 1)], (text @ text.T)[np.triu_indices(6, 1)])[0, 1] > 0.6
    planted = store_attrs(open_store(out))["weights"]["planted"]
    assert planted["noise"] == 0.0 and planted["text_encoder"] == "test-text" and report["views"] == split.num_views


def test_noise_has_the_asked_norm_and_the_store_keeps_its_planting(scenes, tmp_path) -> None:
    out = tmp_path / "planted"
    write_planted(config=_config(scenes, out, noise=0.5, dim=400), quiet=True)
    split = open_split(store=out, split="folder/val")
    feats = split.features(slice(None)).astype(np.float32)
    table = planted_table(text=scenes["text"], dim=400, map_seed=0)
    clean = table[patch_labels(split.masks(slice(None)), patch=8, num_classes=len(NAMES))]
    assert np.linalg.norm(feats - clean, axis=-1).mean() == pytest.approx(0.5, rel=0.05)
    again = write_planted(config=_config(scenes, out, noise=0.5, dim=400), quiet=True)
    assert again["shards_run"] == 0  # resumable like extract: nothing left to do
    with pytest.raises(UserError, match="weights"):  # another noise never lands in the same store
        write_planted(config=_config(scenes, out, noise=1.0, dim=400, split="train",
                                     dataset_options={"list_file": str(scenes["train"])}), quiet=True)


def test_training_views_follow_the_extraction_plan(scenes, tmp_path) -> None:
    out = tmp_path / "planted"
    write_planted(config=_config(scenes, out, split="train", views=2,
                                 dataset_options={"list_file": str(scenes["train"])}), quiet=True)
    split = open_split(store=out, split="folder/train")
    assert split.kind == "views" and split.num_views == 2 * len(split.image_ids)
    assert split.source_classes is not None and split.view_classes.any()
