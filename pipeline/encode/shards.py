"""Shards, the unit of extraction work: render, encode, write, mark done."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.data.augment import AugmentConfig, augment_view, view_numbers
from pipeline.data.labels import IGNORE
from pipeline.data.views import ViewParams, pad_fill, render_view
from pipeline.encode.families import create_encoder
from pipeline.encode.config import ExtractConfig
from pipeline.encode.device_views import DecodedViews, finish_on_device, renders_on_device
from pipeline.encode.plan import open_extraction_dataset
from pipeline.encode.towers import Encoders
from pipeline.runtime import progress, resolve_device
from pipeline.store.layout import open_store, store_attrs
from pipeline.store.splits import shard_bounds, write_shard

# --------------------------------------------------------------------------- #
# Shards
# --------------------------------------------------------------------------- #


@dataclass
class RenderedShard:
    shard: int
    images: np.ndarray  # [S, in, in, 3] uint8
    masks: np.ndarray  # [S, in, in] uint8
    valid: np.ndarray  # [S] bool
    bad: list[tuple[str, str]]
    source: np.ndarray | None = None  # [S, K] bool: the classes of the whole image each view comes from
    classes: np.ndarray | None = None  # [S, K] bool: the classes in each view's mask (None: the writer counts them)
    cpu_seconds: float = 0.0  # CPU time of the rendering thread (robust to other processes' load, unlike the clock)
    decoded: DecodedViews | None = None  # views still to be augmented on the device (finish_on_device)


@dataclass(frozen=True)
class SplitRows:
    """What rendering needs from a split's plan, read from the store once, not once per shard."""

    meta: dict
    kind: str
    num_classes: int
    view_image: np.ndarray  # [V] the image of each stored row
    view_number: np.ndarray  # [V] its k among the image's views (the seed's view index)
    boxes: np.ndarray  # [V, 4]
    flips: np.ndarray  # [V]
    jitter: np.ndarray  # [V, 4]


def split_rows(group) -> SplitRows:
    view_image = group["view_image"][:]
    order = group["view_order"][:] if "view_order" in group else None  # a shuffled layout's plan rows
    return SplitRows(meta=group.attrs["meta"], kind=group.attrs["kind"],
                     num_classes=max(len(group.attrs["class_names"]), 1), view_image=view_image,
                     view_number=view_numbers(view_image, order=order), boxes=group["view_box"][:],
                     flips=group["view_flip"][:], jitter=group["view_jitter"][:])


def planned_view(record, *, meta: dict, kind: str, image_index: int, view_number: int, params: ViewParams,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
    """One planned row's pixels: the seeded augmentation for training views, the box for the others."""
    if kind == "views":
        return augment_view(image=record.image, mask=record.mask, config=AugmentConfig(**meta["augment"]),
                            size=size, seed=int(meta["seed"]), image_index=image_index, view_index=view_number)
    normalization = meta.get("normalize") or {}
    fill = pad_fill(fill=meta.get("window_fill", "black"), mean=normalization.get("mean", (0, 0, 0)),
                    std=normalization.get("std", (1, 1, 1))) if kind == "windows" else (0, 0, 0)
    return render_view(image=record.image, mask=record.mask, params=params, size=size, fill=fill)


def render_shard(*, dataset, group, shard: int, input_size: int, skip_bad: bool, rows: SplitRows | None = None,
                 images: np.ndarray | None = None, masks: np.ndarray | None = None) -> RenderedShard:
    """Decode each image of the shard once and render its views.

    Training views ("views" splits) come from the seeded augmentation of the whole
    image, view k of image i from (seed, i, k); evaluation views from their planned box.
    When the plan augments on the device, the images are only decoded (``decoded``), the
    classes left to the writer, and :func:`finish_on_device` renders the views.
    ``rows`` (:func:`split_rows`) saves reading the plan again; ``images`` [S, in, in, 3] and
    ``masks`` [S, in, in] uint8, when given, are filled in place (a render process's shared memory).
    """
    from pipeline.data.readers import BadRecordError

    started = time.thread_time()
    rows = rows or split_rows(group)
    start, stop = shard_bounds(group, shard)
    n = stop - start
    images = np.empty((n, input_size, input_size, 3), np.uint8) if images is None else images
    masks = np.empty((n, input_size, input_size), np.uint8) if masks is None else masks
    view_image = rows.view_image[start:stop]
    valid = np.zeros(n, bool)
    source = np.zeros((n, rows.num_classes), bool)
    classes = np.zeros((n, rows.num_classes), bool)
    bad: list[tuple[str, str]] = []
    record, record_index, record_bad, record_classes = None, -1, False, source[0]
    decoded = DecodedViews(count=n) if renders_on_device(rows.meta, rows.kind) else None
    slot = -1
    # Views of one image side by side decode it once; in a shuffled layout the same holds per shard.
    for j in np.argsort(view_image, kind="stable"):
        index, row = int(view_image[j]), start + int(j)
        if index != record_index:
            record_index, record_bad = index, False
            try:
                record = dataset.load(index)
                record_classes = (classes_in(record.mask[None], rows.num_classes)[0] if record.mask is not None
                                  else np.zeros(rows.num_classes, bool))
                slot = decoded.add_image(record) if decoded is not None else -1
            except BadRecordError as err:
                if not skip_bad:
                    raise
                record_bad = True
                bad.append((dataset.ids[index], str(err)))
        if record_bad:
            images[j], masks[j] = 0, IGNORE
            continue
        valid[j] = True
        source[j] = record_classes
        if decoded is not None:
            decoded.add_row(int(j), slot=slot, image_index=index, view_index=int(rows.view_number[row]))
            continue
        params = ViewParams(box=tuple(int(v) for v in rows.boxes[row]), flip=bool(rows.flips[row]),
                            jitter=tuple(float(v) for v in rows.jitter[row]))
        images[j], masks[j] = planned_view(record, meta=rows.meta, kind=rows.kind, image_index=index,
                                           view_number=int(rows.view_number[row]), params=params, size=input_size)
        classes[j] = classes_in(masks[j][None], rows.num_classes)[0]
    return RenderedShard(shard=shard, images=images, masks=masks, valid=valid, bad=bad, source=source,
                         classes=classes if decoded is None else None, cpu_seconds=time.thread_time() - started,
                         decoded=decoded)


def encode_shard(*, encoders: Encoders, rendered: RenderedShard, batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """[S, in, in, 3] -> [S, h*w, D] float16, in fixed batches from the shard start.

    ``on_batch`` is called with each batch's view count as it is encoded (the progress bar
    moves within a shard). On CUDA the images go up from pinned memory and the tokens come
    back into a pinned buffer, both asynchronously, with one synchronisation per shard
    (there the count follows the batches queued, at most the device's queue ahead).
    """
    on_batch = on_batch or (lambda count: None)
    vision = encoders.vision
    n = rendered.images.shape[0]
    shape = (n, vision.grid[0] * vision.grid[1], vision.dim)
    if vision.device.type != "cuda":
        out = np.zeros(shape, np.float16)
        for begin in range(0, n, batch_size):
            batch = rendered.images[begin:begin + batch_size]
            out[begin:begin + batch_size] = vision.encode(batch).cpu().numpy().astype(np.float16)
            on_batch(len(batch))
        return out
    images = torch.as_tensor(rendered.images)  # views augmented on the device are there already
    images = images if images.is_cuda or images.is_pinned() else images.pin_memory()
    out = torch.empty(shape, dtype=torch.float16, pin_memory=True)
    for begin in range(0, n, batch_size):
        tokens = vision.encode(images[begin:begin + batch_size], dtype=torch.float16)
        out[begin:begin + batch_size].copy_(tokens, non_blocking=True)
        on_batch(len(tokens))
    torch.cuda.current_stream(vision.device).synchronize()
    return out.numpy()


def classes_in(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """[S, H, W] uint8 label masks -> [S, K] bool, class k+1 present in view s.

    A 256-bin histogram per view (OpenCV's, a fraction of a millisecond for a photo-sized mask), not a sort.
    """
    import cv2

    out = np.zeros((masks.shape[0], num_classes), bool)
    for s in range(masks.shape[0]):
        counts = cv2.calcHist([np.ascontiguousarray(masks[s], np.uint8)], [0], None, [256], [0, 256]).reshape(-1)
        out[s] = counts[1:num_classes + 1] > 0
    return out


class ShardWriters:
    """``count`` threads writing whole shards from a bounded queue: one writer per shard, the encoder never waits
    on a write unless every writer is busy and the queue is full."""

    def __init__(self, *, group, num_classes: int, count: int):
        self.group, self.num_classes = group, num_classes
        self.queue: queue.Queue = queue.Queue(maxsize=2 * max(1, count))
        self.errors: list[BaseException] = []
        self.busy = [0.0] * max(1, count)  # seconds each writer spent writing (its own slot: no lock needed)
        self.threads = [threading.Thread(target=self._work, args=(i,), name=f"store-writer-{i}", daemon=True)
                        for i in range(max(1, count))]
        for thread in self.threads:
            thread.start()

    def _work(self, slot: int) -> None:
        while (item := self.queue.get()) is not None:
            shard, feats, rendered = item
            started = time.perf_counter()
            try:
                present = (rendered.classes if rendered.classes is not None
                           else classes_in(rendered.masks, self.num_classes))
                write_shard(self.group, shard=shard, features=feats, masks=rendered.masks,
                            classes=present & rendered.valid[:, None], valid=rendered.valid, source=rendered.source)
            except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                self.errors.append(err)
            self.busy[slot] += time.perf_counter() - started

    def put(self, shard: int, feats: np.ndarray, rendered: RenderedShard) -> None:
        if self.errors:
            raise self.errors[0]
        self.queue.put((shard, feats, rendered))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


@dataclass
class StageTimes:
    """Where the seconds of :func:`run_shards` went, for attributing a slow extraction.

    The main thread's wall time splits into waiting for a rendered shard (the first one apart:
    it includes starting the render processes), augmenting on the device (when the plan says so),
    encoding (upload, forward, download) and waiting
    for the writers (a full queue, then the last writes). ``writer_busy`` is the time the writer
    threads spent in ``write_shard``, summed over threads. A few clock reads per shard: free.
    """

    first_render_wait: float = 0.0
    render_wait: float = 0.0
    augment: float = 0.0  # views augmented on the encoder's device (augment backend gpu)
    encode: float = 0.0
    write_wait: float = 0.0
    writer_busy: float = 0.0
    writers: int = 0
    shards: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class StageClock:
    """Adds the main loop's stage times of :func:`run_shards` to a :class:`StageTimes`."""

    def __init__(self, times: StageTimes, *, writers: ShardWriters):
        self.times, self.writers = times, writers

    def rendered(self, renders):
        """``renders``, with the wait for each item counted."""
        items, first = iter(renders), True
        while True:
            started = time.perf_counter()
            rendered = next(items, None)
            waited = time.perf_counter() - started
            if first and rendered is not None:
                self.times.first_render_wait += waited
            else:
                self.times.render_wait += waited
            if rendered is None:
                return
            first = False
            self.times.shards += 1
            yield rendered

    @contextmanager
    def stage(self, name: str):
        """Adds the seconds of the ``with`` block to the field ``name``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.times, name, getattr(self.times, name) + time.perf_counter() - started)

    def finish(self) -> None:
        self.times.writer_busy += sum(self.writers.busy)
        self.times.writers = max(self.times.writers, len(self.writers.threads))


def _threaded_renders(render, shards: list[int]):
    """Render shard i + 1 in a thread while the caller encodes shard i."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="render") as pool:
        pending = pool.submit(render, shards[0]) if shards else None
        for i in range(len(shards)):
            rendered = pending.result()
            pending = pool.submit(render, shards[i + 1]) if i + 1 < len(shards) else None
            yield rendered


def _both(first: Callable[[int], None], second: Callable[[int], None]) -> Callable[[int], None]:
    def call(count: int) -> None:
        first(count)
        second(count)
    return call


def run_shards(*, config: ExtractConfig, shards: list[int], encoders: Encoders | None = None,
               dataset=None, quiet: bool = False, progress_desc: str = "extract",
               on_views: Callable[[int], None] | None = None,
               times: StageTimes | None = None) -> list[tuple[str, str]]:
    """Extract the given shards of a planned split; returns the (image id, reason) of bad images.

    ``on_views`` is called with each encoded batch's view count, beside the progress bar (a dask
    worker reports its count to the driver's bar through it). ``times``, when given, receives
    where the seconds went (:class:`StageTimes`).
    """
    from pipeline.encode.render_pool import rendered_shards

    root = open_store(config.out, mode="r+")
    attrs = store_attrs(root)
    dataset = dataset or open_extraction_dataset(config)
    group = root[f"{dataset.name}/{dataset.split}"]
    input_size = int(attrs["input_size"])
    if encoders is None:
        encoders = create_encoder(config.backbone, text=False, weights=config.weights,
                                  random_init=config.random_init, input_size=input_size,
                                  device=resolve_device(config.device))
    meta = group.attrs["meta"]
    normalization = meta.get("normalize")  # recorded by the plan: what every shard applies
    if normalization:
        encoders.vision.use_normalization(mean=normalization["mean"], std=normalization["std"])
    total_views = sum(np.subtract(*shard_bounds(group, s)[::-1]) for s in shards)
    if config.render_workers > 0 and shards:
        items = rendered_shards(render=render_shard, config=config, group_path=f"{dataset.name}/{dataset.split}",
                                shards=shards, input_size=input_size, workers=config.render_workers,
                                pin=encoders.vision.device.type == "cuda", plan_rows=split_rows)
        renders = (RenderedShard(shard=int(d["shard"]), images=d["images"], masks=d["masks"].numpy(),
                                 valid=d["valid"], bad=[tuple(b) for b in d["bad"]], source=d["source"],
                                 classes=d["classes"], cpu_seconds=d["cpu_seconds"],
                                 decoded=DecodedViews.from_dict(d["decoded"]) if d.get("decoded") else None)
                   for d in items)
    else:
        rows = split_rows(group)
        renders = _threaded_renders(lambda s: render_shard(dataset=dataset, group=group, shard=s, rows=rows,
                                                           input_size=input_size, skip_bad=config.skip_bad), shards)
    bad: list[tuple[str, str]] = []
    writers = ShardWriters(group=group, num_classes=len(group.attrs["class_names"]), count=config.writers)
    # Views count as they are encoded, batch by batch, with tqdm's rate and time left: a large
    # shard (or a whole split in one) no longer shows 0% until it is written.
    bar = progress(total=int(total_views), desc=progress_desc, quiet=quiet, unit="view")
    bar.set_postfix_str(f"rendering shard {shards[0]}" if shards else "", refresh=True)
    clock = StageClock(times if times is not None else StageTimes(), writers=writers)
    try:
        for rendered in clock.rendered(renders):
            bar.set_postfix_str(f"shard {rendered.shard}", refresh=False)
            with clock.stage("augment"):  # views the plan augments on the device: rendered there now
                rendered = finish_on_device(rendered, meta=meta, size=input_size,
                                            device=encoders.vision.device)
            with clock.stage("encode"):
                feats = encode_shard(encoders=encoders, rendered=rendered, batch_size=config.batch_size,
                                     on_batch=bar.update if on_views is None else _both(bar.update, on_views))
            bad.extend(rendered.bad)
            with clock.stage("write_wait"):
                writers.put(rendered.shard, feats, rendered)
    finally:
        with clock.stage("write_wait"):
            writers.close()
        clock.finish()
        bar.close()
    return bad

