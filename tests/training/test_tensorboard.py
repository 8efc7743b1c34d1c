"""TensorBoard event files: the loss, learning rate, data wait and validation scores of a run, read back."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from synthetic_data import train_overrides

from pipeline.errors import UserError
from pipeline.training.config import build_config
from pipeline.training.tensorboard import EVENTS_FOLDER

pytestmark = pytest.mark.usefixtures("one_thread")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``folder``: the TFRecord framing (length, crc, event, crc) read
    here, each event parsed as TensorBoard's protobuf ``Event``."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_run_with_tensorboard_writes_loss_lr_data_wait_and_validation_scores(gen, tmp_path):
    from pipeline.runs import train_and_validate

    run = tmp_path / "runs" / "one"
    config = build_config(preset="tiny", overrides=train_overrides(
        gen, run, "tensorboard=true", "data.fold=1", "val_split=folder/val", "optim.epochs=2"))
    summary = train_and_validate(config=config, quiet=True)
    scalars = read_scalars(run / EVENTS_FOLDER)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    # metrics.jsonl stays the record: the same steps, the same values
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-5)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-5)
    assert [v for _, v in scalars["train/data_wait_fraction"]] == pytest.approx(
        [r["data_wait_fraction"] for r in steps], rel=1e-5, abs=1e-6)
    assert len(summary["val"]) == 2
    assert [v for _, v in scalars["val/miou"]] == pytest.approx([r["miou"] for r in summary["val"]], rel=1e-5)
    assert [v for _, v in scalars["val/fb_iou"]] == pytest.approx([r["fb_iou"] for r in summary["val"]], rel=1e-5)
    assert scalars["val/miou"][-1][0] == summary["steps"]


def test_tensorboard_is_off_by_default_and_its_extra_is_named_when_missing(gen, tmp_path, monkeypatch):
    from pipeline.runs import train_and_validate

    run = tmp_path / "plain"
    train_and_validate(config=build_config(preset="tiny", overrides=train_overrides(gen, run, "optim.max_steps=2")),
                       quiet=True)
    assert not (run / EVENTS_FOLDER).exists()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if the extra were not installed
    config = build_config(preset="tiny", overrides=train_overrides(gen, tmp_path / "x", "optim.max_steps=2",
                                                                    "tensorboard=true"))
    with pytest.raises(UserError, match=r"fusioner\[tensorboard\]"):
        train_and_validate(config=config, quiet=True)


def test_the_train_command_has_a_tensorboard_flag(capsys):
    from cli import main

    assert main(["train", "--tensorboard", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["tensorboard"] is True


def test_turning_tensorboard_on_in_a_study_keeps_its_run_folders():
    """A logging switch is not what a run trains: a finished study is not run again for it."""
    from pipeline.sweep.study import expand_runs, load_study

    study = Path(__file__).resolve().parents[2] / "pipeline" / "studies" / "tiny.yaml"
    plain = expand_runs(load_study(path=study), check_caches=False)
    logged = expand_runs(load_study(path=study, overrides=["tensorboard=true"]), check_caches=False)
    assert [r.dir for r in logged] == [r.dir for r in plain]
    assert all(r.config["tensorboard"] is True for r in logged)
