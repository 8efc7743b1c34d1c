"""Faults around a training run: crafted and truncated checkpoint files (issue 14 items 1, 10, 11)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.runtime import load_torch_file
from pipeline.training.checkpoints import latest_checkpoint, load_model
from pipeline.training.config import build_config
from pipeline.training.loop import train
from synthetic_data import LEARN_EPOCHS, train_overrides

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.reliability]


class RunsAShellCommand:
    """What a crafted pickle does: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def run(learned, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(learned, copy)
    return copy


def _resume(gen, run: Path) -> dict:
    return train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, f"optim.epochs={LEARN_EPOCHS}")),
                 resume=True, quiet=True)


def test_a_crafted_train_state_is_refused_and_never_run(gen, run, tmp_path):
    marker = tmp_path / "ran"
    for checkpoint in (run / "checkpoints").glob("step-*"):
        state = torch.load(checkpoint / "train_state.pt", weights_only=True)
        state["position"]["payload"] = RunsAShellCommand(marker)
        torch.save(state, checkpoint / "train_state.pt")
    with pytest.raises(UserError) as err:
        load_torch_file(latest_checkpoint(run) or next((run / "checkpoints").glob("step-*")) / "train_state.pt")
    assert "refusing to load" in str(err.value) and "posix.system" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="no checkpoint .* refusing to load .*posix.system"):
        _resume(gen, run)  # no checkpoint loads, so none is resumed from
    assert not marker.exists()


def test_a_crafted_encoder_checkpoint_is_refused_and_never_run(tmp_path):
    from pipeline.encode.families import create_encoder

    marker, path = tmp_path / "ran", tmp_path / "dino.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": RunsAShellCommand(marker)}, path)
    with pytest.raises(UserError) as err:
        create_encoder("dino-b", weights=path)
    assert str(path) in str(err.value) and "refusing to load" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(gen, run, capsys):
    folder = run / "checkpoints"
    older, newest = sorted(folder.glob("step-*"))[-2:]
    state = newest / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy cut short
    assert latest_checkpoint(run) == older
    assert "incomplete or unreadable; using " + older.name in capsys.readouterr().err
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    (run / "model.safetensors").unlink()  # eval/predict of an unfinished run read the latest checkpoint
    model, _ = load_model(run)
    assert model is not None
    summary = _resume(gen, run)  # trains the lost epoch again from the older checkpoint
    assert summary["steps"] == int(newest.name.split("-")[1]) and summary["final_loss"] == summary["final_loss"]


def test_an_empty_train_state_is_a_one_line_error_when_nothing_else_is_left(gen, run):
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / "train_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint .*empty or truncated"):
        _resume(gen, run)
    with pytest.raises(UserError, match="empty or truncated"):
        load_torch_file(next((run / "checkpoints").glob("step-*")) / "train_state.pt", what="training state")


@pytest.mark.parametrize(("override", "message"), [
    ("optim.epochs=0", "optim.epochs and optim.batch_size must be at least 1"),
    ("optim.batch_size=0", "optim.epochs and optim.batch_size must be at least 1"),
    ("optim.batch_size=-1", "optim.epochs and optim.batch_size must be at least 1"),
    ("optim.lr=.nan", "optim.lr must be a positive number"),
    ("optim.lr=-0.1", "optim.lr must be a positive number"),
    ("optim.max_steps=-2", "must be >= 0"),
])
def test_training_settings_that_would_save_an_untrained_model_are_refused(override, message):
    with pytest.raises(UserError, match=message) as err:
        build_config(preset="tiny", overrides=[override])
    assert "\n" not in str(err.value)


def test_resuming_a_finished_run_keeps_its_summary(gen, run):
    before = (run / "summary.json").read_text()
    summary = _resume(gen, run)
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
    assert (run / "summary.json").read_text() == before


@pytest.mark.reliability
@pytest.mark.parametrize("value", ["0", "-1"])
def test_data_readers_below_one_or_not_a_count_is_refused(value):
    with pytest.raises(UserError, match=r"data.readers must be a whole number of at least 1") as err:
        build_config(preset="tiny", overrides=[f"data.readers={value}"])
    assert "\n" not in str(err.value)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler turns it into an error line."""


@pytest.mark.reliability
def test_a_kill_inside_the_first_checkpoint_write_says_to_start_over_and_starting_over_works(gen, tmp_path,
                                                                                              monkeypatch):
    import pipeline.training.checkpoints as checkpoints

    run = tmp_path / "run"
    config = build_config(preset="tiny", overrides=train_overrides(gen, run, "optim.max_steps=2", "checkpoint_every=1"))

    def killed_half_way(state, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(checkpoints, "save_file", killed_half_way)
        train(config=config, quiet=True)
    with pytest.raises(UserError, match=r"`resume`: no checkpoint .* the same command without `resume` starts the "
                                        r"run over") as err:
        train(config=config, resume=True, quiet=True)
    assert "\n" not in str(err.value)
    assert train(config=config, quiet=True)["steps"] == 2 and (run / "model.safetensors").is_file()


@pytest.mark.reliability
def test_out_that_is_a_file_is_one_line_and_left_alone(gen, tmp_path):
    out = tmp_path / "taken"
    out.write_text("mine\n")
    with pytest.raises(UserError, match="`out` .*taken is a file, not a folder for a run") as err:
        train(config=build_config(preset="tiny", overrides=train_overrides(gen, out)), quiet=True)
    assert "\n" not in str(err.value) and out.read_text() == "mine\n"


def test_library_errors_name_settings_and_the_command_line_names_its_flags(gen, tmp_path, capsys):
    """An API caller never typed --out; `fusioner train` users did, and see the flag."""
    from cli import main

    out = tmp_path / "taken"
    out.write_text("mine\n")
    with pytest.raises(UserError) as err:
        train(config=build_config(preset="tiny", overrides=train_overrides(gen, out)), quiet=True)
    assert "--" not in str(err.value) and "`out`" in str(err.value)
    code = main(["train", "--cache", str(gen.vision), "--text-cache", str(gen.text), "--split", "folder/train",
                 "--preset", "tiny", "--out", str(out)])
    line = capsys.readouterr().err.strip()
    assert code == 2 and line == f"error: --out {out} is a file, not a folder for a run; choose another --out", line
    with pytest.raises(UserError, match=r"needs a backbone and a data root \(`data.online.backbone`, "):
        train(config=build_config(preset="tiny", overrides=["data.online.enabled=true", f"out={tmp_path / 'o'}"]),
              quiet=True)


def test_eval_limit_below_one_is_refused():
    from pipeline.eval.evaluate import evaluate_split

    for limit in (0, -3):
        with pytest.raises(UserError, match="`limit` must be at least 1"):
            evaluate_split(model=None, vision_cache="nowhere", text_cache="nowhere", split="x", protocol="pascal5i",
                           fold=0, limit=limit)


def test_evaluating_against_a_store_of_another_width_is_one_line(gen):
    from pipeline.eval.evaluate import evaluate_split
    from pipeline.model import build_model, make_model_config

    model = build_model(make_model_config(vision_dim=768, text_dim=384, preset="tiny"))
    with pytest.raises(UserError, match=r"takes 768-d vision and 384-d text features; .* hold 32-d and 384-d") as err:
        evaluate_split(model=model, vision_cache=str(gen.vision), text_cache=str(gen.text), split="folder/val",
                       protocol="pascal5i", fold=0)
    assert "\n" not in str(err.value)
