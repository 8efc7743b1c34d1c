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


def test_render_clock_stops_at_the_last_shard_not_after_the_pool_shuts_down(monkeypatch):
    """Joining the render processes after the last shard is no rendering: a slow shutdown must not lower the rate."""
    import time

    import numpy as np

    from pipeline.bench import datapath

    class Group:
        attrs = {"class_names": ["a"]}

    def items(**_):
        for shard in range(4):
            time.sleep(0.02)  # 3 views every 20 ms: 150 views/s
            yield {"masks": np.zeros((3, 4, 4), np.uint8), "valid": np.ones(3, bool), "shard": shard,
                   "source": np.zeros((3, 1), bool), "classes": np.zeros((3, 1), bool), "cpu_seconds": 0.01}
        time.sleep(0.5)  # the pool's shutdown

    monkeypatch.setattr(datapath, "_rendered_items", items)
    monkeypatch.setattr(datapath, "num_shards", lambda group: 4)
    wall, per_cpu = datapath.render_rate(config=None, dataset=None, group=Group(), feature_shape=(1, 1), workers=1,
                                         write=False)
    assert 60 < wall < 200, wall  # with the shutdown in the window it read about 16
    assert per_cpu == pytest.approx(300)  # 9 views in 0.03 CPU seconds
