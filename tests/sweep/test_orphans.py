"""A sweep's processes die with their parent: the kernel ends them, even stopped, even mid-fork."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import alive

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")]

# A parent that forks a child, lets it arm die_with_parent and stop itself, then exits.
PARENT = """
import os, signal
from pipeline.sweep.worker import die_with_parent
parent = os.getpid()
pid = os.fork()
if pid == 0:
    die_with_parent(parent)
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(pid, os.WUNTRACED)  # the child is stopped: it cannot poll for anything now
print(pid, flush=True)
"""


def test_a_stopped_child_is_killed_when_its_parent_exits():
    done = subprocess.run([sys.executable, "-c", PARENT], cwd=ROOT, capture_output=True, text=True, check=True)
    child = int(done.stdout.strip())
    deadline = time.monotonic() + 60
    while alive(child):
        assert time.monotonic() < deadline, f"process {child} outlived its parent"
        time.sleep(0.02)


def test_a_child_whose_parent_died_before_it_armed_leaves_at_once():
    """The fork window: the parent is gone before die_with_parent runs (here: a pid that is not the parent)."""
    code = "from pipeline.sweep.worker import die_with_parent; die_with_parent(1 << 22); print('outlived')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 137 and "outlived" not in done.stdout
