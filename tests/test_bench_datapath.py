"""`python -m pipeline.bench datapath` runs every stage (render pool, shard writers, stream reader) end to end."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.datapath import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.processes
def test_datapath_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    assert main(["--images", "4", "--read-views", "40", "--repeats", "1", "--work", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    rates = [v for k, v in record.items() if isinstance(v, (int, float)) and k.endswith(("_per_s", "_raw_read"))]
    assert rates and all(v > 0 for v in rates)
    assert record["stream_vs_raw_read"] > 0
    # the render figures the targets are read from: per core (CPU time of rendering), process vs thread, scaling
    for key in ("render_per_core_views_per_s", "render_thread_per_cpu_views_per_s", "render_thread_views_per_s",
                "render_process_views_per_s", "render_process_vs_thread", "render_scaling_efficiency"):
        assert record[key] > 0, key
    assert set(record["medians"]) >= {f"render_{kind}w{w}" for kind in ("", "only_", "cpu_") for w in (0, 1, 2)}
    assert "per core" in captured.err and "scaling" in captured.err  # the summary in words
