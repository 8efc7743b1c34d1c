"""The training augmentation on a torch device against the albumentations render path, in one run.

Both render the same planned shuffled-layout shards of the same images: the CPU
path decodes and augments in this thread (``render_shard``, as one render
thread or process does); the device path decodes here and augments the shard's
views batched on ``device`` (``render_shard`` + ``finish_on_device``, as
``extract --augment-backend gpu`` does). Rates are views/s in the steady state
(the first shard, with imports and warm-up, is left out), alternated within
each repeat; the figure to read is their ratio, measured in one run. torch runs
one thread on a CPU device, so both are per-core figures there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from pipeline.data.augment import AugmentConfig
from pipeline.runtime import load_average
from pipeline.store.splits import num_shards


def _rate(*, group, dataset, device: torch.device | None) -> float:
    """Views/s of rendering every shard but the first (``device`` None: albumentations on the host)."""
    from pipeline.encode.device_views import finish_on_device
    from pipeline.encode.shards import render_shard, split_rows

    rows, size = split_rows(group), int(group["masks"].shape[1])
    start, views = None, 0
    for shard in range(num_shards(group)):
        rendered = render_shard(dataset=dataset, group=group, shard=shard, input_size=size, skip_bad=False, rows=rows)
        if device is not None:
            rendered = finish_on_device(rendered, meta=rows.meta, size=size, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        if start is None:
            start = time.perf_counter()
        else:
            views += len(rendered.valid)
    return views / max(time.perf_counter() - start, 1e-9) if views else 0.0


def device_augment_rates(*, plan: Callable[[AugmentConfig], tuple], repeats: int, device: str) -> dict:
    """{device, views/s of each path, their ratio (median of the per-repeat ratios), torch threads, load}.

    ``plan(augment)`` plans the benchmark's store afresh with that augmentation and returns its (dataset, group).
    """
    from pipeline.data.augment_gpu import require_kornia

    require_kornia()
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"cpu": [], "device": []}
    load = load_average()
    try:
        for _ in range(repeats):
            for backend in ("cpu", "gpu"):
                dataset, group = plan(AugmentConfig(backend=backend))
                key = "cpu" if backend == "cpu" else "device"
                rates[key].append(_rate(group=group, dataset=dataset, device=None if backend == "cpu" else device))
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch_threads": used, "load_average": load, "load_average_after": load_average(),
            "cpu_render_views_per_s": statistics.median(rates["cpu"]),
            "device_views_per_s": statistics.median(rates["device"]),
            "device_vs_cpu_render": statistics.median(d / c for d, c in zip(rates["device"], rates["cpu"]) if c),
            "all": rates}
