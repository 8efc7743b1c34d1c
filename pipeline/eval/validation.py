"""Validation during training: a hook of the training loop, supplied from the eval layer.

Training never imports evaluation; this module joins the two. With
``config.val_split`` set, :func:`train_and_validate` scores novel-class mIoU
and FB-IoU on that split of the vision cache every ``eval_every`` epochs (and
after the last), logs each score in ``metrics.jsonl`` and keeps them in the
run's summary.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pipeline.config import load_file, to_dict, write_json_atomic
from pipeline.errors import UserError
from pipeline.eval.evaluate import evaluate_split
from pipeline.training.config import TrainConfig, build_config
from pipeline.training.hooks import Hook, Loop, append_record
from pipeline.training.loop import train


class Validation:
    """After the epochs that ``eval_every`` picks, score ``val_split`` and record it."""

    def validation_splits_dir(self, config: TrainConfig) -> str | None:
        return config.splits_dir

    def after_epoch(self, loop: Loop) -> None:
        config = loop.config
        epochs = config.optim.epochs
        if not (loop.epoch % config.eval_every == 0 or loop.epoch == epochs):
            return
        result = evaluate_split(model=loop.model, vision_cache=config.data.cache, text_cache=config.data.text_store,
                                split=config.val_split, protocol=config.data.protocol, fold=config.data.fold,
                                novel_names=config.data.novel, splits_dir=self.validation_splits_dir(config),
                                device=loop.device,
                                quiet=True)
        val = {"miou": result["miou"], "fb_iou": result["fb_iou"], "episodes": result["episodes"]}
        loop.records.setdefault("val", []).append({"epoch": loop.epoch, **val})
        append_record(loop.run / "metrics.jsonl", {"event": "val", "epoch": loop.epoch, "step": loop.step, **val})


def check_disjoint_validation(config: TrainConfig) -> None:
    """best-val selection needs a validation split that shares no image with the test episodes."""
    from pipeline.data.protocols import load_episodes, protocol_entry
    from pipeline.store.reader import open_split

    if not config.val_split:
        raise UserError("select best-val needs val_split (a split of the cache disjoint from the test episodes)")
    if not config.test_lists or protocol_entry(config.data.protocol).episode_list is None:
        raise UserError("select best-val needs test_lists (the splits folder of the test episodes) and a protocol "
                        "with episode lists, to prove the validation split shares no image with them")
    test = {e.image_id for e in load_episodes(protocol=config.data.protocol, fold=config.data.fold,
                                              splits_dir=Path(config.test_lists))}
    shared = sorted(test & set(open_split(store=config.data.cache, split=config.val_split).image_ids))
    if shared:
        raise UserError(f"select best-val: {len(shared)} image(s) of val_split {config.val_split} are test episode "
                        f"images of {config.test_lists} (first: {shared[0]}); validate on a split disjoint from them")


class BestValidation(Validation):
    """Validation that keeps the weights of the best validation mIoU (``select: best-val``)."""

    def before_train(self, loop: Loop) -> None:
        check_disjoint_validation(loop.config)
        record = loop.run / "selection.json"
        self.best = json.loads(record.read_text()) if loop.resumed and record.is_file() else None

    def validation_splits_dir(self, config: TrainConfig) -> None:
        return None  # episodes derived from the validation split's masks, never the test lists

    def after_epoch(self, loop: Loop) -> None:
        before = len(loop.records.get("val", []))
        super().after_epoch(loop)
        records = loop.records.get("val", [])
        if len(records) == before or (self.best and records[-1]["miou"] <= self.best["val_miou"]):
            return
        state = {k: v.detach().cpu().contiguous() for k, v in loop.model.state_dict().items()}
        save_file(state, str(loop.run / "model_best.safetensors"), metadata={"format": "fusioner"})
        self.best = {"rule": "best-val", "val_split": loop.config.val_split, "epoch": loop.epoch,
                     "step": loop.step, "val_miou": records[-1]["miou"]}
        write_json_atomic(loop.run / "selection.json", self.best)


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


def train_and_validate(*, config: TrainConfig, resume: bool = False, quiet: bool = False,
                       hooks: Sequence[Hook] = ()) -> dict:
    """:func:`pipeline.training.loop.train`, with validation on ``config.val_split`` when it is set (before ``hooks``).

    ``config.select == "best-val"`` reports the weights of the best validation score instead of the final ones.
    """
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
    notes = [] if summary["pretrained_features"] else [
        "note: trained on random-init features; numbers are a pipeline check, not a result"]
    return TrainOutcome(config=to_dict(config), summary=summary, notes=notes)
