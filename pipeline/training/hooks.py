"""Hooks keep the training loop short: what happens around steps and epochs, one class each.

A hook has up to four methods, ``before_train``, ``after_step``,
``after_epoch`` and ``after_train``, each taking the :class:`Loop` (the run's
state). The loop calls them in order; a hook may read the state, write files,
or add records (``loop.records["val"]``) that end up in the summary. The
built-in ones log metrics, write checkpoints and draw the progress bar;
validation, which needs the eval layer, is passed in from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from pipeline.model import count_parameters
from pipeline.runtime import progress
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
    loss: float = float("nan")
    lr: float = 0.0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    records: dict = field(default_factory=dict)
    forward: Any = None  # the compiled model when config.compile, else None (call the model itself)

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


class Hook(Protocol):
    """Any subset of the four methods; missing ones are skipped."""


def run_hooks(hooks: Sequence[Hook], event: str, loop: Loop) -> None:
    for hook in hooks:
        method = getattr(hook, event, None)
        if method is not None:
            method(loop)


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


CURVE_POINTS = 20  # a loss curve needs about this many points: shorter runs log more often than log_every


def log_interval(*, log_every: int, total_steps: int) -> int:
    """Steps between loss records: ``log_every``, or fewer when the run has too few steps for ~20 points."""
    return min(log_every, max(1, total_steps // CURVE_POINTS))


class MetricsLog:
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
            append_record(self.path, {"step": loop.step, "epoch": loop.epoch, "loss": loop.loss, "lr": loop.lr,
                                      "data_wait_fraction": loop.wait_fraction})


class Checkpointer:
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


class ProgressBar:
    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def before_train(self, loop: Loop) -> None:
        self.bar = progress(total=loop.total_steps, desc="train", quiet=self.quiet, unit="step", initial=loop.step)

    def after_step(self, loop: Loop) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loop.loss:.4f}", epoch=loop.epoch, refresh=False)

    def after_train(self, loop: Loop) -> None:
        self.bar.close()
