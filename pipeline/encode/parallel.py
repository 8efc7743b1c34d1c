"""Extraction by several workers on a dask cluster, each owning whole shards.

Workers are separate processes (a LocalCluster by default, or any cluster the
caller's client points at). Each opens the store and the dataset itself and
builds its own copy of the frozen encoder; random-init weights are seeded by
the encoder name, so every worker computes the same features. Shards are dealt
round-robin, so no two workers ever touch the same shard file.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from pipeline.errors import UserError
from pipeline.store.layout import open_store


def _worker_extract(config_dict: dict, shards: list[int], slot: int, threads: int) -> list[tuple[str, str]]:
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
    return run_shards(config=config, shards=shards, quiet=True)


def run_parallel(*, config, shards: list[int], group_path: str, client=None, quiet: bool = False) -> list[tuple[str, str]]:
    """Deal ``shards`` over ``config.workers`` dask tasks and wait, showing progress."""
    from distributed import Client, LocalCluster

    from pipeline.encode.shards import threads_per_worker
    from pipeline.runtime import progress

    own = client is None
    cluster = None
    if own:
        cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        data = asdict(config)
        groups = [shards[w::config.workers] for w in range(config.workers)]
        threads = threads_per_worker(config.workers)
        futures = [client.submit(_worker_extract, data, g, w, threads, pure=False)
                   for w, g in enumerate(groups) if g]
        flags = open_store(config.out)[group_path]["shard_done"]
        wanted = np.asarray(shards)
        bar = progress(total=len(shards), desc="extract", quiet=quiet, unit="shard")
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            finished = int(np.asarray(flags[:])[wanted].sum())
            bar.update(finished - bar.n)
        bar.close()
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
