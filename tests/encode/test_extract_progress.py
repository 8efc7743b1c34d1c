"""Extraction progress moves as views are encoded, not once per shard."""

from __future__ import annotations

import threading
import time

import pytest
from synthetic_data import TINY_VIEWS, write_folder_dataset
from synthetic_data import tiny_extract_config as tiny_config

import pipeline.encode.shards as shards
from pipeline.encode.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


class RecordingBar:
    """A stand-in for the tqdm bar that notes each update beside the shard writes."""

    def __init__(self, events: list, **kwargs) -> None:
        self.events, self.total, self.n, self.unit = events, kwargs["total"], 0, kwargs["unit"]

    def update(self, count: int = 1) -> None:
        self.n += count
        self.events.append(("views", self.n))

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.events.append(("status", text))

    def close(self) -> None:
        pass


def test_extraction_progress_advances_before_the_first_shard_is_written(tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setattr(shards, "progress", lambda **kwargs: RecordingBar(events, **kwargs))
    put = shards.ShardWriters.put
    monkeypatch.setattr(shards.ShardWriters, "put",
                        lambda self, shard, *rest: (events.append(("written", shard)), put(self, shard, *rest))[1])
    data = write_folder_dataset(tmp_path / "data")
    views = 6 * TINY_VIEWS  # the six images of the dataset, all in one shard
    extract(config=tiny_config(data, tmp_path / "store", vision_only=True, shard_size=views, batch_size=2),
            quiet=False)
    counts = [n for kind, n in events if kind == "views"]
    first_write = events.index(("written", 0))
    before = [n for kind, n in events[:first_write] if kind == "views"]
    assert len(before) == views // 2 and before[0] == 2  # one step per batch of 2 views, all before the write
    assert counts[-1] == views and counts == sorted(counts)
    assert events[0] == ("status", "rendering shard 0")  # says what it is doing before the first view is encoded


@pytest.mark.processes
def test_with_dask_workers_progress_counts_views_before_any_shard_is_written(tmp_path, monkeypatch):
    """The driver's bar moves in views as the workers encode them, not once per finished shard."""
    from distributed import Client, LocalCluster

    import pipeline.runtime

    events: list = []
    moved = threading.Event()

    bars: list = []

    class Bar(RecordingBar):
        def __init__(self, events: list, **kwargs) -> None:
            super().__init__(events, **kwargs)
            bars.append((self.unit, self.total))

        def update(self, count: int = 1) -> None:
            super().update(count)
            if self.n:
                moved.set()

    monkeypatch.setattr(pipeline.runtime, "progress", lambda **kwargs: Bar(events, **kwargs))
    put = shards.ShardWriters.put

    def held_put(self, shard, *rest):  # no shard is written until the driver's bar has moved (or 60 s pass)
        events.append(("bar moved before the write", moved.wait(timeout=60)))
        return put(self, shard, *rest)

    monkeypatch.setattr(shards.ShardWriters, "put", held_put)
    data = write_folder_dataset(tmp_path / "data")
    views = 6 * TINY_VIEWS
    config = tiny_config(data, tmp_path / "store", vision_only=True, shard_size=views // 2, batch_size=2, workers=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        extract(config=config, quiet=False, client=client)
        left = True  # the counters are deleted (a message the scheduler handles a moment later)
        for _ in range(100):
            left = client.run_on_scheduler(lambda dask_scheduler: [
                n for n in dask_scheduler.extensions["variables"].variables if n.startswith("fusioner-extract-")])
            if not left:
                break
            time.sleep(0.1)
        assert not left
    assert [e for e in events if e[0] == "bar moved before the write"] == [("bar moved before the write", True)] * 2
    counts = [n for kind, n in events if kind == "views"]
    assert counts == sorted(counts) and counts[-1] == views
    assert bars == [("view", views)]  # one bar, over every view of the split
