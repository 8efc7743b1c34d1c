"""Extraction: seeded views, the kill-and-resume test, refusals, bad images, several workers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from synthetic_data import (
    TINY_SIZES,
    assert_same_store,
    with_bad_images,
    write_folder_dataset,
)
from synthetic_data import TINY_VIEWS as VIEWS
from synthetic_data import tiny_extract_config as tiny_config

from pipeline.data.registry import create_dataset
from pipeline.data.augment import AugmentConfig, resolve_augment
from pipeline.data.views import ViewParams, render_view, window_boxes
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.encode.plan import plan_split
from pipeline.errors import UserError
from pipeline.host import threads_each
from pipeline.store.layout import open_store, store_attrs
from pipeline.store.splits import done_shards

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- #
# Views and windows
# --------------------------------------------------------------------------- #


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A black 80 x 100 image with a red rectangle where the mask says class 3."""
    image = np.zeros((80, 100, 3), np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    image[20:40, 30:50, 0] = 255
    mask[20:40, 30:50] = 3
    return image, mask


def test_render_view_keeps_mask_on_the_pixels_after_crop_and_flip():
    image, mask = _scene()
    view, view_mask = render_view(image=image, mask=mask, params=ViewParams(box=(20, 10, 70, 60), flip=True), size=50)
    expected = np.zeros((50, 50), bool)
    expected[10:30, 20:40] = True  # crop moves the box by (-20, -10); the flip maps x to 49 - x
    assert np.array_equal(view_mask == 3, expected)
    assert np.array_equal(view[..., 0] > 128, expected)
    # Scaled by one half: nearest-neighbour mask and bilinear image still agree.
    view, view_mask = render_view(image=image, mask=mask, params=ViewParams(box=(20, 10, 70, 60), flip=True), size=25)
    red, labelled = view[..., 0] > 128, view_mask == 3
    assert labelled.sum() >= 80 and (red & labelled).sum() / (red | labelled).sum() > 0.8
    assert labelled[5:15, 10:20].all() and not labelled[:, :9].any() and not labelled[:, 21:].any()


def test_render_view_pads_a_window_past_the_image_with_ignore():
    image, mask = _scene()
    view, view_mask = render_view(image=image, mask=mask, params=ViewParams(box=(60, 0, 160, 100)), size=100)
    assert (view_mask[:, 40:] == 255).all() and (view[:, 40:] == 0).all()  # beyond x = 100
    assert (view_mask[80:] == 255).all()  # beyond y = 80
    assert (view_mask[:80, :40] != 255).all()


@pytest.mark.parametrize(("height", "width"), [(100, 250), (64, 64), (65, 300), (40, 90)])
def test_window_boxes_cover_the_image_and_end_on_its_edge(height, width):
    size, stride = 64, (2 * 64) // 3
    boxes = window_boxes(height=height, width=width, size=size, stride=stride, last="slide")
    covered = np.zeros((max(height, size), max(width, size)), bool)
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == (size, size) and x0 >= 0 and y0 >= 0
        covered[y0:y1, x0:x1] = True
    assert covered[:height, :width].all()
    xs, ys = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    for starts, length in ((xs, width), (ys, height)):
        if length <= size:
            assert starts == [0]
        else:
            assert starts[-1] == length - size  # the last window is flush with the far edge
            assert all(b - a == stride for a, b in zip(starts[:-1], starts[1:-1]))
            assert 0 < starts[-1] - starts[-2] <= stride


def test_evaluation_plan_uses_windows_with_two_thirds_stride(tmp_path):
    data = write_folder_dataset(tmp_path / "data", sizes=((70, 150),))
    dataset = create_dataset("folder", root=data, split="val")
    config = ExtractConfig(backbone="test-vit", out=str(tmp_path / "s"), split="val")
    plan = plan_split(dataset=dataset, config=config, input_size=48, tokens=9, dim=8)
    assert plan.kind == "windows" and plan.meta["stride"] == 32
    expected = window_boxes(height=70, width=150, size=48, stride=32)
    assert [tuple(b) for b in plan.view_box] == expected and len(expected) == 2 * 5
    assert not plan.view_flip.any() and (plan.view_jitter == [1, 1, 1, 0]).all()


def test_padded_window_pixels_normalise_to_minus_one_as_released(tmp_path):
    from pipeline.data.views import pad_fill
    from pipeline.encode.registry import DATASET_STATS
    from pipeline.encode.shards import planned_view

    mean, std = DATASET_STATS["pascal"]
    fill = pad_fill(fill="released", mean=mean, std=std)
    assert fill == (86, 79, 67)
    normalised = (np.asarray(fill) / 255.0 - np.asarray(mean)) / np.asarray(std)
    assert np.allclose(normalised, -1.0, atol=0.5 / 255 / min(std))  # within half a grey level
    data = write_folder_dataset(tmp_path / "data", sizes=((70, 150),))
    dataset = create_dataset("folder", root=data, split="val")
    config = ExtractConfig(backbone="clip-b", out=str(tmp_path / "s"), split="val", normalize="pascal")
    plan = plan_split(dataset=dataset, config=config, input_size=48, tokens=9, dim=8)
    assert plan.meta["window_fill"] == "released"
    last = len(plan.view_box) - 1  # the bottom-right window reaches past both edges
    record = dataset.load(0)
    view, view_mask = planned_view(record, meta=plan.meta, kind="windows", image_index=0, view_number=last,
                                   params=ViewParams(box=tuple(plan.view_box[last])), size=48)
    outside = view_mask == 255
    assert outside.any() and (view[outside] == fill).all()
    # A store planned before the choice existed (no window_fill) keeps its black padding; black is an option.
    old_meta = {k: v for k, v in plan.meta.items() if k != "window_fill"}
    view, _ = planned_view(record, meta=old_meta, kind="windows", image_index=0, view_number=last,
                           params=ViewParams(box=tuple(plan.view_box[last])), size=48)
    assert (view[outside] == 0).all()
    black = plan_split(dataset=dataset, config=ExtractConfig(backbone="clip-b", out=str(tmp_path / "s"), split="val",
                                                             window_fill="black"), input_size=48, tokens=9, dim=8)
    assert black.meta["window_fill"] == "black"
    with pytest.raises(UserError, match="window fill"):
        plan_split(dataset=dataset, config=ExtractConfig(backbone="clip-b", out=str(tmp_path / "s"), split="val",
                                                         window_fill="grey"), input_size=48, tokens=9, dim=8)


# --------------------------------------------------------------------------- #
# Kill and resume
# --------------------------------------------------------------------------- #


def _fusioner() -> list[str]:
    script = Path(sys.executable).with_name("fusioner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def _done_markers(out: Path) -> int:
    """Finished shards, from the marker files alone (cheap enough to poll every few ms)."""
    folder = out / "folder" / "train" / "shard_done" / "c"
    try:
        return sum(1 for name in os.listdir(folder) if name.isdigit())
    except FileNotFoundError:
        return 0


@pytest.mark.processes
@pytest.mark.reliability
def test_killed_extraction_resumes_to_the_same_bytes(tmp_path, capsys):
    """kill -9 a real `fusioner extract` mid-run, run it again, compare with an uninterrupted run."""
    from cli import main

    data = write_folder_dataset(tmp_path / "data", sizes=((96, 128), (120, 90)) * 8, seed=3)
    out = tmp_path / "killed"
    args = ["extract", "--backbone", "test-vit", "--random-init", "--input-size", "32", "--dataset", "folder",
            "--data-root", str(data), "--views", "4", "--shard-size", "4", "--vision-only", "--quiet"]
    shards = 16 * 4 // 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the thread count of the reference run below
    proc = subprocess.Popen(_fusioner() + args + ["--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while _done_markers(out) < 1:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = int(done_shards(open_store(out)["folder/train"]).sum())
    assert 1 <= done_at_kill < shards

    # The same command again, through the same entry point in this process: the killed process is gone either
    # way, and a second interpreter would only import torch and the encoder libraries once more.
    assert torch.get_num_threads() == 1  # the killed run's thread count (OMP_NUM_THREADS=1), so the same bytes
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    said = capsys.readouterr().out
    written, skipped = map(int, re.search(r"(\d+) shards written, (\d+) already done", said).groups())
    assert skipped >= done_at_kill and written + skipped == shards

    reference = tmp_path / "uninterrupted"
    config = ExtractConfig(backbone="test-vit", out=str(reference), dataset="folder", data_root=str(data), views=4,
                           input_size=32, shard_size=4, vision_only=True, random_init=True)
    extract(config=config, quiet=True)
    assert_same_store(reference, out)
    # ... with the released recipe's full augmentation in the store's identity, and views that really differ.
    group = open_store(out)["folder/train"]
    recipe = resolve_augment(AugmentConfig(), class_names=create_dataset("folder", root=data).class_names)
    assert group.attrs["meta"]["augment"] == recipe.to_dict() and recipe.block_p == 0.5 and recipe.rotate == 20
    masks = group["masks"][...].reshape(16, 4, 32, 32)
    assert sum(not np.array_equal(m[0], m[k]) for m in masks for k in (1, 2, 3)) > 16


def test_finished_extraction_run_again_writes_nothing(tmp_path):
    data = write_folder_dataset(tmp_path / "data", sizes=TINY_SIZES[:2])
    config = tiny_config(data, tmp_path / "s", backbone="test-timm")
    first = extract(config=config, quiet=True)
    assert first.shards_run == 2 and first.shards_skipped == 0
    second = extract(config=config, quiet=True)
    assert second.shards_run == 0 and second.shards_skipped == 2


def test_resume_accepts_the_same_data_under_another_path_spelling(tmp_path, monkeypatch):
    write_folder_dataset(tmp_path / "data", sizes=TINY_SIZES[:2])
    monkeypatch.chdir(tmp_path)
    first = extract(config=tiny_config(Path("data"), tmp_path / "s", backbone="test-timm", shard_size=2), quiet=True)
    again = extract(config=tiny_config(tmp_path / "data", tmp_path / "s", backbone="test-timm", shard_size=2),
                    quiet=True)
    assert first.shards_run == 3 and again.shards_run == 0 and again.shards_skipped == 3


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data, store) of one single-worker vision-only extraction, copied by the tests that change it.

    It runs with the torch threads each of two workers gets: BLAS sums in another
    order on another thread count, which moves a few features by one float16 step.
    """
    base = tmp_path_factory.mktemp("extract")
    data = write_folder_dataset(base / "data")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_each(2))  # what each of two dask workers runs with
    try:
        extract(config=tiny_config(data, base / "store", vision_only=True), quiet=True)
    finally:
        torch.set_num_threads(previous)
    return data, base / "store"


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


@pytest.mark.reliability
@pytest.mark.parametrize(("change", "key"), [({"backbone": "test-timm"}, "encoder"), ({"input_size": 64}, "input_size")])
def test_appending_a_differently_made_store_is_refused(reference, tmp_path, change, key):
    data, store = reference
    copy = _copy(store, tmp_path)
    with pytest.raises(UserError, match=rf"was made with {key}=.*`overwrite`"):
        extract(config=tiny_config(data, copy, vision_only=True, **change), quiet=True)
    assert store_attrs(open_store(copy))["encoder"] == "test-vit"


def test_overwrite_starts_over(reference, tmp_path):
    data, store = reference
    copy = _copy(store, tmp_path)
    report = extract(config=tiny_config(data, copy, backbone="test-timm", overwrite=True), quiet=True)
    assert report.shards_skipped == 0
    root = open_store(copy)
    assert store_attrs(root)["encoder"] == "test-timm" and root["folder/train/features"].shape[-1] == 64


@pytest.mark.reliability
@pytest.mark.parametrize("change", [{"views": 2}, {"seed": 1}, {"shard_size": 6}])
def test_another_plan_into_the_same_split_is_refused(reference, tmp_path, change):
    data, store = reference
    copy = _copy(store, tmp_path)
    with pytest.raises(UserError, match="planned differently"):
        extract(config=tiny_config(data, copy, vision_only=True, **change), quiet=True)


# --------------------------------------------------------------------------- #
# Bad images
# --------------------------------------------------------------------------- #


@pytest.mark.reliability
def test_a_corrupt_jpeg_stops_the_run_naming_its_path(tmp_path):
    data, truncated, junk = with_bad_images(tmp_path)
    with pytest.raises(UserError, match=re.escape(str(junk))):
        extract(config=tiny_config(data, tmp_path / "a", backbone="test-timm"), quiet=True)
    junk.unlink()
    with pytest.raises(UserError, match=re.escape(str(truncated))):
        extract(config=tiny_config(data, tmp_path / "b", backbone="test-timm"), quiet=True)


@pytest.mark.reliability
def test_skip_bad_records_and_reports_bad_images(tmp_path):
    data, truncated, junk = with_bad_images(tmp_path)
    report = extract(config=tiny_config(data, tmp_path / "s", backbone="test-timm", skip_bad=True), quiet=True)
    assert sorted(image_id for image_id, _ in report.bad) == ["img100", "img101"]
    assert any(str(junk) in reason for _, reason in report.bad)
    group = open_store(tmp_path / "s")["folder/train"]
    assert sorted(s[0] for s in group.attrs["skipped"]) == ["img100", "img101"]
    ids = group.attrs["image_ids"]
    view_image = group["view_image"][...]
    valid = group["view_valid"][...]
    assert ids.index("img101") not in view_image  # unreadable header: never planned
    bad_views = view_image == ids.index("img100")  # decodes only partly: planned, then marked invalid
    assert bad_views.sum() == VIEWS and not valid[bad_views].any() and valid[~bad_views].all()
    assert not group["view_classes"][...][bad_views].any()
    assert (group["masks"][...][bad_views] == 255).all()


# --------------------------------------------------------------------------- #
# Several workers
# --------------------------------------------------------------------------- #


@pytest.mark.processes
def test_two_dask_workers_write_the_same_store_as_one(reference, tmp_path):
    data, store = reference
    out = tmp_path / "two"
    report = extract(config=tiny_config(data, out, vision_only=True, workers=2), quiet=True)
    assert report.shards_run == zarr.open_group(str(store))["folder/train/shard_done"].shape[0]
    assert_same_store(store, out)
