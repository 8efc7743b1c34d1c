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
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from pipeline import store as st
from pipeline.errors import UserError


def class_embeddings(*, text_store: str | Path, names: list[str], encode_missing: bool = True,
                     device: str = "cpu") -> np.ndarray:
    """[len(names), Dt] embeddings; names absent from the store are encoded on demand.

    On-demand encoding rebuilds the store's own text encoder with the same
    weights (random-init weights are seeded by name, so they match too).
    """
    from pipeline.datasets import prompt_name

    root = st.open_store(text_store)
    known, table = st.read_text(root) if "text" in root else ([], np.zeros((0, 0), np.float32))
    index = {n: i for i, n in enumerate(known)}
    missing = [n for n in names if n not in index]
    extra = {}
    if missing:
        if not encode_missing:
            raise UserError(f"{text_store} has no embedding for: {', '.join(missing[:5])}")
        encoders = text_encoder_of(text_store, device=device)
        emb = encoders.text.encode_names([prompt_name(n) for n in missing]).cpu().numpy()
        extra = dict(zip(missing, emb))
    return np.stack([table[index[n]] if n in index else extra[n] for n in names]).astype(np.float32)


def text_encoder_of(store_path: str | Path, *, device: str = "cpu"):
    """The text encoder that made a store, rebuilt from its attributes."""
    return encoder_of(store_path, vision=False, text=True, device=device)


def encoder_of(store_path: str | Path, *, vision: bool, text: bool, device: str = "cpu"):
    """The frozen encoder(s) that made a store, rebuilt with the same weights and input size."""
    from pipeline.encoders import create_encoder

    attrs = st.store_attrs(st.open_store(store_path))
    weights = attrs["weights"]
    source = weights["source"]
    if not weights["pretrained"]:
        kwargs = {"random_init": True}
    elif source.startswith("hub:") or "/" not in source:
        kwargs = {}
    else:
        kwargs = {"weights": source}
    return create_encoder(attrs["encoder"], vision=vision, text=text, device=device,
                          input_size=attrs["input_size"] if vision else None, **kwargs)


@dataclass
class CachedSplit:
    """One split of a vision store, its plan arrays in memory, features on demand."""

    path: Path
    split: str
    group: object
    class_names: list[str]
    grid: tuple[int, int]
    input_size: int
    view_image: np.ndarray
    view_box: np.ndarray
    view_flip: np.ndarray
    view_classes: np.ndarray  # [N, K] bool
    view_valid: np.ndarray
    image_ids: list[str]
    image_hw: np.ndarray
    kind: str
    pretrained: bool

    @property
    def num_views(self) -> int:
        return int(self.view_image.shape[0])

    def features(self, index: np.ndarray | slice) -> np.ndarray:
        return _take(self.group["features"], index)

    def masks(self, index: np.ndarray | slice) -> np.ndarray:
        return _take(self.group["masks"], index)


def _take(array, index):
    """Rows ``index`` of a zarr array, in order.

    A contiguous run is one slice; otherwise one read per row, which zarr serves
    from the shard index far faster than an orthogonal selection over a shard.
    """
    if isinstance(index, slice):
        return array[index]
    index = np.asarray(index)
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return array[int(index[0]):int(index[0]) + index.size]
    return np.stack([array[int(i)] for i in index]) if index.size else array[0:0]


def open_split(*, store: str | Path, split: str | None = None, require_complete: bool = True) -> CachedSplit:
    """Open ``store``'s split (the only one when ``split`` is None)."""
    root = st.open_store(store)
    attrs = st.store_attrs(root)
    splits = st.list_splits(root)
    if split is None:
        if len(splits) != 1:
            raise UserError(f"{store} holds splits {', '.join(splits) or 'none'}: name one with --split")
        split = splits[0]
    group = st.open_split(root, split)
    done = st.done_shards(group)
    if require_complete and not done.all():
        raise UserError(f"{store} {split}: {int((~done).sum())} of {done.size} shards not written yet; "
                        f"re-run the same `fusioner extract` to finish it")
    return CachedSplit(
        path=Path(store), split=split, group=group, class_names=list(group.attrs["class_names"]),
        grid=tuple(attrs["grid"]), input_size=int(attrs["input_size"]),
        view_image=np.asarray(group["view_image"][:]), view_box=np.asarray(group["view_box"][:]),
        view_flip=np.asarray(group["view_flip"][:]), view_classes=np.asarray(group["view_classes"][:]),
        view_valid=np.asarray(group["view_valid"][:]), image_ids=list(group.attrs["image_ids"]),
        image_hw=np.asarray(group["image_hw"][:]), kind=str(group.attrs["kind"]),
        pretrained=bool(attrs["pretrained"]),
    )


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
    """Label masks [B, H, W] -> per-class targets [B, width, H, W] (0/1/255) and valid flags [B, width]."""
    batch, height, wide = masks.shape
    targets = np.full((batch, width, height, wide), 255, np.uint8)
    valid = np.zeros((batch, width), bool)
    hide = np.isin(masks, np.asarray(novel, np.uint8)) if novel_pixels == "ignore" else None
    for b, cls in enumerate(classes):
        for j, c in enumerate(cls):
            target = (masks[b] == c).astype(np.uint8)
            target[masks[b] == 255] = 255
            if hide is not None:
                target[hide[b]] = 255
            targets[b, j] = target
            valid[b, j] = True
    return targets, valid


@dataclass
class Batch:
    features: torch.Tensor  # [B, HW, Dv] float16
    text: torch.Tensor  # [B, C, Dt] float32
    text_mask: torch.Tensor  # [B, C] bool
    targets: torch.Tensor  # [B, C, S, S] uint8 (0, 1, 255)
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


def load_into_memory(split: CachedSplit) -> dict:
    """Features and masks of the whole split, read shard by shard (contiguous)."""
    return {"features": split.features(slice(None)), "masks": split.masks(slice(None))}


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
