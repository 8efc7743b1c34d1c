"""The host process: threads per process, and freed memory kept for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_threads_each_splits_the_usable_cores_and_keeps_under_omp_num_threads(monkeypatch):
    from pipeline.host import threads_each

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads_each(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a shared node's (or a test runner's) limit per process
    assert [threads_each(n) for n in (1, 2, 8)] == [2, 2, 1]
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert threads_each(2) == 4


CHURN = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from pipeline.host import keep_freed_memory
    assert keep_freed_memory()
for step in range(60):  # a step's activations: freed, then asked for again
    blocks = [np.ones(1 << 20) for _ in range(6)]  # 8 MB each
    del blocks
    if step == 9:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_step_memory_is_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 2048  # 50 steps x 48 MB freed and asked for again: about 150,000 faults measured
    assert kept < default / 20, (kept, default)
