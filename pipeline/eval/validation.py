"""Validation during training: a hook of the training loop, supplied from the eval layer.

Training never imports evaluation; this module joins the two. With
``config.val_split`` set, :func:`train_and_validate` scores novel-class mIoU
and FB-IoU on that split of the vision cache every ``eval_every`` epochs (and
after the last), logs each score in ``metrics.jsonl`` and keeps them in the
run's summary.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.eval.evaluate import evaluate_split
from pipeline.train.config import TrainConfig
from pipeline.train.hooks import Hook, Loop, append_record
from pipeline.train.loop import train


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
    """:func:`pipeline.train.loop.train`, with validation on ``config.val_split`` when it is set (before ``hooks``)."""
    validation = [Validation()] if config.val_split else []
    return train(config=config, resume=resume, quiet=quiet, hooks=[*validation, *hooks])
