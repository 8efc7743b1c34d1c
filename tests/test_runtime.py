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
