"""Streaming training batches from a store larger than memory, fast enough to feed a GPU.

Read mode ``stream``. The split is cut into *blocks* of contiguous views (one
shard, or a fraction of one): every read is one contiguous slice of the
features and masks arrays, which zarr serves as one large sequential read of
a shard file. An epoch visits the blocks in a random order, ``buffer_blocks``
at a time, and shuffles the samples of those blocks together (a shuffle
buffer); with a store written in shuffled view order (``extract --layout
shuffled``) those blocks already mix many images.

``readers`` threads read the blocks ahead of the batches that need them (zarr
and numpy release the GIL while they read and decode), each block is dropped
after the last batch that uses it, and a batch ships only the features, the
uint8 view masks and the class numbers: the per-class binary targets and the
text rows are built on the device (:meth:`StreamBatch.to_device`). On CUDA the
host tensors are pinned so the copies are asynchronous.

The order depends only on (seed, epoch), never on which reader finishes
first, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.data.labels import IGNORE
from pipeline.store.reader import CachedSplit

# --------------------------------------------------------------------------- #
# Targets on the device
# --------------------------------------------------------------------------- #


def class_targets(*, masks: torch.Tensor, classes: torch.Tensor, novel: tuple[int, ...],
                  novel_pixels: str) -> torch.Tensor:
    """masks [B, H, W] uint8, classes [B, W] (0 = empty slot) -> targets [B, W, H, W] uint8 (0, 1, IGNORE).

    The same values as :func:`pipeline.training.batches.binary_targets`, computed where the tensors live.
    """
    m = masks.unsqueeze(1)  # [B, 1, H, W]
    c = classes.to(torch.uint8)[:, :, None, None]  # [B, W, 1, 1]
    hidden = m == IGNORE
    if novel_pixels == "ignore" and novel:
        hidden = hidden | torch.isin(m, torch.tensor(novel, dtype=torch.uint8, device=m.device))
    hidden = hidden | (c == 0)  # empty slots are ignored everywhere
    ignore = torch.full((), IGNORE, dtype=torch.uint8, device=m.device)
    return torch.where(hidden, ignore, (m == c).to(torch.uint8))


@dataclass
class StreamBatch:
    features: torch.Tensor  # [B, HW, Dv] float16 (pinned on CUDA)
    masks: torch.Tensor  # [B, S, S] uint8
    classes: torch.Tensor  # [B, W] int64, class value per slot, 0 = empty
    table: torch.Tensor  # [K, Dt] float32 class embeddings, already on the training device
    novel: tuple[int, ...]
    novel_pixels: str
    views: np.ndarray  # [B]

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, text [B, W, Dt], text_mask [B, W], targets [B, W, S, S]) on ``device``."""
        feats = self.features.to(device, non_blocking=True)
        masks = self.masks.to(device, non_blocking=True)
        classes = self.classes.to(device, non_blocking=True)
        mask = classes > 0
        table = self.table.to(device)
        text = table[(classes - 1).clamp(min=0)] * mask[..., None].to(table.dtype)
        targets = class_targets(masks=masks, classes=classes, novel=self.novel, novel_pixels=self.novel_pixels)
        return feats, text, mask, targets


# --------------------------------------------------------------------------- #
# The epoch's order, as blocks and batches
# --------------------------------------------------------------------------- #


def block_size(split: CachedSplit, *, block_views: int = 0) -> int:
    """Views per contiguous read: the shard size, or a divisor-aligned part of it."""
    shard = int(split.group.attrs["shard_size"])
    if block_views <= 0 or block_views >= shard:
        return shard
    return max(1, block_views)


def epoch_order(*, samples: list, block: int, rng: np.random.Generator,
                buffer_blocks: int) -> list[int]:
    """Sample indices of one epoch: blocks in a random order, samples shuffled within each buffer of blocks."""
    by_block: dict[int, list[int]] = {}
    for i, (view, _) in enumerate(samples):
        by_block.setdefault(view // block, []).append(i)
    blocks = sorted(by_block)
    rng.shuffle(blocks)
    order: list[int] = []
    for g in range(0, len(blocks), buffer_blocks):
        chunk = [i for b in blocks[g:g + buffer_blocks] for i in by_block[b]]
        order.extend(rng.permutation(chunk).tolist())
    return order


class _BlockCache:
    """Blocks read ahead by a thread pool, in the order the batches first need them."""

    def __init__(self, *, split: CachedSplit, block: int, schedule: list[int], readers: int, ahead: int,
                 direct: bool):
        self.split, self.block, self.schedule, self.ahead, self.direct = split, block, schedule, ahead, direct
        self.pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="stream-read")
        self.pending: OrderedDict[int, Future] = OrderedDict()
        self.next = 0

    def _read(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = b * self.block, min((b + 1) * self.block, self.split.num_views)
        rows = slice(start, stop)
        return (self.split.read("features", rows, direct=self.direct),
                self.split.read("masks", rows, direct=self.direct))

    def top_up(self) -> None:
        while self.next < len(self.schedule) and len(self.pending) < self.ahead:
            b = self.schedule[self.next]
            self.pending[b] = self.pool.submit(self._read, b)
            self.next += 1

    def get(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        while b not in self.pending:  # needed sooner than read-ahead reached it
            self.pending[self.schedule[self.next]] = self.pool.submit(self._read, self.schedule[self.next])
            self.next += 1
        return self.pending[b].result()

    def drop(self, b: int) -> None:
        self.pending.pop(b, None)

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _pinned(array: np.ndarray, pin: bool) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if pin else tensor


def stream_batches(*, split: CachedSplit, samples: list[tuple[int, tuple[int, ...]]], text: np.ndarray,
                   batch_size: int, epoch: int, seed: int, novel: tuple[int, ...], novel_pixels: str = "background",
                   device: torch.device | str = "cpu", readers: int = 4, block_views: int = 0,
                   buffer_blocks: int = 8, drop_last: bool = False, skip_batches: int = 0,
                   direct: bool = True) -> Iterator[StreamBatch]:
    """One epoch of :class:`StreamBatch`, in an order that depends only on (seed, epoch).

    ``text`` is [K, Dt] (row k-1 = class value k). ``skip_batches`` fast-forwards a resumed epoch
    without reading the blocks that only the skipped batches need. ``direct`` reads shard files with
    :func:`pipeline.store.fastread.read_rows` (zarr-python otherwise; the same values either way).
    """
    device = torch.device(device)
    rng = np.random.default_rng([seed, epoch, 1])
    block = block_size(split, block_views=block_views)
    order = epoch_order(samples=samples, block=block, rng=rng, buffer_blocks=buffer_blocks)
    width = max(len(c) for _, c in samples)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    batches = [order[b:b + batch_size] for b in range(0, stop, batch_size)][skip_batches:]
    needs = [sorted({samples[i][0] // block for i in chunk}) for chunk in batches]
    last_use = {b: n for n, need in enumerate(needs) for b in need}
    schedule = list(dict.fromkeys(b for need in needs for b in need))
    pin = device.type == "cuda" and torch.cuda.is_available()
    table = torch.from_numpy(np.ascontiguousarray(text, np.float32)).to(device)
    cache = _BlockCache(split=split, block=block, schedule=schedule, readers=readers,
                        ahead=max(2 * readers, buffer_blocks + readers), direct=direct)
    try:
        for n, chunk in enumerate(batches):
            cache.top_up()
            views = np.array([samples[i][0] for i in chunk])
            feats, masks = _gather(cache, views=views, block=block)
            classes = np.zeros((len(chunk), width), np.int64)
            for row, i in enumerate(chunk):
                cls = samples[i][1]
                classes[row, :len(cls)] = cls
            for b in needs[n]:
                if last_use[b] == n:
                    cache.drop(b)
            yield StreamBatch(features=_pinned(feats, pin), masks=_pinned(masks, pin),
                              classes=_pinned(classes, pin), table=table, novel=tuple(novel),
                              novel_pixels=novel_pixels, views=views)
    finally:
        cache.close()


def _gather(cache: _BlockCache, *, views: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's rows, gathered from the blocks in memory (one fancy index per block)."""
    first_feats, first_masks = cache.get(int(views[0]) // block)
    feats = np.empty((len(views), *first_feats.shape[1:]), first_feats.dtype)
    masks = np.empty((len(views), *first_masks.shape[1:]), first_masks.dtype)
    owners = views // block
    for b in np.unique(owners):
        rows = np.flatnonzero(owners == b)
        block_feats, block_masks = cache.get(int(b))
        local = views[rows] - int(b) * block
        feats[rows] = block_feats[local]
        masks[rows] = block_masks[local]
    return feats, masks
