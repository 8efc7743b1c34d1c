"""``fusioner sweep``: a whole study as batch jobs on dask.distributed, ending in the paper's tables.

The scheduling is dask's: a LocalCluster (one worker per GPU, or N CPU
workers with one thread each), an existing scheduler, or SLURM jobs through
dask-jobqueue. Each run is one task, and each task runs its study run in a
process of its own (see :mod:`pipeline.sweep_worker`), pinned to the worker's
GPU. Finished runs carry ``done.json`` and are skipped, so a killed sweep
resumes by being started again; a failed run is retried (a user error is not:
it would fail the same way), then recorded in ``failed.json`` while the other
runs go on. At the end the study's tables are written from the done markers.
With ``--runs-per-gpu`` a worker holds several runs where their memory fits
(:mod:`pipeline.sweep.packing`), and a run out of memory is retried once alone.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import write_json_atomic
from pipeline.sweep.study import Run, read_marker, run_state

# --------------------------------------------------------------------------- #
# The dask task: one run, in its own process, on this worker's GPU
# --------------------------------------------------------------------------- #


class RunFailed(Exception):
    """A run's process failed; ``permanent`` when retrying cannot help (a user error, exit code 2).

    ``device_mib`` is set when it ran out of memory: the memory resource of the worker it ran on
    (0 when the worker offers none, i.e. runs are not packed), what a retry alone reserves.
    """

    def __init__(self, message: str, permanent: bool = False, device_mib: int | None = None) -> None:
        super().__init__(message, permanent, device_mib)
        self.message, self.permanent, self.device_mib = message, permanent, device_mib

    def __str__(self) -> str:
        return self.message


class RunLaunchers(WorkerPlugin):
    """Each worker's idle launchers (preloaded processes that fork one child per run), closed with the worker."""

    name = "fusioner-run-launchers"

    def setup(self, worker) -> None:
        self.lock, self.idle = threading.Lock(), []
        # Launchers die with the thread that started them (PR_SET_PDEATHSIG): start them all
        # from one thread that lives as long as the worker, not from dask's task threads.
        self.starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusioner-launcher-starter")

    def teardown(self, worker) -> None:
        for launcher in self.idle:
            launcher.close()
        self.starter.shutdown(wait=False)

    @contextmanager
    def launcher(self):
        from pipeline.sweep.worker import Launcher

        with self.lock:
            launcher = self.idle.pop() if self.idle else None
        launcher = (launcher or self.starter.submit(Launcher).result()).wait_ready()
        try:
            yield launcher
        except BaseException:
            launcher.close()  # it may be half way through a request: never reuse it
            raise
        with self.lock:
            self.idle.append(launcher)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else "no output"


def run_task(run_dir: str, threads: int | None, gpus: list[str] | None) -> dict:
    """The dask task: run one study run in its own process; returns its done record."""
    from distributed import get_worker

    from pipeline.sweep.packing import RESOURCE
    from pipeline.sweep.worker import OOM_EXIT, pick_gpu

    worker = get_worker()
    visible = gpus if gpus is not None else [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    gpu = pick_gpu(worker_name=worker.name, visible=visible)
    env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log = Path(run_dir) / "log.txt"
    start = log.stat().st_size if log.exists() else 0
    plugin = worker.plugins.get(RunLaunchers.name)
    if plugin is None:
        raise RunFailed(f"worker {worker.name} has no {RunLaunchers.name} plugin")
    try:
        with plugin.launcher() as launcher:
            code = launcher.run(run_dir=run_dir, threads=threads, env=env, log=str(log))
    except RuntimeError as err:
        raise RunFailed(f"{err} (worker {worker.name})") from None
    if code == 0:
        return read_marker(Path(run_dir), "done.json")
    with open(log, "rb") as handle:
        handle.seek(start)
        message = _last_line(handle.read().decode(errors="replace"))
    if code == OOM_EXIT:
        device = int(worker.state.total_resources.get(RESOURCE, 0))
        raise RunFailed(f"out of memory on worker {worker.name}: {message} (log: {log})", device_mib=device)
    raise RunFailed(f"exit code {code}: {message} (log: {log})", permanent=code == 2)


# --------------------------------------------------------------------------- #
# The sweep
# --------------------------------------------------------------------------- #


def write_run_file(run: Run, study_name: str) -> None:
    labels = {"pair": run.pair, "variant": run.variant, "fold": run.fold, "seed": run.seed, "values": run.values}
    write_json_atomic(run.dir / "run.json", {"key": run.key, "study": study_name, "labels": labels,
                                             "config": run.config, "eval": run.eval})


def _failure(error: BaseException | None, *, alone: bool) -> tuple[str, str]:
    """(what to do, message): 'alone' to retry out of memory with the device to itself, 'retry' or 'fail'."""
    message = str(error) or type(error).__name__
    oom = getattr(error, "device_mib", None)
    if oom is None:
        return ("fail" if getattr(error, "permanent", False) else "retry"), message
    if oom and not alone:
        return "alone", message
    return "fail", message + (" (again, alone on the device)" if alone else " (alone on the device)")


def run_all(*, client, runs: list[Run], study_name: str, retries: int, threads: int | None,
            gpus: list[str] | None, quiet: bool, memory: dict[str, int] | None = None) -> dict[str, str]:
    """Submit every unfinished run, retry failures, show progress; returns run key -> error of failed runs.

    ``memory`` (run key -> MiB, see :mod:`pipeline.sweep.packing`) makes each run reserve its estimated
    peak from its worker's memory resource, so a worker runs several at once only where they fit; a
    run that then runs out of memory is retried once with its worker's whole memory reserved.
    """
    from pipeline.runtime import progress
    from pipeline.sweep.packing import RESOURCE, schedule_unrunnable

    unique = list({run.key: run for run in runs}.values())
    todo = [run for run in unique if run_state(run.dir) != "done"]
    for run in todo:
        write_run_file(run, study_name)
    attempts: dict[str, int] = {}
    alone: dict[str, int] = {}  # run key -> MiB it reserves to run alone, after running out of memory packed
    futures: dict = {}

    def submit(run: Run) -> None:
        attempts[run.key] = attempts.get(run.key, 0) + 1
        need = alone.get(run.key) or (memory or {}).get(run.key)
        future = client.submit(run_task, str(run.dir), threads, gpus, pure=False,
                               resources={RESOURCE: need} if need else None,
                               key=f"fusioner-run-{run.key}-{attempts[run.key]}")
        futures[future] = run

    client.register_plugin(RunLaunchers(), name=RunLaunchers.name)
    for run in todo:
        submit(run)
    errors: dict[str, str] = {}
    bar = progress(total=len(unique), desc="sweep", quiet=quiet, unit="run", initial=len(unique) - len(todo))
    last, nudged = None, time.monotonic()
    try:
        while futures:
            time.sleep(0.25)
            for future in [f for f in futures if f.done()]:
                run = futures.pop(future)
                if future.status == "finished":
                    bar.update(1)
                    continue
                error = future.exception()
                action, message = _failure(error, alone=run.key in alone)
                if action == "alone":
                    alone[run.key] = error.device_mib
                    submit(run)
                    continue
                if action == "retry" and attempts[run.key] - (run.key in alone) <= retries:
                    submit(run)
                    continue
                errors[run.key] = message
                write_json_atomic(run.dir / "failed.json", {"error": errors[run.key], "attempts": attempts[run.key],
                                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            if memory and time.monotonic() > nudged + 5:
                client.run_on_scheduler(schedule_unrunnable)
                nudged = time.monotonic()
            shown = (_running(client, {f.key for f in futures}), len(errors))
            if shown != last:
                bar.set_postfix(running=shown[0], failed=shown[1])
                last = shown
    finally:
        bar.close()
        for future in futures:
            future.cancel()
    return errors


def _running(client, keys: set) -> int:
    """Runs executing now: tasks a worker holds beyond its thread count are only queued there."""
    threads = client.nthreads()
    return sum(min(sum(1 for k in held if k in keys), threads.get(worker, 1))
               for worker, held in client.processing().items())
