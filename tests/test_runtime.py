"""Progress bars: live in a terminal and in a notebook, sparse lines in logs."""

from __future__ import annotations

import sys
import types

from pipeline.runtime import in_notebook, progress


def test_a_notebook_gets_a_live_bar_where_a_log_gets_a_line_every_30_s(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not in_notebook()
    assert progress(total=3, desc="x").mininterval == 30.0  # a CI log
    kernel = type("ZMQInteractiveShell", (), {})()  # what get_ipython() returns in Jupyter
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert in_notebook()
    bar = progress(total=3, desc="x")
    assert bar.mininterval == 0.2 and not bar.disable
    assert progress(total=3, desc="x", quiet=True).disable


def test_threads_each_splits_the_usable_cores_and_keeps_under_omp_num_threads(monkeypatch):
    from pipeline.runtime import threads_each

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [threads_each(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a shared node's (or a test runner's) limit per process
    assert [threads_each(n) for n in (1, 2, 8)] == [2, 2, 1]
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert threads_each(2) == 4

