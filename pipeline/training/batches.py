"""Reading the cache for training and evaluation.

A :class:`CachedSplit` is one split of a vision store, paired with class-name
embeddings from a text store (the same store for CLIP, another for
``dino-b`` + ``bert-b``). :func:`training_batches` yields batches of
(features, text embeddings, per-class binary targets) for a fold's seen classes.

:func:`training_batches` serves the ``memory`` read mode (the split loaded once,
fully random batches); stores larger than memory stream instead
(:mod:`pipeline.training.stream`). A background thread prepares the next
batches while the model trains (:func:`prefetch`).
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


def image_pairs(*, split: CachedSplit, classes_per_sample: Literal["1", "all"], seen: tuple[int, ...] = (),
                view_pairs: list | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """Samples as (image, classes in W), as the released code counts them: an epoch is one pass over these.

    An image's classes are the seen classes of the whole image (``source_classes``, recorded
    at extraction before any crop), as the released code and online training count them: the
    number of samples, and with it the steps of an epoch, does not depend on K or on what the
    crops kept. A view whose crop lost a sample's class trains on an empty target, as a fresh
    crop would. Stores made before ``source_classes`` fall back to the union over the K views.
    """
    if view_pairs is None and split.source_classes is not None:
        view_pairs = _whole_image_pairs(split=split, seen=seen)
    if view_pairs is None:  # (view, every seen class of it), as training_pairs gives with "all"
        view_pairs = training_pairs(split=split, seen=seen, classes_per_sample="all")
    by_image = [(int(split.view_image[v]), classes) for v, classes in view_pairs]
    union: dict[int, set[int]] = {}
    for image, classes in by_image:
        union.setdefault(image, set()).update(classes)
    if classes_per_sample == "all":
        return [(image, tuple(sorted(classes))) for image, classes in sorted(union.items())]
    return [(image, (c,)) for image, classes in sorted(union.items()) for c in sorted(classes)]


def _whole_image_pairs(*, split: CachedSplit, seen: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """(view, seen classes of the view's whole image) for every valid view that has any."""
    seen_idx = np.asarray(sorted(seen), int) - 1
    present = split.source_classes[:, seen_idx] & split.view_valid[:, None]
    pairs = [(int(v), tuple(int(seen_idx[j] + 1) for j in np.flatnonzero(present[v])))
             for v in np.flatnonzero(present.any(axis=1))]
    if not pairs:
        raise UserError(f"{split.path} {split.split}: no image shows any seen class of this fold")
    return pairs


def view_table(split: CachedSplit) -> np.ndarray:
    """[M, K] view rows of each image (valid views only; -1 pads images with fewer)."""
    rows: dict[int, list[int]] = {}
    for view in np.flatnonzero(split.view_valid):
        rows.setdefault(int(split.view_image[view]), []).append(int(view))
    width = max((len(r) for r in rows.values()), default=1)
    table = np.full((len(split.image_ids), width), -1, np.int64)
    for image, views in rows.items():
        table[image, :len(views)] = views
    return table


def epoch_pairs(*, pairs: list[tuple[int, tuple[int, ...]]], table: np.ndarray, epoch: int,
                seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """The (view, classes) samples of one epoch: each image shows one of its K views.

    Views are drawn without replacement: epochs ``c*K .. c*K+K-1`` walk a permutation
    of the K views drawn from (seed, c), so every view is used once before any repeats.
    """
    counts = (table >= 0).sum(axis=1)
    width = table.shape[1]
    cycle_length = max(width, 1)
    cycle, position = divmod(epoch, cycle_length)
    keys = np.random.default_rng([seed, cycle, 7]).random(table.shape)
    keys[table < 0] = np.inf  # padded slots sort last
    order = np.argsort(keys, axis=1, kind="stable")
    chosen = {}
    out = []
    for image, classes in pairs:
        if image not in chosen:
            chosen[image] = int(table[image, order[image, position % max(int(counts[image]), 1)]])
        out.append((chosen[image], classes))
    return out


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

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, text, text_mask, targets) on ``device``."""
        return tuple(t.to(device, non_blocking=True) for t in (self.features, self.text, self.text_mask,
                                                                self.targets))


def jitter_features(features: np.ndarray, *, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Feature-space "brightness/contrast": a random gain and offset per sample and channel.

    Tokens [B, T, D] become ``f * (1 + s g) + s r b`` with g, b standard normal per
    (sample, channel) and r the sample's token RMS; every token of a sample moves
    alike, so the spatial layout (what the masks describe) is untouched.
    """
    feats = features.astype(np.float32)
    batch, _, dim = feats.shape
    rms = np.sqrt((feats ** 2).mean(axis=(1, 2), keepdims=True))
    gain = 1.0 + strength * rng.standard_normal((batch, 1, dim)).astype(np.float32)
    offset = strength * rms * rng.standard_normal((batch, 1, dim)).astype(np.float32)
    return (feats * gain + offset).astype(features.dtype)


def training_batches(*, samples: list[tuple[int, tuple[int, ...]]], memory: dict, text: np.ndarray,
                     batch_size: int, epoch: int, seed: int, novel: tuple[int, ...],
                     novel_pixels: str = "background", drop_last: bool = False,
                     skip_batches: int = 0, feature_noise: float = 0.0) -> Iterator[Batch]:
    """One epoch of batches of (view, classes) ``samples``, in an order that depends only on (seed, epoch).

    ``text`` is [K, Dt] for the split's classes (row k-1 = class value k).
    ``memory`` (from :func:`load_into_memory`) holds features and masks.
    ``skip_batches`` fast-forwards a resumed epoch without reading data.
    ``feature_noise`` > 0 jitters the cached tokens (:func:`jitter_features`).
    """
    rng = np.random.default_rng([seed, epoch])
    order = list(rng.permutation(len(samples)))
    width = max(len(c) for _, c in samples)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for number, begin in enumerate(range(0, stop, batch_size)):
        if number < skip_batches:
            continue
        chunk = [samples[i] for i in order[begin:begin + batch_size]]
        views = np.array([v for v, _ in chunk])
        classes = [c for _, c in chunk]
        feats, masks = memory["features"][views], memory["masks"][views]
        if feature_noise:
            feats = jitter_features(feats, strength=feature_noise, rng=np.random.default_rng([seed, epoch, number, 1]))
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

    def offer(item) -> bool:
        """Put ``item`` unless the consumer has stopped; whether it was put."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if pin and isinstance(item, Batch) and torch.cuda.is_available():
                    item = Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                                    for k, v in vars(item).items()})
                if not offer(item):
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            failure.append(err)
        finally:
            # A consumer that stopped early (max_steps, an error) never drains the
            # queue: a plain put would block this thread, and the batches it holds, forever.
            offer(sentinel)

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
