"""An epoch is one pass over the (image, class) pairs whatever the number of cached views K per image."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.labels import VOC_CLASSES
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.training.config import build_config
from pipeline.training.loop import prepare_data, train

pytestmark = pytest.mark.usefixtures("one_thread")

QUADRANTS = (6, 7, 8, 9)  # bus, car, cat, chair: seen in PASCAL-5i fold 0
IMAGES = 5


def _quadrant_data(root: Path) -> Path:
    """Square images split into four class quadrants: every augmented view keeps the centre, so all four."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for n in range(IMAGES):
        side = 48 + 8 * n
        half = side // 2
        mask = np.zeros((side, side), np.uint8)
        mask[:half, :half], mask[:half, half:], mask[half:, :half], mask[half:, half:] = QUADRANTS
        image = rng.integers(0, 255, (side, side, 3)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"q{n}.png")
        Image.fromarray(mask).save(root / "masks" / f"q{n}.png")
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("epochs")
    data = _quadrant_data(base / "data")
    made = {}
    for views in (1, 4):
        made[views] = base / f"k{views}"
        extract(config=ExtractConfig(backbone="test-vit", out=str(made[views]), dataset="folder", data_root=str(data),
                                     views=views, input_size=32, random_init=True, device="cpu"), quiet=True)
    extract(config=ExtractConfig(backbone="test-text", out=str(base / "text"), text_only=True, dataset="folder",
                                 data_root=str(data), device="cpu", random_init=True), quiet=True)
    made[0] = base / "text"
    return made


def _config(stores, views: int, out: Path, *extra: str):
    return build_config(preset="tiny", overrides=[
        f"data.cache={stores[views]}", f"data.text_cache={stores[0]}", "data.protocol=pascal5i", "data.fold=0",
        "optim.batch_size=3", "optim.epochs=2", "optim.warmup_epochs=1", "device=cpu", f"out={out}", *extra])


def test_steps_per_epoch_do_not_depend_on_k(stores, tmp_path):
    steps = {}
    for views in (1, 4):
        prepared = prepare_data(_config(stores, views, tmp_path / "unused"))
        assert sorted(prepared.samples) == sorted((i, (c,)) for i in range(IMAGES) for c in QUADRANTS)
        summary = train(config=_config(stores, views, tmp_path / f"k{views}"), quiet=True)
        start = json.loads((tmp_path / f"k{views}" / "metrics.jsonl").read_text().splitlines()[0])
        steps[views] = (start["steps_per_epoch"], summary["steps"])
    pairs = IMAGES * len(QUADRANTS)
    assert steps[1] == steps[4] == (-(-pairs // 3), 2 * -(-pairs // 3))


def test_each_epoch_shows_one_view_per_image_without_replacement(stores):
    prepared = prepare_data(_config(stores, 4, Path("unused")))
    table = prepared.source.table
    assert table.shape == (IMAGES, 4)
    used: dict[int, list[int]] = {i: [] for i in range(IMAGES)}
    for epoch in range(8):  # two cycles of K = 4 epochs
        samples = prepared.source.epoch_samples(epoch)
        assert len(samples) == len(prepared.samples)
        by_image = {i: {v for v, _ in samples if prepared.split.view_image[v] == i} for i in range(IMAGES)}
        assert all(len(views) == 1 for views in by_image.values())  # every class of an image: the same view
        for image, views in by_image.items():
            used[image].extend(views)
    for image, views in used.items():
        assert Counter(views[:4]) == Counter(table[image]) == Counter(views[4:])  # each view once per cycle
    assert any(used[i][:4] != used[i][4:] for i in used)  # cycles draw new permutations
    assert prepared.source.epoch_samples(5) == prepared.source.epoch_samples(5)  # a function of (seed, epoch)


def test_with_the_standard_lists_an_epoch_is_the_listed_pairs_for_every_k(stores, tmp_path):
    """The released code's epoch: one pass over the listed (image, class) pairs, even a pair whose
    class a cached crop does not show (it trains on an empty target there, as a fresh crop would)."""
    listed = [("q0", 6), ("q0", 7), ("q1", 8), ("q3", 9), ("q4", 10)]  # class 10 (cow) is in no view
    trn = tmp_path / "splits" / "pascal" / "trn"
    trn.mkdir(parents=True)
    for fold in (1, 2, 3):
        (trn / f"fold{fold}.txt").write_text("".join(f"{i}__{c:02d}\n" for i, c in listed if fold == 1))
    steps = {}
    for views in (1, 4):
        config = _config(stores, views, tmp_path / f"k{views}", f"data.train_lists={tmp_path / 'splits'}")
        prepared = prepare_data(config)
        ids = list(prepared.split.image_ids)
        assert sorted((ids[i], c) for i, (c,) in prepared.samples) == sorted(listed)
        summary = train(config=config, quiet=True)
        start = json.loads((tmp_path / f"k{views}" / "metrics.jsonl").read_text().splitlines()[0])
        steps[views] = (start["steps_per_epoch"], summary["steps"])
    assert steps[1] == steps[4] == (2, 4)  # 5 pairs in batches of 3, for 2 epochs


def _corner_data(root: Path, images: int = 8) -> Path:
    """A bus filling the middle and a small car in a corner that random crops often cut away."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    rng = np.random.default_rng(1)
    for n in range(images):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 6
        mask[:5, :5] = 7
        image = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{n}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{n}.png")
    return root


def test_samples_are_the_whole_images_classes_even_where_a_crop_lost_one(tmp_path, stores):
    """The released code (and online mode) counts an image's classes before any crop: so does the cache."""
    data = _corner_data(tmp_path / "data")
    counts = {}
    for views in (1, 4):
        store = tmp_path / f"k{views}"
        extract(config=ExtractConfig(backbone="test-vit", out=str(store), dataset="folder", data_root=str(data),
                                     views=views, input_size=32, random_init=True, device="cpu"), quiet=True)
        prepared = prepare_data(_config({**stores, views: store}, views, tmp_path / "unused"))
        split = prepared.split
        assert split.source_classes[:, 6].all() and split.source_classes[:, 5].all()  # car (7), bus (6)
        counts[views] = int(split.view_classes[:, 6].sum())
        assert sorted(prepared.samples) == [(i, (c,)) for i in range(8) for c in (6, 7)]
    assert counts[1] < 8  # the premise: some single crop lost the car
