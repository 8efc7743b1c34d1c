"""Where a training run starts: train, validate, select the weights, as every entry point does it.

The composition root of stage two, above :mod:`pipeline.training` (the loop and its
hooks) and :mod:`pipeline.eval` (the validation hooks): ``fusioner train``, the
Python API, the demo and the sweep workers all train through
:func:`train_and_validate` (or :func:`train_from_settings`, which first builds the
config from a preset, a file and dotted settings).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import load_file, to_dict, write_json_atomic
from pipeline.errors import UserError
from pipeline.eval.validation import BestValidation, Validation, check_disjoint_validation
from pipeline.training.config import TrainConfig, build_config
from pipeline.training.hooks import HookBase
from pipeline.training.tensorboard import TensorBoardWriter
from pipeline.training.loop import train


def _select_best(config: TrainConfig, summary: dict) -> dict:
    """model.safetensors becomes the selected weights; the final ones stay beside them, labelled."""
    run = Path(config.out)
    best = run / "model_best.safetensors"
    if not best.is_file():
        raise UserError(f"{run}: select best-val found no validation score (is eval_every larger than the epochs?)")
    os.replace(run / "model.safetensors", run / "model_final.safetensors")
    shutil.copyfile(best, run / "model.safetensors")
    summary = {**summary, "selection": json.loads((run / "selection.json").read_text())}
    write_json_atomic(run / "summary.json", summary)
    return summary


HOOKS_VARIABLE = "FUSIONER_HOOKS"
RANDOM_INIT_TRAIN_NOTE = "note: trained on random-init features; numbers are a pipeline check, not a result"


def hooks_from_environment(environ: Mapping[str, str] | None = None) -> list[HookBase]:
    """Extra training hooks named in ``FUSIONER_HOOKS`` (``module:Class`` entries, comma-separated).

    Each class is imported and built without arguments; this reaches runs that start in
    processes of their own (sweep workers), where no caller can hand hooks in.
    """
    import importlib

    value = (os.environ if environ is None else environ).get(HOOKS_VARIABLE, "")
    hooks = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        module, _, name = entry.partition(":")
        try:
            made = getattr(importlib.import_module(module), name)()
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"{HOOKS_VARIABLE}: cannot build hook {entry!r} ({err})") from err
        hooks.append(made)
    return hooks


def train_and_validate(*, config: TrainConfig, resume: bool = False, quiet: bool = False,
                       hooks: Sequence[HookBase] = ()) -> dict:
    """:func:`pipeline.training.loop.train`, with validation on ``config.val_split`` when it is set (before ``hooks``).

    ``config.select == "best-val"`` reports the weights of the best validation score instead of the final ones.
    With ``config.tensorboard`` the TensorBoard writer runs first after validation (it reads its scores);
    hooks named in ``FUSIONER_HOOKS`` run after ``hooks``.
    """
    hooks = [*([TensorBoardWriter()] if config.tensorboard else []), *hooks, *hooks_from_environment()]
    if config.select == "best-val":
        check_disjoint_validation(config)
        summary = train(config=config, resume=resume, quiet=quiet, hooks=[BestValidation(), *hooks])
        return _select_best(config, summary)
    validation = [Validation()] if config.val_split else []
    summary = {**train(config=config, resume=resume, quiet=quiet, hooks=[*validation, *hooks]),
               "selection": {"rule": "final"}}
    write_json_atomic(Path(config.out) / "summary.json", summary)  # says which weights, as best-val runs do
    return summary


@dataclass
class TrainOutcome:
    """What ``fusioner train`` did: the resolved config, and the training summary unless only the config was asked."""

    config: dict
    summary: dict | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.summary is None:
            return ""
        s = self.summary
        lines = [f"{self.config['out']}: {s['steps']} steps, final loss {s['final_loss']:.4f}, "
                 f"data wait {100 * s['data_wait_fraction']:.1f}% of step time"]
        if s["val"]:
            last = s["val"][-1]
            lines.append(f"validation mIoU {last['miou']:.1f}  FB-IoU {last['fb_iou']:.1f}  ({last['episodes']} episodes)")
        return "\n".join(lines)


def train_from_settings(*, config_file: str | Path | None = None, preset: str | None = None,
                        settings: Mapping[str, Any] | None = None, resume: bool = False, quiet: bool = False,
                        print_config: bool = False) -> TrainOutcome:
    """Build a run's config (defaults <- preset <- ``config_file`` <- ``settings``, a mapping of dotted keys
    to typed values) and train it with validation; with ``print_config`` only the config is resolved."""
    base = load_file(config_file) if config_file else {}
    config = build_config(base=base, preset=preset, overrides=dict(settings or {}))
    if print_config:
        return TrainOutcome(config=to_dict(config))
    summary = train_and_validate(config=config, resume=resume, quiet=quiet)
    notes = [] if summary["pretrained_features"] else [RANDOM_INIT_TRAIN_NOTE]
    return TrainOutcome(config=to_dict(config), summary=summary, notes=notes)
