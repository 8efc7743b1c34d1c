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
    assert record["device_augment"]["device_vs_cpu_render"] > 0 or "skipped" in record["device_augment"]
    assert "augmentation on" in captured.err


def test_the_device_augmentation_is_measured_against_the_cpu_render_path_in_one_run(tmp_path):
    pytest.importorskip("kornia")
    from pipeline.bench.datapath import planned_store
    from pipeline.bench.device_augment import device_augment_rates
    from pipeline.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(out=tmp_path / "data", count=3, size=(120, 160))
    planned = []

    def plan(augment):
        planned.append(augment.backend)
        _, dataset, group, _ = planned_store(work=tmp_path, data_root=data, images=3, views=1, backbone="test-vit",
                                             shard_size=1, augment=augment)
        return dataset, group

    found = device_augment_rates(plan=plan, repeats=2, device="cpu")
    assert planned == ["cpu", "gpu", "cpu", "gpu"]  # alternated within each repeat
    assert found["device"] == "cpu" and found["torch_threads"] == 1
    assert found["cpu_render_views_per_s"] > 0 and found["device_views_per_s"] > 0
    assert len(found["all"]["cpu"]) == len(found["all"]["device"]) == 2
    ratios = [d / c for d, c in zip(found["all"]["device"], found["all"]["cpu"])]
    assert found["device_vs_cpu_render"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)


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
