"""`python -m pipeline.bench gpu --tiny` runs every stage end to end on a CPU and prints one JSON line."""

from __future__ import annotations

import json
import math

import pytest

import pipeline.encode.families
from pipeline.bench.gpu import extraction_parts, main

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")

KEYS = ("extract_views_per_s", "forward_views_per_s", "extract_over_forward", "steps_per_s", "samples_per_s",
        "data_wait_pct", "peak_gpu_memory_gib", "gpu_utilisation_pct", "eval_miou", "machine")
NEW_KEYS = ("card", "extract_stages", "steps_compared", "packed", "stage_seconds", "total_seconds", "errors")
STAGES = ("data", "forward", "extract", "train", "eval", "steps", "packed")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _fraction(value) -> bool:
    return isinstance(value, float) and 0 <= value <= 1


@pytest.mark.processes
def test_gpu_check_runs_end_to_end_at_a_tiny_size(tmp_path, capsys, monkeypatch, reuse_encoders):
    monkeypatch.setattr(pipeline.encode.families, "create_encoder", reuse_encoders)  # the forward-rate stage
    assert main(["--tiny", "--device", "cpu", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 1 and set(KEYS) <= set(record) and set(NEW_KEYS) <= set(record)
    assert record["steps"] == 3 and record["preset"] == "tiny" and record["device"] == "cpu"
    assert record["extract_views_per_s"] > 0 and record["forward_views_per_s"] > 0
    assert 0 <= record["data_wait_pct"] <= 100 and 0 <= record["eval_miou"] <= 100  # percent
    assert record["peak_gpu_memory_gib"] is None and record["gpu_utilisation_pct"] is None  # no GPU here
    assert (tmp_path / "cache" / "folder" / "train" / "view_order").is_dir()  # the shuffled layout was streamed
    assert record["errors"] == {} and record["card"] is None
    assert set(STAGES) <= set(record["stage_seconds"]) and all(_positive(v) for v in record["stage_seconds"].values())
    _check_extract_stages(record["extract_stages"], views=record["extract_views"])
    _check_steps(record["steps_compared"], tmp_path)
    _check_packed(record["packed"])


def _check_extract_stages(stages: dict, *, views: int) -> None:
    assert stages["shards"] >= 1 and stages["writers"] == 2 and stages["limit"] in ("render", "encode", "write")
    fractions = [stages[f"{part}_fraction"] for part in ("render", "encode", "write")]
    assert all(_fraction(f) for f in fractions) and sum(fractions) <= 1 + 1e-9
    assert all(_positive(stages[k]) for k in ("seconds", "encode", "encode_views_per_s", "writer_views_per_s",
                                              "encode_over_forward", "writer_busy"))
    assert stages["encode_views_per_s"] == pytest.approx(views / stages["encode"])


def _check_steps(steps: dict, work) -> None:
    profile = steps["profile"]
    assert profile["time"] == "cpu" and profile["steps"] == 3 and profile["device_busy_fraction"] is None
    top = profile["top"]
    assert 1 <= len(top) <= 12 and all(isinstance(row["name"], str) and row["calls"] >= 1 for row in top)
    shares = [row["share"] for row in top]
    assert all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9 and shares == sorted(shares, reverse=True)
    for name in ("cached_step", "online_step"):
        step = steps[name]
        assert step["timed_steps"] == 4 and 0 < step["samples"] <= 4 * 4  # 4 steps of at most 4 samples
        assert all(_positive(step[k]) for k in ("samples_per_s", "seconds", "gflop_per_sample", "achieved_tflops"))
        assert step["achieved_tflops"] == pytest.approx(step["samples_per_s"] * step["gflop_per_sample"] / 1e3)
        assert step["peak_tflops"] is None and step["peak_fraction"] is None and "no GPU" in step["peak_note"]
    assert steps["cached_over_online"] == pytest.approx(
        steps["cached_step"]["samples_per_s"] / steps["online_step"]["samples_per_s"])
    modes = {name: json.loads((work / name / "metrics.jsonl").read_text().splitlines()[0])["read_mode"]
             for name in ("step-cached", "step-online")}
    assert modes == {"step-cached": "stream", "step-online": "online"}  # each run took the data path it names


def _check_packed(packed: list) -> None:
    assert [row["runs"] for row in packed] == [1, 2, 4]
    for row in packed:
        assert len(row["samples_per_s_per_run"]) == row["runs"] and all(_positive(r) for r in row["samples_per_s_per_run"])
        assert row["samples_per_s_per_gpu"] == pytest.approx(sum(row["samples_per_s_per_run"]))
        assert _fraction(row["window_overlap"]) and row["barrier_timed_out"] is False
        assert _positive(row["gain_over_one"]) and _positive(row["achieved_tflops_per_gpu"])
    assert packed[0]["gain_over_one"] == 1.0


def test_extraction_is_attributed_to_its_largest_part():
    stages = {"first_render_wait": 2.0, "render_wait": 4.0, "encode": 2.0, "write_wait": 1.0, "writer_busy": 6.0,
              "writers": 2, "shards": 10}
    parts = extraction_parts(stages, views=1000, seconds=10.0, forward=1000.0)
    assert parts["limit"] == "render" and parts["render_fraction"] == pytest.approx(0.6)
    assert parts["encode_fraction"] == pytest.approx(0.2) and parts["write_fraction"] == pytest.approx(0.1)
    assert parts["encode_views_per_s"] == pytest.approx(500) and parts["encode_over_forward"] == pytest.approx(2)
    assert parts["writer_views_per_s"] == pytest.approx(1000 / 3)  # 2 writers, 6 busy seconds in all
    assert extraction_parts({**stages, "write_wait": 7.0}, views=1000, seconds=16.0, forward=1.0)["limit"] == "write"
    on_device = extraction_parts({**stages, "augment": 7.0}, views=1000, seconds=16.0, forward=1.0)
    assert on_device["limit"] == "augment" and on_device["augment_fraction"] == pytest.approx(7 / 16)
