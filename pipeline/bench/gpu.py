"""The one GPU check: ``python -m pipeline.bench gpu`` prints one JSON line.

No network, random-init weights, everything generated in a temporary folder:

1. 3000 PASCAL-sized (500 x 375) JPEGs of shapes;
2. the vision tower's pure forward rate (uint8 views already in pinned host
   memory, the same batch size), then the extraction of 4 views per training
   image into a shuffled-layout store (render processes, pinned memory, bf16,
   shard writers), timed from its first shard to its last write (the encoder
   build and the class-name embeddings excluded): ``extract_over_forward`` =
   forward rate / extraction rate (target on a GPU: <= 1.10);
3. the paper preset trained for ``--steps`` steps streaming from that store
   (``read_mode=stream``): steps/s, samples/s, data wait % (target <= 5 %),
   peak GPU memory and GPU utilisation sampled while it trains;
4. windowed evaluation of the held-out shapes on the validation images;
5. the extraction of stage 2 taken apart (``extract_stages``): seconds the encoder waited for
   rendered shards, encoded, and waited for the shard writers, and the writers' busy time;
6. ``steps_compared``: 20 steps of the preset profiled with ``torch.profiler`` (top operators by GPU time
   and their share), then timed: samples/s, achieved TFLOP/s (counted FLOPs per sample) and its
   fraction of the card's dense bf16 peak; and the same preset trained online (fresh
   augmentations through the frozen encoder at every step) timed alike, with the ratio;
7. ``packed``: 1, 2 and 4 runs of the small preset trained at once as separate processes on the
   one card: samples/s per GPU for each count.

Stage 6 or 7 failing, or not started for want of ``--budget`` time, leaves ``{"error": ...}``
in its field and the exit code 1; the other figures are still printed. Sized to finish in
about 5 minutes on one H100-class GPU with the defaults, well under 8 (``stage_seconds`` says
where the time went; projected, not yet measured).
``--tiny`` runs the same stages at a size a CPU finishes in a minute or two
(the test suite runs it); its rates say nothing about a GPU.

    python -m pipeline.bench gpu                      # on the GPU machine
    python -m pipeline.bench gpu --tiny --device cpu  # the pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import work_folder
from pipeline.bench.gpu_stages import online_against_cached, train_overrides
from pipeline.bench.packed import packed_runs
from pipeline.bench.steps import device_name
from pipeline.runtime import load_average, machine, resolve_device

FULL = {"images": 3000, "backbone": "clip-l", "input_size": None, "steps": 300, "batch_size": 32,
        "extract_batch": 256, "preset": "paper", "render_workers": min(12, max(1, (os.cpu_count() or 2) - 2)),
        "val_images": 64, "forward_views": 2048, "image_size": (375, 500), "views": 4,
        "step_warm": 20, "profile_steps": 20, "step_timed": 100,
        "packed_preset": "small", "packed_warm": 20, "packed_timed": 300, "packed_threads": None, "packed_timeout": 180}
TINY = {"images": 10, "backbone": "test-vit", "input_size": 32, "steps": 3, "batch_size": 4,
        "extract_batch": 8, "preset": "tiny", "render_workers": 0, "val_images": 3, "forward_views": 16,
        "image_size": (48, 64), "views": 1, "step_warm": 2, "profile_steps": 3, "step_timed": 4,
        "packed_preset": "tiny", "packed_warm": 2, "packed_timed": 3, "packed_threads": 1, "packed_timeout": 120}
PACKED = (1, 2, 4)
BUDGET_S = 300  # the full check's default --budget: the JSON in about 5 minutes, time for a rerun on a lent card
STEPS_NEED_S = 60  # the profiled and online runs need about this much of it on an H100-class card


class GpuSampler:
    """GPU utilisation (%) sampled every 0.5 s in a thread while a stage runs (None without NVML/nvidia-smi)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.stop = device, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - pynvml missing: ask nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"--id={self.device.index or 0}"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except Exception:  # noqa: BLE001
                return None

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self):
        if self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def forward_rate(*, backbone: str, input_size: int | None, views: int, batch_size: int, device) -> float:
    """Views/s of the vision tower alone on uint8 views already in pinned host memory."""
    from pipeline.encode.families import create_encoder

    vision = create_encoder(backbone, text=False, random_init=True, input_size=input_size, device=device).vision
    size = vision.input_size
    images = torch.randint(0, 256, (views, size, size, 3), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    vision.encode(images[:batch_size], dtype=torch.float16)  # warm-up: kernels, cuDNN choices
    _sync(device)
    start = time.perf_counter()
    for begin in range(0, views, batch_size):
        vision.encode(images[begin:begin + batch_size], dtype=torch.float16).to("cpu", non_blocking=True)
    _sync(device)
    return views / (time.perf_counter() - start)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _extract(*, work: Path, root: Path, lists, size: dict, device: torch.device):
    from pipeline.encode.extract import extract
    from pipeline.encode.config import ExtractConfig

    base = dict(backbone=size["backbone"], out=str(work / "cache"), dataset="folder", data_root=str(root),
                input_size=size["input_size"], random_init=True, device=str(device), batch_size=size["extract_batch"],
                render_workers=size["render_workers"], writers=2)
    report = extract(config=ExtractConfig(**base, split="train", views=size["views"], layout="shuffled",
                                          dataset_options={"list_file": str(lists[0])}), quiet=True)
    extract(config=ExtractConfig(**base, split="val", dataset_options={"list_file": str(lists[1])}), quiet=True)
    return report


def extraction_parts(stages: dict, *, views: int, seconds: float, forward: float) -> dict:
    """Where the training split's extraction spent its seconds, and which part limits it.

    The encoder's thread either waits for a rendered shard, augments its views on the device
    (``extract --augment-backend gpu``; 0 otherwise), encodes, or waits for a free writer; the
    largest is the limit. ``encode_over_forward`` compares the
    in-extraction encode rate with the pure forward rate (upload and download included).
    """
    render = stages["first_render_wait"] + stages["render_wait"]
    parts = {"render": render, "augment": stages.get("augment", 0.0), "encode": stages["encode"],
             "write": stages["write_wait"]}
    encode_rate = views / max(stages["encode"], 1e-9)
    writers = max(stages["writers"], 1)
    return {**stages, "seconds": seconds,
            **{f"{name}_fraction": value / max(seconds, 1e-9) for name, value in parts.items()},
            "limit": max(parts, key=parts.get), "encode_views_per_s": encode_rate,
            "encode_over_forward": forward / encode_rate,
            "writer_views_per_s": views / max(stages["writer_busy"] / writers, 1e-9)}


def _train(*, work: Path, size: dict, device: torch.device, compile_model: bool, novel: list[str]) -> dict:
    from pipeline.training.config import build_config
    from pipeline.training.loop import train

    config = build_config(preset=size["preset"], overrides=[
        *train_overrides(work=work, size=size, device=device, novel=novel, steps=size["steps"], out="run",
                         classes_per_sample="all"), f"compile={str(compile_model).lower()}"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GpuSampler(device) as sampler:
        summary = train(config=config, quiet=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    seconds = max(summary["seconds"], 1e-9)
    return {"steps": summary["steps"], "batch_size": size["batch_size"], "steps_per_s": summary["steps"] / seconds,
            "samples_per_s": summary["steps"] * size["batch_size"] / seconds,
            "data_wait_pct": 100 * summary["data_wait_fraction"], "peak_gpu_memory_gib": peak,
            "gpu_utilisation_pct": sampler.mean, "train_seconds": seconds}


def run_gpu_check(*, work: Path, size: dict, device: str = "auto", compile_model: bool = False,
                  budget: float | None = None) -> dict:
    """Every stage; returns the JSON-able record (``errors`` lists the stages that failed or were not run).

    ``budget`` (seconds from the start): the profiled/online stage and each packed round start only
    while enough of it is left, so the JSON comes out in time even on a slow machine.
    """
    from pipeline.data.synthetic import NOVEL_SHAPES, make_shapes_dataset, split_lists
    from pipeline.eval.evaluate import evaluate_split
    from pipeline.training.checkpoints import load_model

    dev, clock, novel = resolve_device(device), Stages(budget), list(NOVEL_SHAPES)
    total = size["images"] + size["val_images"]
    with clock("data"):
        root = make_shapes_dataset(out=work / "data", count=total, size=tuple(size["image_size"]))
        lists = split_lists(root=root, out=work, val_fraction=size["val_images"] / total)
    with clock("forward"):
        forward = forward_rate(backbone=size["backbone"], input_size=size["input_size"],
                               views=size["forward_views"], batch_size=size["extract_batch"], device=dev)
    with clock("extract"), GpuSampler(dev) as extract_sampler:
        report = _extract(work=work, root=root, lists=lists, size=size, device=dev)
    extract_rate = report.views / report.shard_seconds
    with clock("train"):
        trained = _train(work=work, size=size, device=dev, compile_model=compile_model, novel=novel)
    with clock("eval"):
        model, _ = load_model(work / "run", device=dev)
        scores = evaluate_split(model=model, vision_cache=str(work / "cache"), text_cache=str(work / "cache"),
                                split="folder/val", protocol="custom", fold=0, novel_names=novel,
                                device=dev, quiet=True, min_pixels=1)
        del model
    record = {
        "machine": machine(), "card": device_name(dev), "device": str(dev), "load_average": load_average(),
        "backbone": size["backbone"], "preset": size["preset"], "images": size["images"],
        "extract_views": report.views, "extract_views_per_s": extract_rate, "forward_views_per_s": forward,
        "extract_over_forward": forward / extract_rate, "extract_gpu_utilisation_pct": extract_sampler.mean,
        **trained, "eval_seconds": clock.seconds["eval"], "eval_miou": scores.get("miou"), "compile": compile_model,
        "extract_stages": extraction_parts(report.stages, views=report.views, seconds=report.shard_seconds,
                                           forward=forward),
    }
    record["steps_compared"] = clock.guarded("steps", lambda: online_against_cached(
        work=work, root=root, size=size, device=dev, novel=novel), needs=STEPS_NEED_S)
    _free(dev)
    # Each packed run sets its own step count and run folder over the shared settings.
    record["packed"] = clock.guarded("packed", lambda: packed_runs(
        work=work, preset=size["packed_preset"], counts=PACKED, warm=size["packed_warm"],
        timed=size["packed_timed"], threads=size["packed_threads"], timeout=size["packed_timeout"],
        deadline=clock.deadline, start_method="spawn" if dev.type == "cuda" else "forkserver",
        overrides=train_overrides(work=work, size=size, device=dev, novel=novel, steps=1, out="packed")))
    failed = [row["error"] for row in record["packed"] if "error" in row] if isinstance(record["packed"], list) else []
    if failed:
        clock.errors["packed"] = failed[0]
    return {**record, "stage_seconds": clock.seconds, "total_seconds": sum(clock.seconds.values()),
            "errors": clock.errors, "load_average_end": load_average()}


class Stages:
    """Seconds per stage of the check (also said on stderr as each ends, so a killed run shows how far it got),
    and the later stages run so that one failing, or the time ``budget`` running out, keeps the rest."""

    def __init__(self, budget: float | None = None):
        self.seconds: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.budget, self.started = budget, time.monotonic()

    @property
    def deadline(self) -> float | None:
        return None if self.budget is None else self.started + self.budget

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            print(f"bench gpu: {name} took {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)

    def guarded(self, name: str, run: Callable[[], object], *, needs: float = 0.0):
        """``run()``, timed, when ``needs`` seconds of the budget are left; else, or on an exception, a
        one-line reason (kept in ``errors`` too)."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left < needs:
            self.errors[name] = f"not run: {max(left, 0):.0f} s of the {self.budget:g} s budget left, {needs:g} needed"
            return {"error": self.errors[name]}
        with self(name):
            try:
                return run()
            except Exception as err:  # noqa: BLE001 - one GPU run must still report the other stages
                lines = str(err).strip().splitlines()
                self.errors[name] = f"{type(err).__name__}: {lines[0] if lines else ''}"
                return {"error": self.errors[name]}


def _free(device: torch.device) -> None:
    """Hand cached GPU memory back before the packed runs start their own processes."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A CPU-sized pipeline check (the test suite's).")
    for key in ("images", "views", "steps", "batch_size", "extract_batch", "render_workers", "val_images"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training.")
    parser.add_argument("--work", type=Path, default=None, help="Keep the data, store and run here.")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"Seconds: later stages start only while enough is left (default {BUDGET_S}; "
                             f"none with --tiny).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    size = dict(TINY if args.tiny else FULL)
    size.update({k: v for k, v in vars(args).items() if k in size and v is not None})
    with work_folder(args.work, prefix="fusioner-gpu-") as work:
        budget = args.budget if args.budget is not None else (None if args.tiny else BUDGET_S)
        record = run_gpu_check(work=work, size=size, device=args.device, compile_model=args.compile, budget=budget)
    print(json.dumps(record, default=float))
    return 1 if record["errors"] else 0
