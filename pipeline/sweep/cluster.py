"""Where a sweep runs: a local cluster with one worker per GPU, a running scheduler, or SLURM."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager

from pipeline.host import threads_each
from pipeline.sweep.calm import CALM


def local_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextmanager
def open_cluster(*, study, scheduler: str | None, slurm: bool, jobs: int, gpus_per_job: int,
                 workers: int | None, quiet: bool, runs_per_gpu: int = 1):
    """Yield (client, torch threads per run, GPUs for local pinning) for the chosen kind of cluster.

    Each worker (one per GPU) gets ``runs_per_gpu`` threads, one per run it may hold at once; the CPU
    cores are shared among all of them. A running scheduler's workers keep the threads they were started
    with (``dask worker --nthreads N``).
    """
    import logging

    import dask
    from distributed import Client, LocalCluster

    # Workers recycled before walltime count as failures of the runs they held: allow many.
    with dask.config.set({"distributed.scheduler.allowed-failures": 20, **CALM}):
        if scheduler:
            client, cluster, threads, gpus = Client(scheduler, timeout="30s"), None, None, None
        elif slurm:
            from pipeline.sweep.slurm import slurm_cluster

            cluster = slurm_cluster(spec=study.slurm, gpus_per_job=gpus_per_job,
                                    log_dir=study.out / "slurm-logs", runs_per_gpu=runs_per_gpu)
            cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)  # replaces jobs that end at walltime
            client, threads, gpus = Client(cluster), max(1, study.slurm.cores_per_gpu // runs_per_gpu), None
        else:
            gpus = local_gpus()
            count = workers or len(gpus) or min(2, os.cpu_count() or 1)
            # Any free port for the HTTP server (the dashboard too, with bokeh); under --quiet even a
            # failed task's multi-line "Compute Failed" log stays out: the sweep lists failed runs itself.
            cluster = LocalCluster(n_workers=count, threads_per_worker=runs_per_gpu, processes=True,
                                   dashboard_address=":0", silence_logs=logging.CRITICAL if quiet else logging.WARNING)
            client, threads = Client(cluster), threads_each(count * runs_per_gpu)
            gpus = gpus or None
    try:
        if not quiet and importlib.util.find_spec("bokeh"):
            print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client, threads, gpus
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
