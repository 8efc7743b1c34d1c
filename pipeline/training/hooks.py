"""Hooks keep the training loop short: what happens around steps and epochs, one class each.

A hook subclasses :class:`HookBase` and overrides any of its four no-op methods,
``before_train``, ``after_step``, ``after_epoch`` and ``after_train``, each taking
the :class:`Loop` (the run's state). The loop calls them in order; a hook may read
the state, write files, or add records (``loop.records["val"]``) that end up in the
summary. :func:`check_hooks` refuses anything that is not a ``HookBase`` and any
``before_*``/``after_*`` method that is not one of the four, so a misspelt method is
an error instead of a hook that never fires.

The built-in hooks log metrics, write checkpoints and draw the progress bar; the
end-of-run files (final weights, ``summary.json``, the loss curve) are hooks too,
written only when the loop completed. Validation, which needs the eval layer, is
passed in from there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from pipeline.config import write_json_atomic
from pipeline.model import count_parameters
from pipeline.plots import plot_curves
from pipeline.runtime import default_file_mode, progress
from pipeline.training.checkpoints import save_checkpoint, truncate_log
from pipeline.training.config import TrainConfig


@dataclass
class Loop:
    """The state of a training run that hooks may read."""

    config: TrainConfig
    run: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    bf16: bool
    split: Any  # the CachedSplit trained on
    steps_per_epoch: int
    total_steps: int
    epoch: int  # epochs completed before the current one
    batch: int  # batches done in the current epoch
    step: int  # optimiser steps done
    resumed: bool
    samples: int
    read_mode: str
    fold_novel: list
    loss: Any = float("nan")  # the last step's loss, a tensor on the device: read it with loss_value()
    lr: float = 0.0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    records: dict = field(default_factory=dict)
    forward: Any = None  # the compiled model when config.compile, else None (call the model itself)
    completed: bool = False  # the loop ran to its end (no exception): the end-of-run files may be written
    summary: dict = field(default_factory=dict)  # what train() returns, filled by SummaryFile

    def loss_value(self) -> float:
        """The last loss as a number: waits for the device, so hooks call it only where they log."""
        return float(self.loss)

    @property
    def finished(self) -> bool:
        """``optim.max_steps`` reached (running out of epochs ends the loop by itself)."""
        return bool(self.config.optim.max_steps) and self.step >= self.total_steps

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step}

    @property
    def wait_fraction(self) -> float:
        return self.wait_seconds / max(self.wait_seconds + self.compute_seconds, 1e-9)


EVENTS = ("before_train", "after_step", "after_epoch", "after_train")


class HookBase:
    """A training hook: override any of the four methods; the others do nothing."""

    def before_train(self, loop: Loop) -> None:
        """Once, before the first step (after a resume: before the first step left to do)."""

    def after_step(self, loop: Loop) -> None:
        """After every optimiser step."""

    def after_epoch(self, loop: Loop) -> None:
        """After every completed epoch (``loop.epoch`` already counts it)."""

    def after_train(self, loop: Loop) -> None:
        """Once at the end, also when the run failed (``loop.completed`` says which)."""


def check_hooks(hooks: Sequence[HookBase]) -> list[HookBase]:
    """The hooks, checked: each a :class:`HookBase`, with no ``before_*``/``after_*`` method outside the four."""
    for hook in hooks:
        if not isinstance(hook, HookBase):
            raise TypeError(f"{type(hook).__name__} is not a training hook: subclass pipeline.training.hooks.HookBase")
        unknown = [name for name in dir(hook) if name.startswith(("before_", "after_")) and name not in EVENTS]
        if unknown:
            raise TypeError(f"{type(hook).__name__}.{unknown[0]} is not a hook method "
                            f"(the loop calls {', '.join(EVENTS)})")
    return list(hooks)


def run_hooks(hooks: Sequence[HookBase], event: str, loop: Loop) -> None:
    for hook in hooks:
        getattr(hook, event)(loop)


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


CURVE_POINTS = 20  # a loss curve needs about this many points: shorter runs log more often than log_every


def log_interval(*, log_every: int, total_steps: int) -> int:
    """Steps between loss records: ``log_every``, or fewer when the run has too few steps for ~20 points."""
    return min(log_every, max(1, total_steps // CURVE_POINTS))


class MetricsLog(HookBase):
    """``metrics.jsonl``: a start record, the first step, every ``log_interval``-th step, the last step,
    and anything hooks add under ``event``."""

    def before_train(self, loop: Loop) -> None:
        self.path = loop.run / "metrics.jsonl"
        if not loop.resumed and self.path.exists():
            self.path.unlink()
        if loop.resumed:
            truncate_log(self.path, step=loop.step)  # records after the checkpoint are logged again
        if loop.step == 0:
            append_record(self.path, {
                "event": "start", "parameters": count_parameters(loop.model), "samples": loop.samples,
                "steps_per_epoch": loop.steps_per_epoch, "read_mode": loop.read_mode,
                "pretrained_features": loop.split.pretrained, "fold_novel": loop.fold_novel})

    def after_step(self, loop: Loop) -> None:
        every = log_interval(log_every=loop.config.log_every, total_steps=loop.total_steps)
        if loop.step % every == 0 or loop.step == 1 or loop.step >= loop.total_steps:
            append_record(self.path, {"step": loop.step, "epoch": loop.epoch, "loss": loop.loss_value(), "lr": loop.lr,
                                      "data_wait_fraction": loop.wait_fraction})


class Checkpointer(HookBase):
    """A checkpoint every ``checkpoint_every`` steps, at ``max_steps`` and at the end of every epoch."""

    def after_step(self, loop: Loop) -> None:
        every = loop.config.checkpoint_every
        if (every and loop.step % every == 0) or loop.finished:
            self._save(loop)

    def after_epoch(self, loop: Loop) -> None:
        self._save(loop)

    @staticmethod
    def _save(loop: Loop) -> None:
        save_checkpoint(run=loop.run, model=loop.model, optimizer=loop.optimizer, config=loop.config,
                        position=loop.position)


class ProgressBar(HookBase):
    """The step bar; its loss is refreshed at the metrics log's steps only (reading it waits for the device)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def before_train(self, loop: Loop) -> None:
        self.bar = progress(total=loop.total_steps, desc="train", quiet=self.quiet, unit="step", initial=loop.step)
        self.every = log_interval(log_every=loop.config.log_every, total_steps=loop.total_steps)

    def after_step(self, loop: Loop) -> None:
        self.bar.update(1)
        if not self.quiet and (loop.step % self.every == 0 or loop.step == 1):
            self.bar.set_postfix(loss=f"{loop.loss_value():.4f}", epoch=loop.epoch, refresh=False)

    def after_train(self, loop: Loop) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- #
# End of run: written only when the loop completed
# --------------------------------------------------------------------------- #


class FinalWeights(HookBase):
    """``model.safetensors``: the weights after the last step, replaced atomically."""

    def after_train(self, loop: Loop) -> None:
        if not loop.completed:
            return
        loop.model.eval()
        state = {k: v.detach().cpu().contiguous() for k, v in loop.model.state_dict().items()}
        tmp = loop.run / ".model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "fusioner"})
        default_file_mode(tmp)
        os.replace(tmp, loop.run / "model.safetensors")


class SummaryFile(HookBase):
    """``summary.json``: steps, final loss, parameters, timing, validation records (also ``train()``'s result)."""

    def after_train(self, loop: Loop) -> None:
        if not loop.completed:
            return
        loss = loop.loss_value() if isinstance(loop.loss, torch.Tensor) else loop.loss
        loop.summary.update({
            "steps": loop.step, "final_loss": loss, "parameters": count_parameters(loop.model),
            "data_wait_fraction": loop.wait_fraction, "seconds": loop.wait_seconds + loop.compute_seconds,
            "val": loop.records.get("val", []), "pretrained_features": loop.split.pretrained})
        write_json_atomic(loop.run / "summary.json", loop.summary)


class Curves(HookBase):
    """``curves.png``: the loss (and validation) curves of ``metrics.jsonl``."""

    def after_train(self, loop: Loop) -> None:
        if loop.completed:
            plot_curves(metrics_path=loop.run / "metrics.jsonl", out=loop.run / "curves.png",
                        pretrained=loop.split.pretrained)
