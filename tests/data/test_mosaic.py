"""Mosaic-4 on a tiny generated FSS-like tree: distinct classes, aligned masks, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import make_fss

from pipeline.data.mosaic import make_mosaic, plan_mosaic, read_mosaic_index
from pipeline.data.protocols import create_protocol, load_episodes
from pipeline.data.registry import create_dataset
from pipeline.errors import UserError

CLASSES = ("cat", "dog", "fox", "owl", "yak", "emu")


@pytest.fixture()
def fss(tmp_path: Path) -> tuple[Path, Path]:
    root = make_fss(tmp_path / "fss", classes=CLASSES, per_class=4)
    classes_file = tmp_path / "test.txt"
    classes_file.write_text("\n".join(CLASSES) + "\n")
    return root, classes_file


def _make(fss: tuple[Path, Path], out: Path, **options) -> Path:
    root, classes_file = fss
    return make_mosaic(fss_root=root, out=out, classes_file=classes_file, tile=8, progress=False, **options)


def test_composites_have_four_distinct_classes_and_aligned_masks(fss, tmp_path: Path) -> None:
    out = _make(fss, tmp_path / "m", count=6)
    composites = read_mosaic_index(out / "mosaic4.json")
    source = create_dataset("fss", root=fss[0], classes_file=fss[1])
    ds = create_dataset("mosaic4", root=out)
    assert len(ds) == 6 and ds.class_names == list(CLASSES)
    used = [t["source"] for c in composites for t in c["tiles"]]
    assert len(used) == len(set(used)) == 24  # one round of 6*4 images: nothing reused
    for index, composite in enumerate(composites):
        record = ds.load(index)
        assert record.image.shape == (16, 16, 3) and record.image_id == composite["image_id"]
        assert len({t["class"] for t in composite["tiles"]}) == 4
        for tile in composite["tiles"]:
            assert CLASSES[tile["value"] - 1] == tile["class"]
            src = source.load(source.ids.index(tile["source"])).mask
            expected = np.asarray(Image.fromarray(src).resize((8, 8), Image.NEAREST))
            r, c = 8 * tile["row"], 8 * tile["col"]
            assert np.array_equal(record.mask[r:r + 8, c:c + 8], expected)
        assert sorted(ds.classes_present(index)) == sorted(t["value"] for t in composite["tiles"])


def test_same_seed_same_mosaic_other_seed_differs(fss, tmp_path: Path) -> None:
    first, second = _make(fss, tmp_path / "a", count=5, seed=3), _make(fss, tmp_path / "b", count=5, seed=3)
    other = _make(fss, tmp_path / "c", count=5, seed=4)

    def tiles(out: Path) -> list:
        return [c["tiles"] for c in json.loads((out / "mosaic4.json").read_text())["composites"]]

    assert tiles(first) == tiles(second) != tiles(other)
    for name in ("mosaic_0000.png", "mosaic_0004.png"):
        assert (first / "masks" / name).read_bytes() == (second / "masks" / name).read_bytes()


def test_more_composites_than_one_round_reuse_only_then(fss, tmp_path: Path) -> None:
    composites = read_mosaic_index(_make(fss, tmp_path / "m", count=9) / "mosaic4.json")
    assert len(composites) == 9
    first_round = [t["source"] for c in composites[:6] for t in c["tiles"]]
    assert len(set(first_round)) == 24
    assert all(len({t["class"] for t in c["tiles"]}) == 4 for c in composites)


def test_plan_keeps_classes_distinct_when_one_class_dominates() -> None:
    image_classes = [1] * 20 + [2, 3, 4, 5, 5]
    groups = plan_mosaic(image_classes=image_classes, count=30, seed=0)
    assert len(groups) == 30
    assert all(len({image_classes[i] for i in g}) == 4 for g in groups)
    assert plan_mosaic(image_classes=image_classes, count=30, seed=0) == groups


def test_mosaic_protocol_and_episodes(fss, tmp_path: Path) -> None:
    out = _make(fss, tmp_path / "m", count=3)
    episodes = load_episodes(protocol="mosaic4", fold=0, splits_dir=out, dataset=create_dataset("mosaic4", root=out))
    assert len(episodes) == 12 and episodes[0].image_id == "mosaic_0000"
    spec = create_protocol("mosaic4", root=out)
    assert spec.class_names == CLASSES and spec.fold(0).novel == tuple(range(1, 7))


def test_errors(fss, tmp_path: Path) -> None:
    root, classes_file = fss
    with pytest.raises(UserError, match="dataset root not found"):
        make_mosaic(fss_root=tmp_path / "nowhere", out=tmp_path / "m", classes_file=classes_file, progress=False)
    few = tmp_path / "few.txt"
    few.write_text("cat\ndog\nfox\n")
    with pytest.raises(UserError, match="at least 4 classes"):
        make_mosaic(fss_root=root, out=tmp_path / "m", classes_file=few, progress=False)
    out = _make(fss, tmp_path / "m", count=1)
    with pytest.raises(UserError, match="not empty"):
        _make(fss, out, count=1)
    (out / "mosaic4.json").write_text("{}")
    with pytest.raises(UserError, match=r"mosaic4\.json: unreadable Mosaic-4 index"):
        load_episodes(protocol="mosaic4", fold=0, splits_dir=out)
    with pytest.raises(UserError, match="mosaic4.json"):
        create_dataset("mosaic4", root=root)
