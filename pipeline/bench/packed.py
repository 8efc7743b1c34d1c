"""Several training runs packed on one card at once: samples/s per GPU for N = 1, 2, 4.

Small presets leave most of a large GPU idle; packing runs is the cheap way to fill it.
:func:`packed_runs` starts N separate processes for each N, every one the ordinary
training loop (:func:`~pipeline.training.loop.train`) on the same store and card
(spawned on a GPU; on a CPU forked from a server that imported the training code once). A
barrier hook holds each run before its first step until all N have built their model
and opened their data, then each times its steps after a warm-up
(:class:`~pipeline.bench.steps.StepWindow`). Per GPU, the rates add up;
``window_overlap`` says how much of the timed windows ran at the same time (1: all).

    python -m pipeline.bench.packed SPEC INDEX   # one packed run, as packed_runs starts it
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from pipeline.bench.steps import StepWindow
from pipeline.config import write_json_atomic
from pipeline.training.hooks import HookBase, Loop

MIN_ROUND_S = 20.0  # a round given less time than this would only be stopped half-way


class Barrier(HookBase):
    """Before the first step: mark this run ready, then wait until ``count`` runs are (or ``timeout`` s pass)."""

    def __init__(self, *, folder: Path, index: int, count: int, timeout: float):
        self.folder, self.index, self.count, self.timeout = Path(folder), index, count, timeout
        self.timed_out = False

    def before_train(self, loop: Loop) -> None:
        (self.folder / f"ready-{self.index}").touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.glob("ready-*"))) < self.count:
            if time.monotonic() > deadline:
                self.timed_out = True
                return
            time.sleep(0.02)


def run_one(*, spec: dict, index: int) -> dict:
    """One packed run: the ordinary loop with the barrier and the step window; its record."""
    import torch

    from pipeline.training.config import build_config
    from pipeline.training.loop import train

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    folder = Path(spec["folder"])
    barrier = Barrier(folder=folder / "barrier", index=index, count=int(spec["runs"]), timeout=spec["barrier_s"])
    window = StepWindow(warm=int(spec["warm"]), timed=int(spec["timed"]))
    overrides = [*spec["overrides"], f"optim.max_steps={window.total_steps}", f"out={folder / f'run-{index}'}"]
    train(config=build_config(preset=spec["preset"], overrides=overrides), quiet=True, hooks=[barrier, window])
    return {**window.record(), "barrier_timed_out": barrier.timed_out}


def _child(spec_path: str, index: int, log: str) -> None:
    """A packed run in a process of its own, its output in ``log``."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    main([spec_path, str(index)])


def _processes(method: str):
    """A multiprocessing context: ``spawn`` (a fresh interpreter per run), or ``forkserver``, whose server imports
    the training code once and forks each run from it (much cheaper on a small CPU machine). On CUDA take
    ``spawn``: a process that so much as asked for the device count must not be forked."""
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["pipeline.bench.packed", "pipeline.training.loop"])
    return context


def _wait_all(processes: list, *, logs: list[Path], deadline: float) -> list[str]:
    """Wait for every process until ``deadline``; the ones stopped or failed, with their last output line."""
    problems = []
    for index, process in enumerate(processes):
        process.join(timeout=max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
            problems.append(f"run {index} passed the time limit and was stopped")
        elif process.exitcode:
            text = logs[index].read_text(errors="replace") if logs[index].is_file() else ""
            lines = text.strip().splitlines() or ["(no output)"]
            problems.append(f"run {index} exited with {process.exitcode}: {lines[-1]}")
    return problems


def packed_round(*, folder: Path, runs: int, preset: str, overrides: list[str], warm: int, timed: int,
                 threads: int | None, timeout: float, start_method: str = "spawn") -> dict:
    """``runs`` packed runs at once; their summed samples/s and how well their timed windows overlapped."""
    (folder / "barrier").mkdir(parents=True, exist_ok=True)
    spec = {"runs": runs, "folder": str(folder), "preset": preset, "overrides": overrides, "warm": warm,
            "timed": timed, "threads": threads, "barrier_s": timeout / 2}
    write_json_atomic(folder / "spec.json", spec)
    context, started = _processes(start_method), time.monotonic()
    logs = [folder / f"run-{i}.log" for i in range(runs)]
    processes = [context.Process(target=_child, args=(str(folder / "spec.json"), i, str(log)), daemon=True)
                 for i, log in enumerate(logs)]
    for process in processes:
        process.start()
    problems = _wait_all(processes, logs=logs, deadline=started + timeout)
    if problems:
        raise RuntimeError(f"packed round of {runs}: {problems[0]}")
    records = [json.loads((folder / f"result-{i}.json").read_text()) for i in range(runs)]
    overlap = (min(r["stop_wall"] for r in records) - max(r["start_wall"] for r in records))
    longest = max(r["stop_wall"] - r["start_wall"] for r in records)
    return {"runs": runs, "samples_per_s_per_gpu": sum(r["samples_per_s"] for r in records),
            "samples_per_s_per_run": [r["samples_per_s"] for r in records],
            "achieved_tflops_per_gpu": sum(r["achieved_tflops"] for r in records),
            "window_overlap": max(0.0, overlap) / max(longest, 1e-9),
            "barrier_timed_out": any(r["barrier_timed_out"] for r in records),
            "seconds": time.monotonic() - started}


def packed_runs(*, work: Path, preset: str, overrides: list[str], counts: tuple[int, ...] = (1, 2, 4), warm: int,
                timed: int, threads: int | None = None, timeout: float = 300.0, deadline: float | None = None,
                start_method: str = "spawn") -> list[dict]:
    """One :func:`packed_round` per count, each within ``timeout`` s and before ``deadline`` (``time.monotonic``).

    A round that fails or finds too little time left becomes ``{"runs": n, "error": ...}``; the
    others keep their figures, each with its gain over the first count's samples/s per GPU.
    """
    rows = []
    for runs in counts:
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left < MIN_ROUND_S:
            rows.append({"runs": runs, "error": f"not run: {max(left, 0):.0f} s of the time budget left"})
            continue
        try:
            rows.append(packed_round(folder=work / f"packed-{runs}", runs=runs, preset=preset, overrides=overrides,
                                     warm=warm, timed=timed, threads=threads, timeout=left,
                                     start_method=start_method))
        except (RuntimeError, OSError, ValueError) as err:
            rows.append({"runs": runs, "error": str(err)})
    first = rows[0] if rows and "error" not in rows[0] else None
    for row in rows:
        if "error" not in row:
            row["gain_over_one"] = row["samples_per_s_per_gpu"] / first["samples_per_s_per_gpu"] if first else None
    return rows


def main(argv: list[str]) -> int:
    spec_path, index = Path(argv[0]), int(argv[1])
    spec = json.loads(spec_path.read_text())
    record = run_one(spec=spec, index=index)
    write_json_atomic(Path(spec["folder"]) / f"result-{index}.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
