"""Packed runs of the GPU check: a round that fails or finds no time left is reported, the others kept."""

from __future__ import annotations

import time

import pytest

from pipeline.bench.gpu import Stages
from pipeline.bench.packed import packed_runs


def test_rounds_without_enough_time_left_are_reported_not_run(tmp_path):
    rows = packed_runs(work=tmp_path, preset="tiny", overrides=[], warm=1, timed=1, deadline=time.monotonic() + 5)
    assert [row["runs"] for row in rows] == [1, 2, 4]
    assert all(row["error"].startswith("not run: ") for row in rows) and not list(tmp_path.iterdir())


def test_a_later_stage_is_skipped_when_the_budget_is_spent_and_says_so():
    clock = Stages(budget=0.0)
    ran = []
    assert clock.guarded("steps", lambda: ran.append(1), needs=60)["error"].startswith("not run: 0 s of the 0 s")
    assert ran == [] and "steps" in clock.errors and "steps" not in clock.seconds
    failing = Stages().guarded("packed", lambda: 1 / 0)
    assert failing == {"error": "ZeroDivisionError: division by zero"}


@pytest.mark.processes
@pytest.mark.parametrize("method", ["spawn", "forkserver"])  # spawn: what a GPU run takes
def test_a_run_that_fails_is_reported_with_its_last_line(tmp_path, method):
    rows = packed_runs(work=tmp_path, preset="tiny", counts=(1,), warm=1, timed=1, timeout=120, start_method=method,
                       overrides=[f"data.cache={tmp_path / 'no-store'}", "device=cpu"])
    assert len(rows) == 1 and rows[0]["runs"] == 1
    assert "run 0 exited with 1" in rows[0]["error"] and "no-store" in rows[0]["error"]
    assert (tmp_path / "packed-1" / "run-0.log").is_file()

