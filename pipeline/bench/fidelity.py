"""``python -m pipeline.bench fidelity``: two fidelity choices measured on a CPU, behind docs/training.md.

1. Precision of the store: the store keeps float16 features where the released code keeps the
   encoder's float32 ones. Re-encode an evaluation split in float32 and compare: the features'
   relative error and cosine, then one trained model's logits, pixel decisions and mIoU on the
   float32 features against the stored float16 ones.
2. Initialisation of the class-type embedding and output projections: train the same model with
   ``model.fusion.init`` ``product`` and ``released`` (same seed, data and steps) and compare loss
   and mIoU.

Random-init encoders (no pretrained weights here) on real photos: the figures say whether a choice
moves the numbers of this pipeline, not what it does to the paper's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import work_folder

FOLD, MIN_PIXELS = 0, 256


def _extract(*, data_root: Path, out: Path, size: int) -> None:
    from pipeline.encode.extract import extract
    from pipeline.encode.plan import ExtractConfig

    base = dict(backbone="clip-b", out=str(out), dataset="folder", data_root=str(data_root), input_size=size,
                random_init=True, device="cpu")
    extract(config=ExtractConfig(**base, split="train", views=1), quiet=True)
    extract(config=ExtractConfig(**base, split="val", eval_resize=True, vision_only=True), quiet=True)


def _train(*, store: Path, out: Path, init: str, epochs: int) -> dict:
    from pipeline.training.config import build_config
    from pipeline.training.loop import train

    config = build_config(preset="small", overrides={
        "data.cache": str(store), "data.split": "folder/train", "data.protocol": "coco20i", "data.fold": FOLD,
        "optim.epochs": epochs, "optim.warmup_epochs": 1, "optim.batch_size": 16, "model.fusion.init": init,
        "out": str(out)})
    return train(config=config, quiet=True)


def _score(*, model, store: Path, features_fp32: bool, size: int) -> dict:
    from pipeline.encode.families import create_encoder
    from pipeline.encode.text import class_embeddings
    from pipeline.eval.metrics import SegmentationMeter
    from pipeline.store.reader import open_split
    from pipeline.data.protocols import resolve_fold

    split = open_split(store=store, split="folder/val")
    fold = resolve_fold(protocol="coco20i", fold=FOLD, novel=None, class_names=split.class_names)
    text = torch.from_numpy(class_embeddings(text_store=str(store), names=split.class_names))
    stored = torch.from_numpy(split.features(slice(None)).astype(np.float32))  # [N, hw, D] float16 -> 32
    masks = split.masks(slice(None))
    if features_fp32:
        from pipeline.data.registry import create_dataset
        from pipeline.data.views import resize_image

        meta = split.group.attrs["meta"]
        encoder = create_encoder("clip-b", text=False, random_init=True, input_size=size).vision
        encoder.use_normalization(mean=meta["normalize"]["mean"], std=meta["normalize"]["std"])
        dataset = create_dataset("folder", root=meta["dataset"]["root"], split="val")
        images = np.stack([resize_image(dataset.load(int(i)).image, size) for i in split.view_image])
        with torch.inference_mode():
            exact = torch.cat([encoder.encode(images[i:i + 16]) for i in range(0, len(images), 16)])
    meter = SegmentationMeter(list(fold.novel))
    logits_all = []
    with torch.inference_mode():
        for view in range(split.num_views):
            present = [c for c in fold.novel if (masks[view] == c).sum() >= MIN_PIXELS]
            if not present:
                continue
            feats = (exact if features_fp32 else stored)[view:view + 1]
            logits = model(feats, text[[c - 1 for c in present]], grid=split.grid)[0]  # [C, S, S]
            logits_all.append(logits)
            for row, c in enumerate(present):
                target = np.where(masks[view] == 255, 255, masks[view] == c).astype(np.uint8)
                meter.update(pred=(logits[row] > 0).numpy(), target=target, class_id=c)
    result = {"miou": 100 * meter.miou(), "episodes": meter.episodes, "logits": torch.cat(
        [x.flatten() for x in logits_all])}
    if features_fp32:
        rel = (stored - exact).norm(dim=-1) / exact.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(stored, exact, dim=-1)
        result.update(feature_rel_error_max=float(rel.max()), feature_rel_error_median=float(rel.median()),
                      feature_cosine_min=float(cos.min()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/coco128"))
    parser.add_argument("--work", type=Path, default=None, help="kept work folder (default: a temporary one)")
    parser.add_argument("--size", type=int, default=64, help="encoder input size (px)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    from pipeline.training.checkpoints import load_model

    torch.manual_seed(0)
    with work_folder(args.work, prefix="fusioner-fidelity-") as work:
        store = work / "clip-b"
        if not (store / "zarr.json").is_file():
            _extract(data_root=args.data_root, out=store, size=args.size)
        report: dict = {"init": {}}
        for init in ("product", "released"):
            run = work / f"run-{init}"
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else \
                _train(store=store, out=run, init=init, epochs=args.epochs)
            model, _ = load_model(run)
            scored = _score(model=model, store=store, features_fp32=False, size=args.size)
            report["init"][init] = {"final_loss": round(summary["final_loss"], 4), "steps": summary["steps"],
                                    "miou": round(scored["miou"], 2), "episodes": scored["episodes"]}
        model, _ = load_model(work / "run-product")
        half = _score(model=model, store=store, features_fp32=False, size=args.size)
        full = _score(model=model, store=store, features_fp32=True, size=args.size)
        diff = (half["logits"] - full["logits"]).abs()
        report["precision"] = {
            "feature_rel_error_median": full["feature_rel_error_median"],
            "feature_rel_error_max": full["feature_rel_error_max"], "feature_cosine_min": full["feature_cosine_min"],
            "logit_abs_diff_max": float(diff.max()), "pixels_flipped": float(
                ((half["logits"] > 0) != (full["logits"] > 0)).float().mean()),
            "miou_fp16_store": round(half["miou"], 3), "miou_fp32_features": round(full["miou"], 3)}
        print(json.dumps(report, indent=2))
    return 0
