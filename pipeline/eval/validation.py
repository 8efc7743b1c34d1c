"""Validation during training: hooks of the training loop, supplied from the eval layer.

Training never imports evaluation; these hooks carry evaluation into the loop
(:mod:`pipeline.runs` composes the two). With ``config.val_split`` set,
:class:`Validation` scores novel-class mIoU and FB-IoU on that split of the
vision cache every ``eval_every`` epochs (and after the last), logs each score
in ``metrics.jsonl`` and keeps them in the run's summary; :class:`BestValidation`
also keeps the weights of the best score.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from pipeline.config import write_json_atomic
from pipeline.errors import UserError
from pipeline.eval.evaluate import evaluate_split
from pipeline.training.config import TrainConfig
from pipeline.training.hooks import HookBase, Loop, append_record


class Validation(HookBase):
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
