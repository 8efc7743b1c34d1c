"""``fusioner sweep --slurm``: dask-jobqueue workers that leave before the walltime kills them.

One SLURM job per ``--jobs``, each holding ``--gpus-per-job`` GPUs and as many
worker processes (one run at a time each, or ``--runs-per-gpu``; one GPU each: a worker's name ends
in its index within the job, which :func:`pipeline.sweep.pick_gpu` maps onto
the job's ``CUDA_VISIBLE_DEVICES``). Workers get ``--lifetime`` = walltime -
margin with a stagger, and ``--lifetime-restart``: a worker retires before
SLURM kills it, the scheduler moves its run to another worker (where it resumes
from its last checkpoint), and ``cluster.adapt`` submits a new job for every
job that ends, so a study longer than one walltime finishes unattended.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.sweep.calm import calm_environ
from pipeline.sweep.study import SlurmSpec


def walltime_seconds(text: str) -> int:
    """SLURM's walltime forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        day = int(days) if days else 0
    except ValueError:
        raise UserError(f"slurm.walltime: cannot read {text!r} (use HH:MM:SS or D-HH:MM:SS)") from None
    if days:
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
        hours, minutes, seconds = parts[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[:3]
    return ((day * 24 + hours) * 60 + minutes) * 60 + seconds


def lifetime_options(spec: SlurmSpec) -> list[str]:
    """``dask worker`` options that recycle a worker ``lifetime_margin`` before the walltime."""
    from dask.utils import parse_timedelta

    total = walltime_seconds(spec.walltime)
    margin = parse_timedelta(spec.lifetime_margin, default="s")
    stagger = parse_timedelta(spec.lifetime_stagger, default="s")
    lifetime = int(total - margin - stagger)
    if lifetime <= 60:
        raise UserError(f"slurm: walltime {spec.walltime} leaves no time after lifetime_margin "
                        f"{spec.lifetime_margin} and lifetime_stagger {spec.lifetime_stagger}")
    return ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{int(stagger)}s", "--lifetime-restart"]


def slurm_cluster(*, spec: SlurmSpec, gpus_per_job: int, log_dir: Path, runs_per_gpu: int = 1):
    """A SLURMCluster (no job submitted yet: the caller scales or adapts it); ``runs_per_gpu`` threads per worker."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise UserError("`slurm` needs dask-jobqueue: pip install 'fusioner[slurm]'") from err

    processes = max(gpus_per_job, 1)
    directives = [f"--gres=gpu:{gpus_per_job}"] if gpus_per_job else []
    memory = _times(spec.memory_per_gpu, processes)
    return SLURMCluster(
        cores=processes * runs_per_gpu,  # runs_per_gpu threads per worker process: that many runs per GPU
        processes=processes,
        job_cpu=spec.cores_per_gpu * processes,  # the CPUs the runs' own processes use
        memory=memory,
        walltime=spec.walltime,
        queue=spec.queue,
        account=spec.account,
        job_extra_directives=directives + list(spec.job_extra),
        # the sweep's calm dask settings first (the workers' own config), then the study's setup lines
        job_script_prologue=[f"export {name}={value}" for name, value in calm_environ().items()] + list(spec.setup),
        worker_extra_args=lifetime_options(spec),
        log_directory=str(log_dir),
        python=sys.executable,
        job_name="fusioner-sweep",
        scheduler_options={"dashboard_address": ":0"},  # never fight another cluster for :8787
    )


def _times(size: str, count: int) -> str:
    from dask.utils import format_bytes, parse_bytes

    try:
        return format_bytes(parse_bytes(size) * count).replace(" ", "")
    except ValueError:
        raise UserError(f"slurm.memory_per_gpu: cannot read {size!r} (e.g. 32GB)") from None
