"""Validation during training: a hook of the training loop, supplied from the eval layer.

Training never imports evaluation; this module joins the two. With
``config.val_split`` set, :func:`train_and_validate` scores novel-class mIoU
and FB-IoU on that split of the vision cache every ``eval_every`` epochs (and
after the last), logs each score in ``metrics.jsonl`` and keeps them in the
run's summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import load_file, to_dict
from pipeline.eval.evaluate import evaluate_split
from pipeline.training.config import TrainConfig, build_config
from pipeline.training.hooks import Hook, Loop, append_record
from pipeline.training.loop import train


class Validation:
    """After the epochs that ``eval_every`` picks, score ``val_split`` and record it."""

    def after_epoch(self, loop: Loop) -> None:
        config = loop.config
        epochs = config.optim.epochs
        if not (loop.epoch % config.eval_every == 0 or loop.epoch == epochs):
            return
        result = evaluate_split(model=loop.model, vision_cache=config.data.cache, text_cache=config.data.text_store,
                                split=config.val_split, protocol=config.data.protocol, fold=config.data.fold,
                                novel_names=config.data.novel, splits_dir=config.splits_dir, device=loop.device,
                                quiet=True)
        val = {"miou": result["miou"], "fb_iou": result["fb_iou"], "episodes": result["episodes"]}
        loop.records.setdefault("val", []).append({"epoch": loop.epoch, **val})
        append_record(loop.run / "metrics.jsonl", {"event": "val", "epoch": loop.epoch, "step": loop.step, **val})


def train_and_validate(*, config: TrainConfig, resume: bool = False, quiet: bool = False,
                       hooks: Sequence[Hook] = ()) -> dict:
    """:func:`pipeline.training.loop.train`, with validation on ``config.val_split`` when it is set (before ``hooks``)."""
    validation = [Validation()] if config.val_split else []
    return train(config=config, resume=resume, quiet=quiet, hooks=[*validation, *hooks])


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
    notes = [] if summary["pretrained_features"] else [
        "note: trained on random-init features; numbers are a pipeline check, not a result"]
    return TrainOutcome(config=to_dict(config), summary=summary, notes=notes)
