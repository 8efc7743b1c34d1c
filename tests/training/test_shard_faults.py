"""A shard file lost or emptied before or during training stops the run in one line; the repair resumes to the same bits."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import Generated, generated_train_split, train_overrides

from pipeline.encode.extract import extract
from pipeline.errors import UserError, run_entry
from pipeline.store.reader import CachedSplit
from pipeline.training.checkpoints import latest_checkpoint
from pipeline.training.config import build_config
from pipeline.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")

EPOCHS = ("optim.epochs=3", "checkpoint_every=2")
SHARD = 2  # the damaged shard (of 6 in the generated training split)


def _config(gen: Generated, run: Path, mode: str):
    return build_config(preset="tiny", overrides=train_overrides(gen, run, f"data.read_mode={mode}", *EPOCHS))


def _copy(gen: Generated, where: Path) -> Generated:
    shutil.copytree(gen.vision, where)
    return replace(gen, vision=where)


def _files(store: Path, shard: int) -> list[Path]:
    return [store / "folder" / "train" / name / "c" / str(shard) / "0" / "0" for name in ("features", "masks")]


def _damage(path: Path, how: str) -> None:
    path.unlink() if how == "delete" else path.write_bytes(b"")


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _assert_same_run(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name
    assert _losses(a) == _losses(b)


@pytest.fixture(scope="module")
def straight(gen, tmp_path_factory):
    """Undamaged runs, one per read mode, each on its own copy of the store."""
    runs = {}

    def run_for(mode: str) -> Path:
        if mode not in runs:
            base = tmp_path_factory.mktemp(f"straight-{mode}")
            copy = _copy(gen, base / "store")
            train(config=_config(copy, base / "run", mode), quiet=True)
            runs[mode] = base / "run"
        return runs[mode]

    return run_for


def _repair_and_resume(copy: Generated, run: Path, mode: str, straight_run: Path, *, resume: bool = True) -> None:
    report = extract(config=replace(generated_train_split(copy), out=str(copy.vision)), quiet=True)
    assert report.shards_run == 1
    train(config=_config(copy, run, mode), resume=resume, quiet=True)
    _assert_same_run(straight_run, run)


@pytest.mark.reliability
@pytest.mark.parametrize(("mode", "how"), [("stream", "delete"), ("stream", "empty")])
def test_a_shard_lost_while_training_stops_the_run_and_the_repair_resumes_to_the_same_bits(
        gen, straight, tmp_path, monkeypatch, capsys, mode, how):
    """Stream mode reads shard files directly (fastread) while it trains: a lost or emptied file is never zeros.
    (Memory mode reads everything before the first step; zarr's own read path is checked in the store's tests.)"""
    copy, run = _copy(gen, tmp_path / "store"), tmp_path / "run"
    read, damaged, lock = CachedSplit.read, [], threading.Lock()

    def lose_a_shard_after_the_first_checkpoint(self, name, index, **kwargs):
        with lock:  # the stream's reader threads call this together
            if not damaged and (run / "checkpoints" / "latest").is_file():
                for path in _files(copy.vision, SHARD):
                    _damage(path, how)
                damaged.append(True)
        return read(self, name, index, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CachedSplit, "read", lose_a_shard_after_the_first_checkpoint)
        code = run_entry(lambda: train(config=_config(copy, run, mode), quiet=True))
    err = capsys.readouterr().err
    assert damaged and code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    expected = "missing" if how == "delete" else "empty"
    assert f"file of shard {SHARD} is {expected}" in err and "fusioner extract" in err and "--resume" in err, err
    assert not (run / "model.safetensors").exists()
    _repair_and_resume(copy, run, mode, straight(mode))


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["empty", pytest.param("delete", marks=pytest.mark.slow)])
def test_a_lost_or_empty_done_shard_is_refused_in_memory_mode_and_the_repair_gives_the_same_run(
        gen, straight, tmp_path, how):
    copy, run = _copy(gen, tmp_path / "store"), tmp_path / "run"
    _damage(_files(copy.vision, SHARD)[0], how)
    with pytest.raises(UserError, match=rf"missing or empty \(first: shard {SHARD}\).*fusioner extract"):
        train(config=_config(copy, run, "memory"), quiet=True)
    assert not run.exists() or latest_checkpoint(run) is None  # refused before the first step
    _repair_and_resume(copy, run, "memory", straight("memory"), resume=False)
