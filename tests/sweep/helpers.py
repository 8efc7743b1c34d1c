"""What the sweep tests and their hooks share: running a sweep in-process, and whether a process lives."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from pipeline.sweep.command import sweep_command


def run_sweep(study: Path, *, workers: int, retries: int, **options) -> int:
    """``fusioner sweep STUDY`` in this process, on a local cluster without GPUs, quietly."""
    kwargs = dict(scheduler=None, slurm=False, jobs=1, gpus_per_job=0, workers=workers, dry_run=False,
                  retries=retries, quiet=True, overrides=[])
    return sweep_command(study=study, **{**kwargs, **options})


def alive(pid: int) -> bool:
    """The process runs (a zombie, not yet reaped by its parent, has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for_run_processes_to_end(out: Path, deadline: float) -> None:
    """Every run lock free: no process of the killed sweep still works on a run."""
    for lock in out.glob("runs/*/.lock"):
        with open(lock, "a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"a run of the killed sweep outlived it ({lock.parent})"
                    time.sleep(0.02)
