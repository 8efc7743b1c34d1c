"""`python -m pipeline.bench gpu --tiny` runs every stage end to end on a CPU and prints one JSON line."""

from __future__ import annotations

import json

import pytest

import pipeline.encode.families
from pipeline.bench.gpu import main

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")

KEYS = ("extract_views_per_s", "forward_views_per_s", "extract_over_forward", "steps_per_s", "samples_per_s",
        "data_wait_pct", "peak_gpu_memory_gib", "gpu_utilisation_pct", "eval_miou", "machine")


def test_gpu_check_runs_end_to_end_at_a_tiny_size(tmp_path, capsys, monkeypatch, reuse_encoders):
    monkeypatch.setattr(pipeline.encode.families, "create_encoder", reuse_encoders)  # the forward-rate stage
    assert main(["--tiny", "--device", "cpu", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 1 and set(KEYS) <= set(record)
    assert record["steps"] == 3 and record["preset"] == "tiny" and record["device"] == "cpu"
    assert record["extract_views_per_s"] > 0 and record["forward_views_per_s"] > 0
    assert 0 <= record["data_wait_pct"] <= 100 and 0 <= record["eval_miou"] <= 100  # percent
    assert record["peak_gpu_memory_gib"] is None and record["gpu_utilisation_pct"] is None  # no GPU here
    assert (tmp_path / "cache" / "folder" / "train" / "view_order").is_dir()  # the shuffled layout was streamed
