"""Sweep throughput: N short runs on a LocalCluster of W workers vs the same runs one after another.

efficiency = sequential / (W x parallel). Both sides give every run the same
torch thread budget (cores // W), so the figure measures what the sweep
machinery costs: cluster start, one Python process per run (imports, store
opening), polling. The runs train on a small generated PASCAL-named dataset
through the real extraction path (random-init CLIP-B vision, packaged MiniLM
text), so the benchmark needs no downloads and no shared data.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.data.synthetic import write_demo_dataset
from pipeline.host import threads_each


def build_demo_caches(root: Path, *, images: int = 24, backbone: str = "clip-b",
                      text: str = "minilm") -> tuple[Path, Path]:
    """(vision store with folder/train and folder/val, text store of the PASCAL names) for the demo dataset.

    ``backbone`` is random-init; the tests take the tiny ``test-vit``, the benchmark clip-b's width.
    ``text`` is the packaged pretrained MiniLM, or a test-only tower (``test-text``, random-init), which
    the tests take: encoding the names' prompts through MiniLM costs more CPU than their whole extraction.
    """
    from pipeline.encode.extract import extract
    from pipeline.encode.config import ExtractConfig
    from pipeline.encode.registry import get_spec

    data = write_demo_dataset(root / "data", images=images)
    vision, text_store = root / backbone, root / text
    common = dict(backbone=backbone, out=str(vision), dataset="folder", data_root=str(data), random_init=True,
                  input_size=64, vision_only=True, device="cpu")
    extract(config=ExtractConfig(**common, views=1), quiet=True)
    extract(config=ExtractConfig(**common, split="val", eval_resize=True), quiet=True)
    extract(config=ExtractConfig(backbone=text, out=str(text_store), dataset="voc", text_only=True, device="cpu",
                                 random_init=get_spec(text).test_only), quiet=True)  # test-only: no weights exist
    return vision, text_store


def demo_study(*, vision: Path, text: Path, out: Path, folds: list[int], seeds: list[int], steps: int,
               variants: dict | None = None, checkpoint_every: int = 0) -> dict:
    """A study file (as a dict) of tiny-preset runs on the demo caches."""
    return {
        "name": out.name,
        "title": "demo sweep",
        "out": str(out),
        "pairs": [{"label": f"{vision.name.upper()} (random) + {_text_label(text)}", "vision": str(vision),
                   "text": str(text)}],
        "eval": {"split": "folder/val", "mode": "binary"},
        "base": {"preset": "tiny", "device": "cpu", "log_every": 1000, "checkpoint_every": checkpoint_every,
                 "data": {"protocol": "pascal5i", "split": "folder/train", "read_mode": "memory"},
                 # enough epochs (of a few steps each) that max_steps decides the length
                 "optim": {"max_steps": steps, "batch_size": 8, "epochs": max(50, steps), "warmup_epochs": 1}},
        "grid": {"folds": folds, "seeds": seeds, **({"variants": variants} if variants else {})},
    }


def _text_label(text: Path) -> str:
    return "MiniLM" if text.name == "minilm" else f"{text.name.upper()} (random)"


def bench_sweep(*, runs: int = 8, workers: int = 2, steps: int = 800, work: Path | None = None) -> str:
    """Time the same ``runs`` runs through the sweep (W workers) and in one process; return a report."""
    from pipeline.sweep.command import sweep_command
    from pipeline.sweep.scheduler import write_run_file
    from pipeline.sweep.study import expand_runs, load_study
    from pipeline.sweep.tables import write_outputs
    from pipeline.sweep.worker import execute_run

    work = Path(work or Path(tempfile.gettempdir()) / "fusioner-bench-sweep").resolve()
    if not (work / "caches" / "minilm").is_dir():
        shutil.rmtree(work / "caches", ignore_errors=True)
        build_demo_caches(work / "caches")
    vision, text = work / "caches" / "clip-b", work / "caches" / "minilm"
    folds = [0, 1, 2, 3]
    seeds = list(range(-(-runs // len(folds))))
    threads = threads_each(workers)
    times = {}
    for mode in ("parallel", "sequential"):
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        path = work / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(demo_study(vision=vision, text=text, out=out, folds=folds, seeds=seeds,
                                                  steps=steps)))
        tick = time.perf_counter()
        if mode == "parallel":
            code = sweep_command(study=path, scheduler=None, slurm=False, jobs=1, gpus_per_job=0, workers=workers,
                                 dry_run=False, retries=0, quiet=True, overrides={})
            assert code == 0, "the parallel sweep had failed runs"
        else:
            import torch

            torch.set_num_threads(threads)
            study = load_study(path=path)
            for run in expand_runs(study)[:runs]:
                write_run_file(run, study.name)
                execute_run(run_dir=run.dir, threads=threads)
            write_outputs(study=study, runs=expand_runs(study))  # the same tables and chart a sweep writes
        times[mode] = time.perf_counter() - tick
    parallel_records = [_read(p) for p in sorted((work / "parallel" / "runs").glob("*/done.json"))]
    work_seconds = statistics.median(r["train_seconds"] + r["eval_seconds"] for r in parallel_records)
    # The median leaves out the first run, which alone pays the lazy imports inside train().
    sequential_seconds = statistics.median(_read(p)["train_seconds"] + _read(p)["eval_seconds"]
                                           for p in (work / "sequential" / "runs").glob("*/done.json"))
    efficiency = times["sequential"] / (workers * times["parallel"])
    ceiling = concurrency_ceiling(study_path=work / "sequential.yaml", workers=workers, threads=threads,
                                  alone=sequential_seconds)
    fresh, forked = process_overheads(run_dir=next((work / "parallel" / "runs").glob("*")))
    same = (work / "parallel" / "table.csv").read_text() == (work / "sequential" / "table.csv").read_text()
    return (f"{runs} runs x {steps} steps (tiny preset), {workers} workers x {threads} torch thread(s), "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n"
            f"sequential (one process): {times['sequential']:.1f} s (median {sequential_seconds:.1f} s per run)\n"
            f"sweep on LocalCluster({workers} workers, one process per run): {times['parallel']:.1f} s "
            f"(median {work_seconds:.1f} s per run inside its process)\n"
            f"efficiency = sequential / ({workers} x parallel) = {efficiency:.2f}\n"
            f"machine ceiling ({workers} of these runs side by side without dask vs one at a time): "
            f"{ceiling:.2f}; "
            f"sweep efficiency / ceiling = {efficiency / ceiling:.2f}\n"
            f"per-run process start: fresh Python + imports {fresh:.2f} s, fork from the preloaded launcher "
            f"{forked:.3f} s\n"
            f"same table from both: {same}")


def concurrency_ceiling(*, study_path: Path, workers: int, threads: int, alone: float) -> float:
    """What the machine allows without any scheduler: ``workers`` runs side by side, no dask.

    Each run is forked from its own preloaded launcher, as in the sweep, so imports are not
    counted. ``alone`` is the mean seconds of a run's training + evaluation when runs go one at a
    time; the ratio is 1 on idle cores and under 1 on a machine shared with other jobs, and no
    scheduler can beat it.
    """
    import threading

    from pipeline.sweep.scheduler import write_run_file
    from pipeline.sweep.study import expand_runs, load_study
    from pipeline.sweep.worker import Launcher

    out = study_path.parent / "ceiling"
    shutil.rmtree(out, ignore_errors=True)
    study = load_study(path=study_path, overrides={"study.out": str(out), "study.runs": f"{out}/runs"})
    runs = expand_runs(study)[:workers]
    for run in runs:
        write_run_file(run, study.name)
    launchers = [Launcher() for _ in runs]
    try:
        jobs = [threading.Thread(target=launcher.run, kwargs=dict(run_dir=str(run.dir), threads=threads, env={},
                                                                  log=str(run.dir / "log.txt")))
                for launcher, run in zip(launchers, runs)]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
    finally:
        for launcher in launchers:
            launcher.close()
    records = [_read(run.dir / "done.json") for run in runs]
    return alone / statistics.fmean(r["train_seconds"] + r["eval_seconds"] for r in records)


def process_overheads(*, run_dir: Path) -> tuple[float, float]:
    """Seconds to start a run's process: a fresh interpreter with the run's imports, and a fork from the launcher."""
    from pipeline.sweep.worker import PRELOAD, Launcher

    tick = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import matplotlib; matplotlib.use('Agg'); import " + ", ".join(PRELOAD)],
                   check=True)
    fresh = time.perf_counter() - tick
    launcher = Launcher().wait_ready()
    try:
        tick = time.perf_counter()
        launcher.run(run_dir=str(run_dir), threads=1, env={}, log=str(run_dir / "log.txt"))  # done: fork, check, exit
        forked = time.perf_counter() - tick
    finally:
        launcher.close()
    return fresh, forked


def _read(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench sweep``: 2 workers vs one process on 8 tiny runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.bench sweep", description=main.__doc__)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--work", type=Path, default=None, help="caches and runs (default: a folder in /tmp)")
    args = parser.parse_args(argv)
    print(bench_sweep(runs=args.runs, workers=args.workers, steps=args.steps, work=args.work))
    return 0
