"""Rendering shards ahead of the encoder in a pool of worker processes.

Decoding JPEGs and rendering views (crop, resize, flip, jitter) is CPU work
that one thread cannot do at a GPU's rate. :func:`rendered_shards` hands whole
shards to ``workers`` processes through a torch DataLoader and yields them in
the order asked for, each shard's images already in pinned host memory when
the encoder runs on CUDA.

The workers are *spawned*, never forked: zarr keeps a background event loop
thread, and a forked child can inherit its lock held. Each worker opens the
store and the dataset itself on its first shard (only the config travels), and
renders with the function it is given (``render_shard``), so whatever that
function renders, the pool renders too, and the bytes are the same as in one
process.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterator

import torch

from pipeline.encode.config import ExtractConfig, config_from_dict
from pipeline.encode.plan import open_extraction_dataset
from pipeline.errors import UserError


class ShardSource(torch.utils.data.Dataset):
    """Item ``i`` is shard ``shards[i]`` rendered by ``render``, as a dict of tensors.

    Picklable: the config, ``render`` and ``plan_rows`` (module-level functions, pickled by name).
    ``plan_rows(group)``, when given, reads what ``render`` needs of the plan once per process (its ``rows=``).
    """

    def __init__(self, *, render, config: dict, group_path: str, shards: list[int], input_size: int,
                 plan_rows=None):
        self.render, self.config, self.group_path, self.plan_rows = render, config, group_path, plan_rows
        self.shards, self.input_size = list(shards), input_size
        self._state = None

    def __len__(self) -> int:
        return len(self.shards)

    def _open(self):
        from pipeline.store.layout import open_store

        if self._state is None:
            config = config_from_dict(self.config)
            dataset = open_extraction_dataset(config)  # the same images as the plan (--episodes included)
            group = open_store(config.out)[self.group_path]
            self._state = (dataset, group, self.plan_rows(group) if self.plan_rows else None, config.skip_bad)
        return self._state

    def __getitem__(self, i: int) -> dict:
        from pipeline.store.splits import shard_bounds

        dataset, group, rows, skip_bad = self._open()
        start, stop = shard_bounds(group, self.shards[i])
        count, size = stop - start, self.input_size
        # Images and masks are rendered straight into one block of shared memory: it crosses to the parent as one
        # file descriptor, not a copy, and not one descriptor per array (each is a round trip between the two
        # processes, which a loaded machine schedules late). The small arrays travel pickled.
        pixels = torch.empty(count * size * size * 4, dtype=torch.uint8).share_memory_()
        images, masks = _split_pixels(pixels, count=count, size=size)
        rendered = self.render(dataset=dataset, group=group, shard=self.shards[i], input_size=size,
                               skip_bad=skip_bad, rows=rows, images=images.numpy(), masks=masks.numpy())
        return {"shard": rendered.shard, "pixels": pixels, "count": count, "valid": rendered.valid,
                "source": rendered.source, "classes": rendered.classes, "bad": [list(b) for b in rendered.bad],
                "cpu_seconds": rendered.cpu_seconds,
                "decoded": rendered.decoded.as_dict() if rendered.decoded is not None else None}


def _split_pixels(pixels: torch.Tensor, *, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One flat uint8 block -> (images [n, S, S, 3], masks [n, S, S]), views of it."""
    split = count * size * size * 3
    return pixels[:split].view(count, size, size, 3), pixels[split:].view(count, size, size)


def _as_is(item: dict) -> dict:
    """The DataLoader's collate step: nothing (its default would turn every small array into a shared tensor)."""
    return item


def one_thread_per_process(_worker: int = 0) -> None:
    """A render process renders on one core: torch's and OpenCV's thread pools would only compete with the
    other render processes (OpenCV's blurs, warps and histograms are parallel by default)."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def rendered_shards(*, render, config: ExtractConfig, group_path: str, shards: list[int], input_size: int,
                    workers: int, pin: bool, plan_rows=None) -> Iterator[dict]:
    """Yield ``shards`` rendered by ``render(dataset=, group=, shard=, input_size=, skip_bad=, rows=, images=,
    masks=)`` in ``workers`` processes, in order, as dicts of the rendered fields (images and masks tensors, in
    pinned memory when ``pin``; valid, source and classes arrays)."""
    source = ShardSource(render=render, config=asdict(config), group_path=group_path, shards=shards,
                         input_size=input_size, plan_rows=plan_rows)
    loader = torch.utils.data.DataLoader(
        source, batch_size=None, shuffle=False, num_workers=workers, multiprocessing_context="spawn",
        pin_memory=pin, prefetch_factor=2, worker_init_fn=one_thread_per_process, persistent_workers=False,
        collate_fn=_as_is)
    iterator = iter(loader)
    try:
        try:
            for item in iterator:
                item["images"], item["masks"] = _split_pixels(item.pop("pixels"), count=item.pop("count"),
                                                              size=input_size)
                yield item
        finally:
            _close(iterator)
    except (RuntimeError, EOFError, ConnectionError) as err:
        if not render_process_died(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"a render process died ({first.rstrip('. ')}); finished shards are kept: run the same "
                        f"command to resume (with fewer `render_workers` if memory ran out)") from None


def render_process_died(err: BaseException) -> bool:
    """Whether ``err``, raised while reading the render processes' results, says one of them died.

    The DataLoader's own words (OOM killer, kill -9), or a connection lost mid-transfer: a process that
    dies while handing over its shared block leaves the parent an ``EOFError`` or a refused or reset
    connection before the DataLoader has noticed. An error raised inside a render process and re-raised
    here names that process ("in DataLoader worker process") and is not a death.
    """
    text = str(err)
    if "in DataLoader worker process" in text:
        return False
    if isinstance(err, RuntimeError):
        first = (text.strip().splitlines() or [""])[0]
        return "exited unexpectedly" in first or "killed by signal" in first
    return True


def _close(iterator) -> None:
    """Shut the render processes down now, not when the iterator is collected.

    Until then torch keeps their pids in its SIGCHLD handler, which raises "killed by signal" wherever
    the main thread happens to be when a dead one is reaped: after the one-line error above was raised,
    that was the shard writers' join in ``run_shards``, and the user got a traceback. Its shutdown
    drops the pids in a ``finally``, so a signal handled during it is raised here, inside the
    conversion, and none is raised after it.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)  # a single-process loader has none
    if shutdown is not None:
        shutdown()

