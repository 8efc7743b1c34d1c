"""Builds that every process of a test session shares: one process builds, the others wait and reuse."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def session_root(tmp_path_factory) -> Path:
    """The folder every process of this test session shares: xdist gives each worker a subfolder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def one_builder(path: Path):
    """Hold ``path``'s exclusive lock: the first process to ask builds, the others wait and reuse."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
