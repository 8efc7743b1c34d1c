"""Stage-two benchmark: what does training from the cache save over running the encoder online?

One process, the same batches for both ways, the same model preset:

(a) ``cached``: the step ``fusioner train`` takes: the loader reads the
    batch's features and masks from the cache in a prefetch thread, the model
    does forward, backward and an optimiser step. ``data wait`` is the share
    of the step spent blocked on the loader (goal: at most 5%).
(b) ``online``: the released code's step: decode each sample's image, render
    its view (crop, resize, flip, jitter), run the frozen encoder under
    ``inference_mode``, then the same model step, on targets from the
    rendered masks. The views are the cached ones, so the features it computes
    are compared with the cache (they differ only by float16 rounding).

Then the cost of one (image, class) pair under ``classes_per_sample`` "1"
(one pair per sample, as released) and "all" (every seen class of a view in
one sample, the paper's W): the decoder runs once per sample, so "all" shares
it among the classes.

    python -m pipeline.bench_train --steps 5 --batch-size 16 --backbone clip-b --preset small

Without ``--data-root`` it generates 480 x 640 JPEGs of shapes (6 classes);
with it, it takes the first ``--images`` of a folder-layout dataset.
Encoder weights are random-init: the timings do not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import work_folder
from pipeline.data.registry import create_dataset
from pipeline.data.augment import view_numbers
from pipeline.data.views import ViewParams
from pipeline.encode.extract import extract
from pipeline.encode.families import create_encoder
from pipeline.encode.config import ExtractConfig
from pipeline.encode.registry import get_spec
from pipeline.encode.shards import planned_view
from pipeline.errors import run_entry
from pipeline.model import build_model
from pipeline.runtime import machine
from pipeline.training.batches import Batch, binary_targets
from pipeline.training.config import TrainConfig, build_config
from pipeline.training.loop import prepare_data
from pipeline.training.losses import binary_segmentation_loss


@dataclass
class Setup:
    config: TrainConfig
    dataset: object
    extract_seconds: float
    views: int


def make_cache(*, work: Path, data_root: Path | None, images: int, backbone: str, preset: str,
               text_cache: str | None) -> Setup:
    """Data (generated unless given), a vision store at the encoder's native size, the training config."""
    if data_root is None:
        from pipeline.data.synthetic import make_shapes_dataset

        data_root = make_shapes_dataset(out=work / "data", count=images, size=(480, 640))
    ids = sorted(p.stem for p in (data_root / "images").iterdir()
                 if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:images]
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    options = {"list_file": str(work / "ids.txt")}
    config = ExtractConfig(backbone=backbone, out=str(work / "cache"), dataset="folder", data_root=str(data_root),
                           dataset_options=options, views=1, random_init=True, vision_only=text_cache is not None,
                           device="cpu")
    start = time.perf_counter()
    report = extract(config=config, quiet=True)
    seconds = time.perf_counter() - start
    dataset = create_dataset("folder", root=data_root, split="train", **options)
    overrides = {"data.cache": str(work / "cache"), "data.protocol": "custom",
                 "data.novel": [dataset.class_names[-1]], "out": str(work / "run"), "device": "cpu"}
    if text_cache:
        overrides["data.text_cache"] = str(text_cache)
    train_config = build_config(preset=preset, overrides=overrides)
    return Setup(config=train_config, dataset=dataset, extract_seconds=seconds, views=report.views)


def batch_stream(*, source, count: int):
    """``count`` batches of a training batch source in training order, running into the next epochs."""
    made, epoch = 0, 0
    while made < count:
        for batch in source.batches(epoch=epoch):
            yield batch
            made += 1
            if made == count:
                return
        epoch += 1


def prepared_with(config: TrainConfig, *, batch_size: int, read_mode: str = "memory"):
    """What ``train`` trains on, for this batch size and read mode."""
    config = copy.deepcopy(config)
    config.optim.batch_size, config.data.read_mode = batch_size, read_mode
    return prepare_data(config)


def fresh_model(config: TrainConfig, prepared):
    """The model ``train`` would build for this cache, same seed every time, and its optimiser."""
    model_config = copy.deepcopy(config.model)
    model_config.vision_dim = int(prepared.split.group["features"].shape[2])
    model_config.text_dim = int(prepared.text.shape[1])
    model_config.decoder.out_size = prepared.split.input_size
    torch.manual_seed(config.seed)
    model = build_model(model_config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)


def model_step(model, optimizer, *, features, text, text_mask, targets, grid) -> float:
    """Forward, class-wise BCE, backward and an optimiser step, as in ``train``."""
    logits = model(features, text, grid=grid, text_mask=text_mask)  # [B, C, S, S]
    loss = binary_segmentation_loss(logits.float(), targets, text_mask=text_mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class CachedSteps:
    """(a): training steps fed by the run's batch source (memory or stream) in its prefetch thread."""

    def __init__(self, *, prepared, config: TrainConfig, count: int):
        self.prepared = prepared
        self.model, self.optimizer = fresh_model(config, prepared)
        self.batches = batch_stream(source=prepared.source, count=count)

    def step(self) -> dict:
        start = time.perf_counter()
        batch = next(self.batches)
        got = time.perf_counter()
        features, text, text_mask, targets = batch.to_device(torch.device("cpu"))
        model_step(self.model, self.optimizer, features=features, text=text, text_mask=text_mask,
                   targets=targets, grid=self.prepared.split.grid)
        done = time.perf_counter()
        return {"step_s": done - start, "wait_s": got - start, "pairs": int(text_mask.sum())}


class OnlineSteps:
    """(b): decode + render, frozen encoder forward, the same model step; on (a)'s batches.

    The batch list comes from the cache only as a plan (views, classes, text rows);
    targets are rebuilt from the rendered masks and compared with the cached ones.
    """

    def __init__(self, *, prepared, config: TrainConfig, dataset, backbone: str, count: int):
        self.prepared, self.config, self.dataset = prepared, config, dataset
        self.encoder = create_encoder(backbone, text=False, random_init=True, input_size=prepared.split.input_size,
                                      device="cpu").vision
        self.jitter = np.asarray(prepared.split.group["view_jitter"][:])  # [N, 4], read once like the plan arrays
        self.model, self.optimizer = fresh_model(config, prepared)
        self.batches = batch_stream(source=prepared.source, count=count)
        self.feature_error, self.target_mismatches = 0.0, 0

    def step(self) -> dict:
        batch = next(self.batches)  # the plan; not timed
        start = time.perf_counter()
        images, masks = render_batch(batch=batch, split=self.prepared.split, jitter=self.jitter, dataset=self.dataset)
        targets, valid = binary_targets(masks=masks, classes=batch_classes(batch, self.prepared.text),
                                        width=batch.targets.shape[1], novel=tuple(self.prepared.fold.novel),
                                        novel_pixels=self.config.data.novel_pixels)
        rendered = time.perf_counter()
        features = self.encoder.encode(images)  # [B, h*w, D], under inference_mode
        encoded = time.perf_counter()
        model_step(self.model, self.optimizer, features=features.clone(), text=batch.text,
                   text_mask=torch.from_numpy(valid), targets=torch.from_numpy(targets), grid=self.prepared.split.grid)
        done = time.perf_counter()
        self.feature_error = max(self.feature_error, float((features - batch.features.float()).abs().max()))
        self.target_mismatches += int(not np.array_equal(targets, batch.targets.numpy()))
        return {"render_s": rendered - start, "encode_s": encoded - rendered, "model_s": done - encoded,
                "step_s": done - start}


def render_batch(*, batch: Batch, split, jitter: np.ndarray, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Decode each sample's image and render its view, as a data loader of the online recipe does."""
    size, meta, numbers = split.input_size, split.group.attrs["meta"], view_numbers(split.view_image)
    images = np.zeros((len(batch.views), size, size, 3), np.uint8)
    masks = np.zeros((len(batch.views), size, size), np.uint8)
    for b, view in enumerate(batch.views):
        record = dataset.load(int(split.view_image[view]))
        params = ViewParams(box=tuple(int(v) for v in split.view_box[view]), flip=bool(split.view_flip[view]),
                            jitter=tuple(float(v) for v in jitter[view]))
        images[b], masks[b] = planned_view(record, meta=meta, kind=split.kind, image_index=int(split.view_image[view]),
                                           view_number=int(numbers[view]), params=params, size=size)
    return images, masks


def batch_classes(batch: Batch, text: np.ndarray) -> list[tuple[int, ...]]:
    """The class values of each sample's real slots: its text rows are exact copies of rows of ``text``."""
    out = []
    for b in range(len(batch.views)):
        rows = batch.text[b][batch.text_mask[b]].numpy()  # [c, Dt]
        out.append(tuple(int(np.flatnonzero((text == row).all(axis=1))[0]) + 1 for row in rows))
    return out


def interleave(runners: dict, *, steps: int, warmup: int) -> dict[str, list[dict]]:
    """Step each runner in turn, so a machine whose load drifts slows them alike; warm-up steps dropped."""
    records = {name: [] for name in runners}
    for number in range(warmup + steps):
        for name, runner in runners.items():
            record = runner.step()
            if number >= warmup:
                records[name].append(record)
    return records


def mean(records: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in records]))


def loader_wait(*, config: TrainConfig, batch_size: int, steps: int, warmup: int, read_mode: str) -> dict:
    """Consecutive cached steps (nothing in between), as in ``train``: step time and share spent waiting."""
    prepared = prepared_with(config, batch_size=batch_size, read_mode=read_mode)
    runner = CachedSteps(prepared=prepared, config=config, count=steps + warmup)
    records = interleave({"a": runner}, steps=steps, warmup=warmup)["a"]
    return {"step_s": mean(records, "step_s"),
            "wait_fraction": sum(r["wait_s"] for r in records) / sum(r["step_s"] for r in records)}


def pair_costs(*, config: TrainConfig, batch_size: int, steps: int, warmup: int) -> dict:
    """Cached step time and time per (image, class) pair for classes_per_sample "1" and "all", interleaved."""
    runners, prepared = {}, {}
    for mode in ("1", "all"):
        mode_config = copy.deepcopy(config)
        mode_config.data.classes_per_sample = mode
        prepared[mode] = prepared_with(mode_config, batch_size=batch_size)
        runners[mode] = CachedSteps(prepared=prepared[mode], config=mode_config, count=steps + warmup)
    records = interleave(runners, steps=steps, warmup=warmup)
    out = {}
    for mode, rows in records.items():
        samples = prepared[mode].samples
        step_s = mean(rows, "step_s")
        out[mode] = {"step_s": step_s, "pairs_per_step": mean(rows, "pairs"),
                     "ms_per_pair": 1000 * step_s / mean(rows, "pairs"), "samples_per_epoch": len(samples),
                     "pairs_per_epoch": sum(len(classes) for _, classes in samples),
                     "epoch_s": -(-len(samples) // batch_size) * step_s}
    return out


def run(*, steps: int, batch_size: int, backbone: str, preset: str, data_root: Path | None, images: int,
        text_cache: str | None, warmup: int, pair_steps: int, work: Path) -> dict:
    spec = get_spec(backbone)
    setup = make_cache(work=work, data_root=data_root, images=images, backbone=backbone, preset=preset,
                       text_cache=text_cache)
    prepared = prepared_with(setup.config, batch_size=batch_size)
    load_before = os.getloadavg()[0]
    wait = {mode: loader_wait(config=setup.config, batch_size=batch_size, steps=steps, warmup=warmup,
                              read_mode=mode) for mode in ("memory", "stream")}
    count = steps + warmup
    online_runner = OnlineSteps(prepared=prepared, config=setup.config, dataset=setup.dataset, backbone=backbone,
                                count=count)
    cached_runner = CachedSteps(prepared=prepared_with(setup.config, batch_size=batch_size), config=setup.config,
                                count=count)
    both = interleave({"cached": cached_runner, "online": online_runner}, steps=steps, warmup=warmup)
    cached = {"step_s": mean(both["cached"], "step_s"), "pairs_per_step": mean(both["cached"], "pairs")}
    online = {key: mean(both["online"], key) for key in ("render_s", "encode_s", "model_s", "step_s")}
    online.update(max_feature_diff=online_runner.feature_error, target_mismatches=online_runner.target_mismatches)
    pairs = pair_costs(config=setup.config, batch_size=batch_size, steps=pair_steps, warmup=warmup)
    return {"machine": machine(), "load_average": [load_before, os.getloadavg()[0]], "backbone": backbone,
            "input_size": prepared.split.input_size, "native_input_size": spec.input_size,
            "grid": list(prepared.split.grid), "preset": preset, "weights": "random-init", "batch_size": batch_size,
            "steps": steps, "views": setup.views, "extract_s_per_view": setup.extract_seconds / setup.views,
            "wait": wait, "cached": cached, "online": online, "speedup": online["step_s"] / cached["step_s"],
            "speedup_without_decode": (online["encode_s"] + online["model_s"]) / cached["step_s"],
            "pairs": pairs}


def table(result: dict) -> str:
    c, o, w, p = result["cached"], result["online"], result["wait"], result["pairs"]
    lines = [
        f"machine: {result['machine']}; 1-min load average {result['load_average'][0]:.1f} -> "
        f"{result['load_average'][1]:.1f}",
        f"{result['backbone']} ({result['weights']}) at {result['input_size']} px, grid "
        f"{result['grid'][0]}x{result['grid'][1]}, preset {result['preset']}, batch {result['batch_size']}, "
        f"{result['steps']} timed steps per measurement",
        "",
        "| training step | s/step | parts |",
        "|---|---|---|",
        f"| (a) from the cache | {c['step_s']:.3f} | loader in a prefetch thread + model fwd/bwd/step |",
        f"| (b) encoder online | {o['step_s']:.3f} | decode+render {o['render_s']:.3f}, encoder "
        f"{o['encode_s']:.3f}, model {o['model_s']:.3f} |",
        "",
        f"speedup (b)/(a), steps interleaved: {result['speedup']:.1f}x "
        f"({result['speedup_without_decode']:.1f}x if decoding were free); "
        f"one-off extraction {result['extract_s_per_view']:.3f} s/view",
        f"online features vs cache: max |diff| {o['max_feature_diff']:.2e} (float16 rounding); "
        f"targets differing in {o['target_mismatches']} batches",
        f"(a) alone, waiting for data: memory {100 * w['memory']['wait_fraction']:.1f}% of "
        f"{w['memory']['step_s']:.3f} s/step; stream {100 * w['stream']['wait_fraction']:.1f}% of "
        f"{w['stream']['step_s']:.3f} s/step",
        "",
        "| classes_per_sample | pairs/step | s/step | ms/pair | samples/epoch | pairs/epoch | s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in p.items():
        lines.append(f"| {mode} | {row['pairs_per_step']:.1f} | {row['step_s']:.3f} | {row['ms_per_pair']:.1f} | "
                     f"{row['samples_per_epoch']} | {row['pairs_per_epoch']} | {row['epoch_s']:.1f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of (a) and (b), after --warmup")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="clip-b", help="vision encoder (runs at its native input size)")
    parser.add_argument("--preset", default="small", help="model preset: paper, small, tiny")
    parser.add_argument("--data-root", type=Path, default=None, help="folder-layout dataset (default: generated)")
    parser.add_argument("--images", type=int, default=48, help="images taken from the dataset")
    parser.add_argument("--text-cache", default=None, help="text store (default: the backbone's text tower)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--pair-steps", type=int, default=6, help="timed cached steps per classes_per_sample")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--work", type=Path, default=None, help="keep the data and cache here (default: temporary)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with work_folder(args.work, prefix="bench-train-") as work:
        result = run(steps=args.steps, batch_size=args.batch_size, backbone=args.backbone, preset=args.preset,
                     data_root=args.data_root, images=args.images, text_cache=args.text_cache, warmup=args.warmup,
                     pair_steps=args.pair_steps, work=work)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
