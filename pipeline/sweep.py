"""``fusioner sweep``: a whole study as batch jobs on dask.distributed, ending in the paper's tables.

The scheduling is dask's: a LocalCluster (one worker per GPU, or N CPU
workers with one thread each), an existing scheduler, or SLURM jobs through
dask-jobqueue. Each run is one task, and each task runs its study run in a
process of its own (see :mod:`pipeline.sweep_worker`), pinned to the worker's
GPU. Finished runs carry ``done.json`` and are skipped, so a killed sweep
resumes by being started again; a failed run is retried (a user error is not:
it would fail the same way), then recorded in ``failed.json`` while the other
runs go on. At the end the study's tables are written from the done markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import write_json_atomic
from pipeline.errors import UserError
from pipeline.study import Run, expand_runs, load_study, read_marker, run_state

# --------------------------------------------------------------------------- #
# The dask task: one run, in its own process, on this worker's GPU
# --------------------------------------------------------------------------- #


class RunFailed(Exception):
    """A run's process failed; ``permanent`` when retrying cannot help (a user error, exit code 2)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message, permanent)
        self.message, self.permanent = message, permanent

    def __str__(self) -> str:
        return self.message


class RunLaunchers(WorkerPlugin):
    """Each worker's idle launchers (preloaded processes that fork one child per run), closed with the worker."""

    name = "fusioner-run-launchers"

    def setup(self, worker) -> None:
        self.lock, self.idle = threading.Lock(), []

    def teardown(self, worker) -> None:
        for launcher in self.idle:
            launcher.close()

    @contextmanager
    def launcher(self):
        from pipeline.sweep_worker import Launcher

        with self.lock:
            launcher = self.idle.pop() if self.idle else None
        launcher = launcher or Launcher()
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

    from pipeline.sweep_worker import pick_gpu

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
    raise RunFailed(f"exit code {code}: {message} (log: {log})", permanent=code == 2)


# --------------------------------------------------------------------------- #
# The sweep
# --------------------------------------------------------------------------- #


def _write_run_file(run: Run, study_name: str) -> None:
    labels = {"pair": run.pair, "variant": run.variant, "fold": run.fold, "seed": run.seed, "values": run.values}
    write_json_atomic(run.dir / "run.json", {"key": run.key, "study": study_name, "labels": labels,
                                             "config": run.config, "eval": run.eval})


def run_all(*, client, runs: list[Run], study_name: str, retries: int, threads: int | None,
            gpus: list[str] | None, quiet: bool) -> dict[str, str]:
    """Submit every unfinished run, retry failures, show progress; returns run key -> error of failed runs."""
    from pipeline.progress import progress

    unique = list({run.key: run for run in runs}.values())
    todo = [run for run in unique if run_state(run.dir) != "done"]
    for run in todo:
        _write_run_file(run, study_name)
    attempts: dict[str, int] = {}
    futures: dict = {}

    def submit(run: Run) -> None:
        attempts[run.key] = attempts.get(run.key, 0) + 1
        future = client.submit(run_task, str(run.dir), threads, gpus, pure=False,
                               key=f"fusioner-run-{run.key}-{attempts[run.key]}")
        futures[future] = run

    client.register_plugin(RunLaunchers(), name=RunLaunchers.name)
    for run in todo:
        submit(run)
    errors: dict[str, str] = {}
    bar = progress(total=len(unique), desc="sweep", quiet=quiet, unit="run", initial=len(unique) - len(todo))
    last = None
    try:
        while futures:
            time.sleep(0.25)
            for future in [f for f in futures if f.done()]:
                run = futures.pop(future)
                if future.status == "finished":
                    bar.update(1)
                    continue
                error = future.exception()
                if not getattr(error, "permanent", False) and attempts[run.key] <= retries:
                    submit(run)
                    continue
                errors[run.key] = str(error) or type(error).__name__
                write_json_atomic(run.dir / "failed.json", {"error": errors[run.key], "attempts": attempts[run.key],
                                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
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


def local_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextmanager
def open_cluster(*, study, scheduler: str | None, slurm: bool, jobs: int, gpus_per_job: int,
                 workers: int | None, quiet: bool):
    """Yield (client, torch threads per run, GPUs for local pinning) for the chosen kind of cluster."""
    import logging

    import dask
    from distributed import Client, LocalCluster

    # Workers recycled before walltime count as failures of the runs they held: allow many.
    with dask.config.set({"distributed.scheduler.allowed-failures": 20}):
        if scheduler:
            client, cluster, threads, gpus = Client(scheduler, timeout="30s"), None, None, None
        elif slurm:
            from pipeline.sweep_slurm import slurm_cluster

            cluster = slurm_cluster(spec=study.slurm, gpus_per_job=gpus_per_job,
                                    log_dir=study.out / "slurm-logs")
            cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)  # replaces jobs that end at walltime
            client, threads, gpus = Client(cluster), study.slurm.cores_per_gpu, None
        else:
            gpus = local_gpus()
            count = workers or len(gpus) or min(2, os.cpu_count() or 1)
            dashboard = ":0" if importlib.util.find_spec("bokeh") else None  # the dashboard needs bokeh
            cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True,
                                   dashboard_address=dashboard, silence_logs=logging.ERROR if quiet else logging.WARNING)
            client, threads = Client(cluster), max(1, (os.cpu_count() or 1) // count)
            gpus = gpus or None
    try:
        if not quiet and importlib.util.find_spec("bokeh"):
            print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client, threads, gpus
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def describe_runs(runs: list[Run]) -> str:
    """What --dry-run prints: each run, whether it is done, and where it lives."""
    states = [run_state(run.dir) for run in runs]
    lines = [f"{len(runs)} runs: " + ", ".join(f"{states.count(s)} {s}" for s in ("done", "partial", "failed", "pending")
                                              if s in states)]
    lines += [f"{state:8s} {run.describe()}  {run.dir}" for run, state in zip(runs, states)]
    return "\n".join(lines)


def sweep_command(*, study: Path, scheduler: str | None, slurm: bool, jobs: int, gpus_per_job: int,
                  workers: int | None, dry_run: bool, retries: int, quiet: bool, overrides: list[str]) -> int:
    """Run a whole study (folds x encoder pairs x variants x swept keys x seeds) and write the paper's table.

    Finished runs are skipped, so a killed sweep resumes by running the same command again; an
    interrupted run continues from its last checkpoint. Each run trains and evaluates in its own
    process; failed runs are retried ``--retries`` times, then listed with their error while the
    others finish. Writes results.csv, table.md, table.csv and chart.png into the study's out folder.
    Exit code 0 when every run is done, 1 when some failed, 2 on a bad study file.

    Examples:

      fusioner sweep studies/table4.yaml                        # LocalCluster: one worker per GPU

      fusioner sweep studies/table1.yaml --dry-run              # list runs, their folders and done state

      fusioner sweep studies/tiny.yaml --workers 2 --set optim.max_steps=20

      fusioner sweep studies/table2.yaml --scheduler tcp://10.0.0.5:8786

      fusioner sweep studies/table7.yaml --slurm --jobs 4 --gpus-per-job 2 --set study.slurm.walltime=08:00:00

    ``--set key=value`` changes the base training config (``optim.epochs=50``) or, as
    ``study.<section>.<key>=value``, the study file itself (``study.grid.seeds=[0,1,2]``,
    ``study.out=/scratch/t4``).
    """
    from pipeline.study_tables import markdown, write_outputs

    if scheduler and slurm:
        raise UserError("--scheduler and --slurm exclude each other")
    if retries < 0 or jobs < 1 or gpus_per_job < 0 or (workers is not None and workers < 1):
        raise UserError("--retries and --gpus-per-job must be >= 0, --jobs and --workers >= 1")
    spec = load_study(path=Path(study), overrides=list(overrides))
    runs = expand_runs(spec)
    if dry_run:
        print(describe_runs(runs))
        return 0
    todo = [run for run in {r.key: r for r in runs}.values() if run_state(run.dir) != "done"]
    errors: dict[str, str] = {}
    if todo:
        with open_cluster(study=spec, scheduler=scheduler, slurm=slurm, jobs=jobs, gpus_per_job=gpus_per_job,
                          workers=workers, quiet=quiet) as (client, threads, gpus):
            errors = run_all(client=client, runs=runs, study_name=spec.name, retries=retries, threads=threads,
                             gpus=gpus, quiet=quiet)
    table = write_outputs(study=spec, runs=runs)
    unique = {r.key: r for r in runs}
    if not quiet:
        done = sum(run_state(r.dir) == "done" for r in unique.values())
        print(markdown(table, rows_name=" / ".join(spec.table.rows)))
        print(f"{done} of {len(unique)} runs done, {len(errors)} failed; wrote {spec.out}/results.csv, table.md, "
              f"table.csv, chart.png")
    for run in unique.values():
        if run.key in errors:
            print(f"failed: {run.describe()}: {errors[run.key]}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.sweep run DIR`` (one run, the per-run process), ``study STUDY ...``, ``bench``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train and evaluate one prepared run directory")
    one.add_argument("run_dir", type=Path)
    one.add_argument("--threads", type=int, default=None)
    whole = commands.add_parser("study", help="what `fusioner sweep` runs")
    whole.add_argument("study", type=Path)
    whole.add_argument("--scheduler", default=None)
    whole.add_argument("--slurm", action="store_true")
    whole.add_argument("--jobs", type=int, default=1)
    whole.add_argument("--gpus-per-job", type=int, default=1)
    whole.add_argument("--workers", type=int, default=None)
    whole.add_argument("--dry-run", action="store_true")
    whole.add_argument("--retries", type=int, default=2)
    whole.add_argument("--quiet", "-q", action="store_true")
    whole.add_argument("--set", dest="overrides", action="append", default=[])
    bench = commands.add_parser("bench", help="2 workers vs one process on 8 tiny runs")
    bench.add_argument("--runs", type=int, default=8)
    bench.add_argument("--workers", type=int, default=2)
    bench.add_argument("--steps", type=int, default=800)
    bench.add_argument("--work", type=Path, default=None, help="caches and runs (default: a folder in /tmp)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from pipeline.sweep_worker import main as run_main

            return run_main(["run", str(args.run_dir)] + (["--threads", str(args.threads)] if args.threads else []))
        if args.command == "study":
            return sweep_command(study=args.study, scheduler=args.scheduler, slurm=args.slurm, jobs=args.jobs,
                                 gpus_per_job=args.gpus_per_job, workers=args.workers, dry_run=args.dry_run,
                                 retries=args.retries, quiet=args.quiet, overrides=args.overrides)
        from pipeline.sweep_bench import bench_sweep

        print(bench_sweep(runs=args.runs, workers=args.workers, steps=args.steps, work=args.work))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
