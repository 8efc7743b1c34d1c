"""What a study costs before it runs: ``fusioner sweep STUDY --estimate``.

GPU-hours = sum over the study's runs of (optimiser steps x seconds per step).
Steps come from each run's config and its store (samples per epoch of its fold);
seconds per step come, in this order, from

1. a measurement: the JSON line ``python -m pipeline.bench gpu`` printed on
   the GPU kind in question (``--timings FILE``; it holds the preset, the batch
   size and steps/s), scaled linearly to each run's batch size; or
2. a recorded projection: the preset's training FLOPs per sample (counted with
   ``torch.utils.flop_counter`` on clip-l-sized inputs, forward and backward)
   over the GPU kind's dense bf16 peak at an assumed 35 % utilisation.

Every line says which of the two it used. Projections are not measurements:
one ``bench gpu`` run on the target card replaces them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

# Training GFLOP per sample (forward + backward, 256 clip-l tokens, one class, 224 px output),
# counted with torch.utils.flop_counter.FlopCounterMode on the presets as they stand.
RECORDED_GFLOP = {"paper": 398.0, "small": 1.85, "tiny": 0.44}
# Dense bf16 peak TFLOP/s per GPU kind (vendor figures, no sparsity).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
ASSUMED_UTILISATION = 0.35


@dataclass
class StepCost:
    seconds: float  # per optimiser step at ``batch_size``
    batch_size: int
    source: str

    def at(self, batch_size: int) -> float:
        return self.seconds * batch_size / self.batch_size


def step_cost(*, preset: str, batch_size: int, gpu: str, timings: dict | None) -> StepCost:
    if timings and timings.get("preset") == preset and timings.get("steps_per_s"):
        return StepCost(seconds=1.0 / float(timings["steps_per_s"]), batch_size=int(timings["batch_size"]),
                        source=f"measured by bench gpu on {timings.get('machine', 'an unnamed machine')}")
    if gpu not in PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu}: recorded figures exist for {', '.join(PEAK_TFLOPS)}; "
                        f"pass --timings FILE (the JSON `python -m pipeline.bench gpu` printed) for others")
    if preset not in RECORDED_GFLOP:
        raise UserError(f"no recorded FLOPs for preset '{preset}'; pass --timings from `python -m pipeline.bench gpu`")
    seconds = RECORDED_GFLOP[preset] * 1e9 * batch_size / (PEAK_TFLOPS[gpu] * 1e12 * ASSUMED_UTILISATION)
    return StepCost(seconds=seconds, batch_size=batch_size,
                    source=f"projected: {RECORDED_GFLOP[preset]:g} GFLOP/sample at {ASSUMED_UTILISATION:.0%} "
                           f"of {gpu}'s {PEAK_TFLOPS[gpu]:g} TFLOP/s (not measured)")


def _samples(config: dict, memo: dict) -> int:
    """Training samples per epoch of a run: its fold's (view, classes) pairs in its store."""
    from pipeline.store.reader import open_split
    from pipeline.training.batches import training_pairs
    from pipeline.data.protocols import resolve_fold
    from pipeline.training.config import TrainConfig
    from pipeline.training.loop import training_split_name
    from pipeline.config import from_dict

    train = from_dict(TrainConfig, config)
    data = train.data
    key = (data.cache, data.split, data.protocol, data.fold, tuple(data.novel), data.classes_per_sample)
    if key not in memo:
        split = open_split(store=data.cache, split=training_split_name(data.cache, data.split))
        fold = resolve_fold(protocol=data.protocol, fold=data.fold, novel=data.novel, class_names=split.class_names)
        memo[key] = len(training_pairs(split=split, seen=fold.seen, classes_per_sample=data.classes_per_sample))
    return memo[key]


def estimate_study(*, runs: list, gpu: str, timings_file: Path | None = None) -> dict:
    """Per preset: runs, steps, seconds per step and its source, GPU-hours; and the total."""
    from pipeline.sweep.study import run_state

    timings = json.loads(Path(timings_file).read_text().strip().splitlines()[-1]) if timings_file else None
    rows: dict[str, dict] = {}
    memo: dict = {}
    for run in {r.key: r for r in runs}.values():
        optim, preset = run.config["optim"], run.config["preset"]
        steps = int(optim["epochs"]) * -(-_samples(run.config, memo) // int(optim["batch_size"]))
        if optim.get("max_steps"):
            steps = min(steps, int(optim["max_steps"]))
        cost = step_cost(preset=preset, batch_size=int(optim["batch_size"]), gpu=gpu, timings=timings)
        row = rows.setdefault(preset, {"runs": 0, "done": 0, "steps": 0, "seconds": 0.0, "todo_seconds": 0.0,
                                       "source": cost.source, "seconds_per_step": cost.at(int(optim["batch_size"]))})
        seconds = steps * cost.at(int(optim["batch_size"]))
        done = run_state(run.dir) == "done"
        row["runs"] += 1
        row["done"] += done
        row["steps"] += steps
        row["seconds"] += seconds
        row["todo_seconds"] += 0.0 if done else seconds
    total = sum(r["seconds"] for r in rows.values()) / 3600
    todo = sum(r["todo_seconds"] for r in rows.values()) / 3600
    return {"gpu": gpu, "presets": rows, "gpu_hours": total, "gpu_hours_left": todo}


def format_estimate(estimate: dict, *, study_name: str) -> str:
    lines = [f"study {study_name} on {estimate['gpu']}:",
             "| preset | runs (done) | steps | s/step | GPU-hours | seconds per step from |", "|---|---|---|---|---|---|"]
    for preset, row in estimate["presets"].items():
        lines.append(f"| {preset} | {row['runs']} ({row['done']}) | {row['steps']:,} | {row['seconds_per_step']:.4f} "
                     f"| {row['seconds'] / 3600:,.1f} | {row['source']} |")
    lines.append(f"total: {estimate['gpu_hours']:,.1f} GPU-hours ({estimate['gpu_hours_left']:,.1f} for runs not done)")
    return "\n".join(lines)
