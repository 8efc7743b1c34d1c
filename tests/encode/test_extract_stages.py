"""An extraction says where its seconds went: waiting for renders, encoding, waiting for the writers."""

from __future__ import annotations

import time

import pytest
from synthetic_data import TINY_VIEWS, write_folder_dataset
from synthetic_data import tiny_extract_config as tiny_config

import pipeline.encode.shards as shards
from pipeline.encode.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")

DELAY = 0.15  # seconds added to every shard's render or write


def _extract_slowed(tmp_path, monkeypatch, *, stage: str):
    real = getattr(shards, stage)

    def slow(*args, **kwargs):
        time.sleep(DELAY)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, stage, slow)
    data = write_folder_dataset(tmp_path / "data")
    report = extract(config=tiny_config(data, tmp_path / "store", vision_only=True, shard_size=TINY_VIEWS,
                                        writers=1), quiet=True)
    return report, report.stages


def _main_thread_seconds(stages: dict) -> float:
    return stages["first_render_wait"] + stages["render_wait"] + stages["encode"] + stages["write_wait"]


def test_slow_writes_show_as_writer_time_not_render_wait(tmp_path, monkeypatch):
    report, stages = _extract_slowed(tmp_path, monkeypatch, stage="write_shard")
    shards_run = report.shards_run
    assert stages["shards"] == shards_run >= 4 and stages["writers"] == 1
    assert stages["writer_busy"] >= 0.95 * DELAY * shards_run
    assert stages["write_wait"] >= DELAY  # at least the last write is waited for
    assert stages["render_wait"] < stages["writer_busy"]
    assert 0 < _main_thread_seconds(stages) <= report.shard_seconds


def test_slow_renders_show_as_render_wait(tmp_path, monkeypatch):
    report, stages = _extract_slowed(tmp_path, monkeypatch, stage="render_shard")
    shards_run = report.shards_run
    assert stages["shards"] == shards_run >= 4
    assert stages["first_render_wait"] >= 0.95 * DELAY  # nothing to overlap the first render with
    # Rendering runs one shard ahead in a thread: the encoder waits for most of each later render.
    assert stages["first_render_wait"] + stages["render_wait"] >= 0.6 * DELAY * shards_run
    assert stages["writer_busy"] < stages["render_wait"]
    assert 0 < _main_thread_seconds(stages) <= report.shard_seconds
