"""Reading the cache for training and evaluation.

A :class:`CachedSplit` is one split of a vision store, paired with class-name
embeddings from a text store (the same store for CLIP, another for
``dino-b`` + ``bert-b``). :func:`training_batches` yields batches of
(features, text embeddings, per-class binary targets) for a fold's seen classes.

Two read modes: ``memory`` loads the split once (fully random batches), and
``shards`` reads a few whole shards at a time in a random order and shuffles
within them (for stores larger than RAM: every read is contiguous). A
background thread prepares the next batches while the model trains.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch

from pipeline.data.labels import IGNORE
from pipeline.errors import UserError
from pipeline.store.reader import CachedSplit

# --------------------------------------------------------------------------- #
# Training samples
# --------------------------------------------------------------------------- #


def training_pairs(*, split: CachedSplit, seen: tuple[int, ...],
                   classes_per_sample: Literal["1", "all"]) -> list[tuple[int, tuple[int, ...]]]:
    """Samples as (view, classes in W): one (view, class) pair each, or every seen class of the view."""
    seen_idx = np.asarray(sorted(seen), int) - 1
    present = split.view_classes[:, seen_idx] & split.view_valid[:, None]  # [N, |seen|]
    samples: list[tuple[int, tuple[int, ...]]] = []
    for view in np.flatnonzero(present.any(axis=1)):
        classes = tuple(int(seen_idx[j] + 1) for j in np.flatnonzero(present[view]))
        if classes_per_sample == "all":
            samples.append((int(view), classes))
        else:
            samples.extend((int(view), (c,)) for c in classes)
    if not samples:
        raise UserError(f"{split.path} {split.split}: no view shows any seen class of this fold")
    return samples


def binary_targets(*, masks: np.ndarray, classes: list[tuple[int, ...]], width: int,
                   novel: tuple[int, ...], novel_pixels: str) -> tuple[np.ndarray, np.ndarray]:
    """Label masks [B, H, W] -> per-class targets [B, width, H, W] (0, 1, IGNORE) and valid flags [B, width]."""
    batch, height, wide = masks.shape
    targets = np.full((batch, width, height, wide), IGNORE, np.uint8)
    valid = np.zeros((batch, width), bool)
    hide = np.isin(masks, np.asarray(novel, np.uint8)) if novel_pixels == "ignore" else None
    for b, cls in enumerate(classes):
        for j, c in enumerate(cls):
            target = (masks[b] == c).astype(np.uint8)
            target[masks[b] == IGNORE] = IGNORE
            if hide is not None:
                target[hide[b]] = IGNORE
            targets[b, j] = target
            valid[b, j] = True
    return targets, valid


@dataclass
class Batch:
    features: torch.Tensor  # [B, HW, Dv] float16
    text: torch.Tensor  # [B, C, Dt] float32
    text_mask: torch.Tensor  # [B, C] bool
    targets: torch.Tensor  # [B, C, S, S] uint8 (0, 1, IGNORE)
    views: np.ndarray  # [B]


def _epoch_order(*, samples, split: CachedSplit, rng: np.random.Generator, mode: str,
                 buffer_shards: int) -> list[int]:
    if mode == "memory":
        return list(rng.permutation(len(samples)))
    size = int(split.group.attrs["shard_size"])
    by_shard: dict[int, list[int]] = {}
    for i, (view, _) in enumerate(samples):
        by_shard.setdefault(view // size, []).append(i)
    shards = list(by_shard)
    rng.shuffle(shards)
    order: list[int] = []
    for g in range(0, len(shards), buffer_shards):
        block = [i for s in shards[g:g + buffer_shards] for i in by_shard[s]]
        order.extend(rng.permutation(block).tolist())
    return order


def training_batches(*, split: CachedSplit, samples: list[tuple[int, tuple[int, ...]]], text: np.ndarray,
                     batch_size: int, epoch: int, seed: int, novel: tuple[int, ...],
                     novel_pixels: str = "background", mode: Literal["memory", "shards"] = "memory",
                     buffer_shards: int = 4, memory: dict | None = None, drop_last: bool = False,
                     skip_batches: int = 0) -> Iterator[Batch]:
    """One epoch of batches, in an order that depends only on (seed, epoch).

    ``text`` is [K, Dt] for the split's classes (row k-1 = class value k).
    ``memory`` (from :func:`load_into_memory`) holds features and masks.
    ``skip_batches`` fast-forwards a resumed epoch without reading data.
    """
    rng = np.random.default_rng([seed, epoch])
    order = _epoch_order(samples=samples, split=split, rng=rng, mode=mode, buffer_shards=buffer_shards)
    width = max(len(c) for _, c in samples)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for number, begin in enumerate(range(0, stop, batch_size)):
        if number < skip_batches:
            continue
        chunk = [samples[i] for i in order[begin:begin + batch_size]]
        views = np.array([v for v, _ in chunk])
        classes = [c for _, c in chunk]
        if memory is not None:
            feats, masks = memory["features"][views], memory["masks"][views]
        else:
            feats, masks = split.features(views), split.masks(views)
        targets, valid = binary_targets(masks=masks, classes=classes, width=width, novel=novel,
                                        novel_pixels=novel_pixels)
        txt = np.zeros((len(chunk), width, text.shape[1]), np.float32)
        for b, cls in enumerate(classes):
            txt[b, :len(cls)] = text[np.asarray(cls) - 1]
        yield Batch(features=torch.from_numpy(np.ascontiguousarray(feats)), text=torch.from_numpy(txt),
                    text_mask=torch.from_numpy(valid), targets=torch.from_numpy(targets), views=views)


def prefetch(iterator: Iterator, *, depth: int = 3, pin: bool = False) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    failure: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterator:
                if pin and torch.cuda.is_available():
                    item = Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                                    for k, v in vars(item).items()})
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            failure.append(err)
        finally:
            # A consumer that stopped early (max_steps, an error) never drains the
            # queue: a plain put would block this thread, and the batches it holds, forever.
            while not stop.is_set():
                try:
                    items.put(sentinel, timeout=0.1)
                    break
                except queue.Full:
                    continue

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is sentinel:
                if failure:
                    raise failure[0]
                return
            yield item
    finally:
        stop.set()
