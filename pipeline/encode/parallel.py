"""Extraction by several workers on a dask cluster, each owning whole shards.

Workers are separate processes (a LocalCluster by default, or any cluster the
caller's client points at). Each opens the store and the dataset itself and
builds its own copy of the frozen encoder; random-init weights are seeded by
the encoder name, so every worker computes the same features. Shards are dealt
round-robin, so no two workers ever touch the same shard file.

Progress is counted in views, as the one-process path counts them: each worker publishes its
count of encoded views in a dask ``Variable`` at most twice a second, and the driver's bar shows
their sum (or the views of the shards already written, if that is more), with rate and time left.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from pipeline.errors import UserError
from pipeline.host import threads_each
from pipeline.store.layout import open_store


REPORT_EVERY_S = 0.5  # a worker publishes its view count at most this often


def _view_reporter(name: str) -> Callable[[int], None]:
    """Counts a worker's encoded views into the dask Variable ``name``, at most every REPORT_EVERY_S."""
    from distributed import Variable

    variable, state = Variable(name), {"views": 0, "sent": 0.0}

    def report(count: int) -> None:
        state["views"] += count
        now = time.monotonic()
        if now - state["sent"] >= REPORT_EVERY_S:
            variable.set(state["views"])
            state["sent"] = now
    return report


def _worker_extract(config_dict: dict, shards: list[int], slot: int, threads: int,
                    counter: str) -> list[tuple[str, str]]:
    import torch

    from pipeline.data.augment import AugmentConfig
    from pipeline.encode.config import ExtractConfig
    from pipeline.encode.shards import run_shards

    torch.set_num_threads(threads)
    config_dict = dict(config_dict)
    config_dict["augment"] = AugmentConfig(**config_dict["augment"])
    config = ExtractConfig(**config_dict)
    if config.device in ("auto", "cuda") and torch.cuda.is_available():
        config.device = f"cuda:{slot % torch.cuda.device_count()}"
    return run_shards(config=config, shards=shards, quiet=True, on_views=_view_reporter(counter))


def run_parallel(*, config, shards: list[int], group_path: str, client=None, quiet: bool = False) -> list[tuple[str, str]]:
    """Deal ``shards`` over ``config.workers`` dask tasks and wait, showing progress in views."""
    from distributed import Client, LocalCluster


    own = client is None
    cluster = None
    if own:
        cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        data = asdict(config)
        groups = [shards[w::config.workers] for w in range(config.workers)]
        threads = threads_each(config.workers)
        counters = view_counters(client=client, count=len(groups))
        futures = [client.submit(_worker_extract, data, g, w, threads, counters[w].name, pure=False)
                   for w, g in enumerate(groups) if g]
        watch_views(futures=futures, counters=counters, group=open_store(config.out)[group_path],
                    shards=shards, quiet=quiet)
        bad: list[tuple[str, str]] = []
        for future in futures:
            try:
                bad.extend(future.result())
            except UserError:
                raise
        return bad
    finally:
        if own:
            client.close()
            cluster.close()


def view_counters(*, client, count: int) -> list:
    """``count`` dask Variables at 0, one per worker task, named for this extraction alone."""
    from distributed import Variable

    run = uuid.uuid4().hex
    counters = [Variable(f"fusioner-extract-{run}-{w}", client=client) for w in range(count)]
    for counter in counters:
        counter.set(0)
    return counters


def watch_views(*, futures: list, counters: list, group, shards: list[int], quiet: bool,
                poll_s: float = 0.5) -> None:
    """The driver's bar until every future is done, in views: the workers' encoded views, or the
    views of the shards already written where that is more (a worker's last count may be unsent)."""
    from pipeline.runtime import progress
    from pipeline.store.splits import shard_bounds

    views = np.array([np.subtract(*shard_bounds(group, s)[::-1]) for s in shards], np.int64)
    wanted = np.asarray(shards)
    bar = progress(total=int(views.sum()), desc="extract", quiet=quiet, unit="view")
    try:
        while True:
            finished = all(f.done() for f in futures)
            written = int(views[np.asarray(group["shard_done"][:])[wanted].astype(bool)].sum())
            encoded = sum(int(counter.get()) for counter in counters)
            bar.update(max(0, min(max(written, encoded), bar.total) - bar.n))
            if finished:
                break
            time.sleep(poll_s)
    finally:
        bar.close()
        for counter in counters:
            counter.delete()
