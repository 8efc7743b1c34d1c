"""`python -m pipeline.bench datapath` runs every stage (render pool, shard writers, stream reader) end to end."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.datapath import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.processes
def test_datapath_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    assert main(["--images", "4", "--read-views", "40", "--repeats", "1", "--work", str(tmp_path)]) == 0
    record = json.loads(capsys.readouterr().out)
    rates = [v for k, v in record.items() if isinstance(v, (int, float)) and k.endswith(("_per_s", "_raw_read"))]
    assert rates and all(v > 0 for v in rates)
    assert record["stream_vs_raw_read"] > 0
