"""Checkpoints of a training run: written atomically, found again after a kill.

A checkpoint is a folder holding the weights (safetensors), the optimiser state
with the run's position and RNG state, and the full config (JSON). It is written
under a hidden temporary name and renamed into place; the ``latest`` pointer is
replaced after it. A reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.config import from_dict, write_json_atomic
from pipeline.errors import UserError
from pipeline.model import build_model
from pipeline.runtime import default_file_mode, load_torch_file


def save_checkpoint(*, run: Path, model, optimizer, position: dict, config, keep: int = 2) -> Path:
    """Write weights (safetensors), optimiser state and config into a new folder, then rename it in.

    The rename is atomic, and ``latest`` is replaced atomically after it, so a
    reader (or a resume) never sees a half-written checkpoint.
    """
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['step']:08d}"
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "fusioner"})
    default_file_mode(tmp / "model.safetensors")
    # The torch RNG state makes dropout continue as in an uninterrupted run.
    # Through a Python file, so that a failed write (full disk, file-size limit) keeps its OSError, with the
    # errno, in the chain of torch's RuntimeError, and run_entry can say what happened in one line.
    with open(tmp / "train_state.pt", "wb") as handle:
        torch.save({"optimizer": optimizer.state_dict(), "position": position, "rng": rng_state()}, handle)
    write_json_atomic(tmp / "config.json", config)
    final = folder / name
    if final.exists():
        # The same step saved twice (checkpoint_every landing on an epoch end, or a resume
        # that starts there): move the old folder aside in one rename rather than deleting
        # it in place, so `latest` never names a half-deleted folder.
        old = folder / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = folder / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, folder / "latest")
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


CHECKPOINT_FILES = ("model.safetensors", "train_state.pt", "config.json")


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be used (one line), or None when every file parses.

    The weights must cover their file, the config and the training state must load (the
    latter with ``weights_only=True``: a state that needs more is refused, never run).
    """
    if not _complete(path):
        return f"{path} lacks " + ", ".join(n for n in CHECKPOINT_FILES if not (path / n).is_file())
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            weights.keys()
        json.loads((path / "config.json").read_text())
    except Exception as err:  # noqa: BLE001 - whatever is wrong, this checkpoint cannot be used
        return f"{path}: {(str(err).splitlines() or [type(err).__name__])[0][:120]}"
    try:
        load_train_state(path, map_location="cpu")
    except UserError as err:
        return str(err)
    return None


def load_train_state(checkpoint: Path, *, map_location) -> dict:
    """The optimiser state, position and RNG state of a checkpoint: tensors and plain values only."""
    return load_torch_file(Path(checkpoint) / "train_state.pt", map_location=map_location, what="training state")


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint named by ``latest``, or else the newest readable ``step-*`` folder.

    Every file of the chosen checkpoint is read before it is used: one truncated by a full disk
    or a copy cut short is passed over (with a note on stderr) for the newest complete one.
    The fallback also covers a run killed between replacing a folder and moving the pointer;
    hidden ``.step-*.tmp`` leftovers of a killed save are never used.
    """
    folder = Path(run) / "checkpoints"
    pointer = folder / "latest"
    named = folder / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and checkpoint_problem(named) is None:
        return named
    candidates = sorted(p for p in folder.glob("step-*") if p != named and p.is_dir()) if folder.is_dir() else []
    for candidate in reversed(candidates):
        if checkpoint_problem(candidate) is None:
            if named is not None:
                print(f"note: checkpoint {named} is incomplete or unreadable; using {candidate.name}",
                      file=sys.stderr)
            return candidate
    return None


def rng_state() -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.random.set_rng_state(state["cpu"].cpu())  # torch.load may have mapped it to the device
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def truncate_log(path: Path, *, step: int) -> None:
    """Drop records logged after the checkpoint a run resumes from, so they are not logged twice."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _read_model(folder: Path, *, device):
    """The model a run or checkpoint folder holds; a damaged or replaced file is one line naming it."""
    from pipeline.training.config import TrainConfig, upgrade_run_config

    name = "config.json"
    try:
        config = from_dict(TrainConfig, upgrade_run_config(json.loads((folder / name).read_text())))
        model = build_model(config.model)
        name = "model.safetensors"
        model.load_state_dict(load_file(str(folder / name)))
    except UserError as err:
        raise UserError(f"{folder / name} does not hold a run's config ({err})") from None
    except Exception as err:  # noqa: BLE001 - JSON, safetensors or shape errors: the file is not what it should be
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        checkpoint = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
        advice = (f"use its latest checkpoint ({checkpoint}) instead, or train it again" if checkpoint else
                  "restore it from a copy, or train the run again")
        raise UserError(f"{folder / name} is damaged or not this run's file ({reason}); {advice}") from None
    return model.to(device).eval(), config


def load_model(run_or_checkpoint: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild a trained model from a run directory (its final or latest weights) or a checkpoint folder."""
    path = Path(run_or_checkpoint)
    for candidate in (path, latest_checkpoint(path) if path.is_dir() else None):
        if candidate is not None and (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return _read_model(candidate, device=device)
    raise UserError(f"no trained model at {path} (expected model.safetensors and config.json)")
