"""Stage one: run the frozen encoders once and write their features into a store.

The work is planned before any pixel is decoded (image sizes from headers,
every view's box, flip and jitter from a seeded generator), written into the
store, and then done shard by shard. A shard is the unit of work, of writing
and of resuming: it is rendered, encoded in fixed batches and written whole,
then marked done. Re-running the same command skips finished shards, so a
killed run resumes and ends with the same bytes as an uninterrupted one.
Several workers (processes on one machine or on a dask cluster) each take
whole shards.

While the encoder runs on shard ``i``, a thread renders shard ``i + 1`` and
another writes shard ``i - 1``: decoding and writing overlap the forward pass.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import store as st
from pipeline.encoders import Encoders, create_encoder, get_spec
from pipeline.errors import UserError
from pipeline.images import AugmentConfig, ViewParams, render_view, sample_view, view_rng, window_boxes
from pipeline.progress import progress
from pipeline.prompts import TEMPLATES

TRAIN_SPLITS = {"train", "trn", "training"}


@dataclass
class ExtractConfig:
    """Everything that defines an extraction; saved in the store."""

    backbone: str
    out: str
    dataset: str | None = None
    data_root: str | None = None
    split: str = "train"
    dataset_options: dict = field(default_factory=dict)
    views: int = 1  # augmented views per training image
    eval_resize: bool = False  # evaluation images resized whole instead of sliding windows
    stride: int | None = None  # sliding-window stride; default 2/3 of the window
    seed: int = 0
    input_size: int | None = None
    batch_size: int = 32
    shard_size: int | None = None
    text_only: bool = False
    vision_only: bool = False  # skip the class-name embeddings (another store provides text)
    weights: str | None = None
    random_init: bool = False
    skip_bad: bool = False
    overwrite: bool = False
    workers: int = 1
    device: str = "auto"
    extra_names: list[str] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def kind(self) -> str:
        if self.split in TRAIN_SPLITS:
            return "views"
        return "resize" if self.eval_resize else "windows"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device '{name}'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return device


# --------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------- #


def _default_shard_size(*, tokens: int, dim: int, views_per_image: int, num_views: int) -> int:
    """About 16 MiB of fp16 features per shard, a multiple of the views per image."""
    per_view = max(tokens * dim * 2, 1)
    size = max(1, (16 << 20) // per_view)
    size = max(views_per_image, size - size % views_per_image)
    return max(1, min(size, num_views))


def plan_split(*, dataset, config: ExtractConfig, input_size: int, tokens: int, dim: int) -> st.SplitPlan:
    """Every view of the split, decided before decoding: sizes, boxes, flips, jitter."""
    from pipeline.datasets import BadRecordError

    kind = config.kind
    stride = config.stride or max(1, (2 * input_size) // 3)
    image_hw = np.zeros((len(dataset), 2), np.int32)
    rows: list[tuple[int, ViewParams]] = []
    skipped: list[list[str]] = []
    for index in range(len(dataset)):
        try:
            height, width = dataset.image_size(index)
        except BadRecordError as err:
            if not config.skip_bad:
                raise
            skipped.append([dataset.ids[index], str(err)])
            continue
        image_hw[index] = (height, width)
        if kind == "views":
            for k in range(config.views):
                rng = view_rng(seed=config.seed, image_index=index, view_index=k)
                rows.append((index, sample_view(rng=rng, height=height, width=width, aug=config.augment)))
        elif kind == "windows":
            for box in window_boxes(height=height, width=width, size=input_size, stride=stride):
                rows.append((index, ViewParams(box=box)))
        else:
            rows.append((index, ViewParams(box=(0, 0, width, height))))
    if not rows:
        raise UserError(f"{dataset.name} {dataset.split}: no readable images to extract")
    n = len(rows)
    per_image = config.views if kind == "views" else 1
    shard = config.shard_size or _default_shard_size(tokens=tokens, dim=dim, views_per_image=per_image,
                                                      num_views=n)
    described = dataset.describe()
    # Part of the signature a resumed run must match: the same folder, however its path is spelled.
    described["root"] = str(Path(described["root"]).resolve())
    described["lists"] = [str(Path(p).resolve()) for p in described["lists"]]
    meta = {"seed": config.seed, "views": config.views if kind == "views" else None,
            "stride": stride if kind == "windows" else None, "input_size": input_size,
            "augment": vars(config.augment) if kind == "views" else None,
            "dataset": described, "plan_skipped": skipped}
    return st.SplitPlan(
        dataset=dataset.name, split=dataset.split, kind=kind, image_ids=list(dataset.ids), image_hw=image_hw,
        view_image=np.array([r[0] for r in rows], np.int32),
        view_box=np.array([r[1].box for r in rows], np.int32).reshape(n, 4),
        view_flip=np.array([r[1].flip for r in rows], bool),
        view_jitter=np.array([r[1].jitter for r in rows], np.float32).reshape(n, 4),
        class_names=list(dataset.class_names), shard_size=shard, meta=meta,
    )


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


def render_shard(*, dataset, group, shard: int, input_size: int, skip_bad: bool) -> RenderedShard:
    """Decode each image of the shard once and render its views."""
    from pipeline.datasets import BadRecordError

    start, stop = st.shard_bounds(group, shard)
    view_image = group["view_image"][start:stop]
    boxes = group["view_box"][start:stop]
    flips = group["view_flip"][start:stop]
    jitter = group["view_jitter"][start:stop]
    n = stop - start
    images = np.zeros((n, input_size, input_size, 3), np.uint8)
    masks = np.full((n, input_size, input_size), 255, np.uint8)
    valid = np.zeros(n, bool)
    bad: list[tuple[str, str]] = []
    record, record_index, record_bad = None, -1, False
    for j in range(n):
        index = int(view_image[j])
        if index != record_index:
            record_index, record_bad = index, False
            try:
                record = dataset.load(index)
            except BadRecordError as err:
                if not skip_bad:
                    raise
                record_bad = True
                bad.append((dataset.ids[index], str(err)))
        if record_bad:
            continue
        params = ViewParams(box=tuple(int(v) for v in boxes[j]), flip=bool(flips[j]),
                            jitter=tuple(float(v) for v in jitter[j]))
        images[j], masks[j] = render_view(image=record.image, mask=record.mask, params=params, size=input_size)
        valid[j] = True
    return RenderedShard(shard=shard, images=images, masks=masks, valid=valid, bad=bad)


def encode_shard(*, encoders: Encoders, rendered: RenderedShard, batch_size: int) -> np.ndarray:
    """[S, in, in, 3] -> [S, h*w, D] float16, in fixed batches from the shard start."""
    vision = encoders.vision
    out = np.zeros((rendered.images.shape[0], vision.grid[0] * vision.grid[1], vision.dim), np.float16)
    for begin in range(0, out.shape[0], batch_size):
        batch = rendered.images[begin:begin + batch_size]
        out[begin:begin + batch_size] = vision.encode(batch).cpu().numpy().astype(np.float16)
    return out


def classes_in(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """[S, H, W] label masks -> [S, K] bool, class k+1 present in view s."""
    out = np.zeros((masks.shape[0], num_classes), bool)
    for s in range(masks.shape[0]):
        values = np.unique(masks[s])
        values = values[(values > 0) & (values <= num_classes)]
        out[s, values - 1] = True
    return out


def run_shards(*, config: ExtractConfig, shards: list[int], encoders: Encoders | None = None,
               dataset=None, quiet: bool = False, progress_desc: str = "extract") -> list[tuple[str, str]]:
    """Extract the given shards of a planned split; returns the (image id, reason) of bad images."""
    from pipeline.datasets import create_dataset

    root = st.open_store(config.out, mode="r+")
    attrs = st.store_attrs(root)
    dataset = dataset or create_dataset(config.dataset, root=config.data_root, split=config.split,
                                        skip_bad=config.skip_bad, **config.dataset_options)
    group = root[f"{dataset.name}/{dataset.split}"]
    input_size = int(attrs["input_size"])
    if encoders is None:
        encoders = create_encoder(config.backbone, text=False, weights=config.weights,
                                  random_init=config.random_init, input_size=input_size,
                                  device=resolve_device(config.device))
    num_classes = len(group.attrs["class_names"])
    total_views = sum(np.subtract(*st.shard_bounds(group, s)[::-1]) for s in shards)
    bad: list[tuple[str, str]] = []
    write_queue: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        while (item := write_queue.get()) is not None:
            shard, feats, rendered = item
            try:
                st.write_shard(group, shard=shard, features=feats, masks=rendered.masks,
                               classes=classes_in(rendered.masks, num_classes) & rendered.valid[:, None],
                               valid=rendered.valid)
            except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                errors.append(err)

    thread = threading.Thread(target=writer, name="store-writer", daemon=True)
    thread.start()
    bar = progress(total=int(total_views), desc=progress_desc, quiet=quiet, unit="view")
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="render") as pool:
            render = lambda s: render_shard(dataset=dataset, group=group, shard=s,  # noqa: E731
                                            input_size=input_size, skip_bad=config.skip_bad)
            pending = pool.submit(render, shards[0]) if shards else None
            for i, shard in enumerate(shards):
                rendered = pending.result()
                pending = pool.submit(render, shards[i + 1]) if i + 1 < len(shards) else None
                feats = encode_shard(encoders=encoders, rendered=rendered, batch_size=config.batch_size)
                bad.extend(rendered.bad)
                if errors:
                    raise errors[0]
                write_queue.put((shard, feats, rendered))
                bar.update(len(rendered.valid))
    finally:
        write_queue.put(None)
        thread.join()
        bar.close()
    if errors:
        raise errors[0]
    return bad


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


@dataclass
class ExtractReport:
    out: str
    split: str | None
    views: int
    shards_run: int
    shards_skipped: int
    text_classes: int
    bad: list[tuple[str, str]]
    pretrained: bool


def _text_names(dataset, config: ExtractConfig) -> list[str]:
    names = list(dataset.class_names)
    return names + [n for n in config.extra_names if n not in names]


# Class lists that need no data on disk (text-only stores): dataset name -> protocol.
_BUILTIN_VOCABULARIES = {"voc": "pascal5i", "pascal": "pascal5i", "coco": "coco20i", "coco2014": "coco20i"}


def builtin_names(config: ExtractConfig) -> list[str]:
    """Class names for a text-only extraction without a data root."""
    from pipeline.protocols import create_protocol

    names: list[str] = []
    if config.dataset:
        if config.dataset not in _BUILTIN_VOCABULARIES:
            raise UserError(f"--text-only without --data-root knows the class names of "
                            f"{', '.join(sorted(_BUILTIN_VOCABULARIES))}; give --data-root for '{config.dataset}'")
        names = list(create_protocol(_BUILTIN_VOCABULARIES[config.dataset]).class_names)
    return names + [n for n in config.extra_names if n not in names]


def extract(*, config: ExtractConfig, quiet: bool = False, client=None) -> ExtractReport:
    """Plan, then extract the missing shards of one dataset split (and its text)."""
    from pipeline.datasets import create_dataset, prompt_name

    spec = get_spec(config.backbone)
    if config.text_only and "text" not in spec.towers:
        raise UserError(f"--text-only: encoder '{spec.name}' has no text tower")
    want_vision = not config.text_only and "vision" in spec.towers
    if config.views < 1:
        raise UserError("--views must be at least 1")
    if config.workers < 1:
        raise UserError("--workers must be at least 1")
    dataset = None
    if want_vision:
        if not config.dataset or not config.data_root:
            raise UserError("extracting image features needs --dataset and --data-root")
        dataset = create_dataset(config.dataset, root=config.data_root, split=config.split,
                                 skip_bad=config.skip_bad, **config.dataset_options)
    elif config.dataset and config.data_root:
        dataset = create_dataset(config.dataset, root=config.data_root, split=config.split,
                                 skip_bad=config.skip_bad, **config.dataset_options)
    names = _text_names(dataset, config) if dataset is not None else builtin_names(config)
    if not want_vision and not names:
        raise UserError("--text-only needs --dataset (for its class names) or --names")
    device = resolve_device(config.device)
    input_size = config.input_size or spec.input_size
    if config.text_only and config.vision_only:
        raise UserError("--text-only and --vision-only exclude each other")
    want_text = "text" in spec.towers and not config.vision_only
    encoders = create_encoder(spec.name, vision=want_vision, text=want_text,
                              weights=config.weights, random_init=config.random_init,
                              input_size=input_size, device=device)
    grid = encoders.vision.grid if encoders.vision else None
    identity = st.store_identity(
        encoder=spec.name, weights=encoders.weights.to_dict(), input_size=input_size, grid=grid,
        vision_dim=spec.vision_dim or None, text_dim=spec.text_dim or None, mean=spec.mean, std=spec.std)
    root = st.open_or_create_store(config.out, identity=identity, overwrite=config.overwrite)
    text_count = 0
    if encoders.text is not None and names:
        known = set(st.read_text(root)[0]) if "text" in root else set()
        todo = [n for n in names if n not in known]
        if todo:
            emb = encoders.text.encode_names([prompt_name(n) for n in todo]).cpu().numpy()
            st.write_text(root, names=todo, embeddings=emb,
                          meta={"encoder": spec.name, "templates": list(TEMPLATES),
                                "prompt_names": {n: prompt_name(n) for n in names}})
        text_count = len(names)
    if not want_vision:
        return ExtractReport(out=config.out, split=None, views=0, shards_run=0, shards_skipped=0,
                             text_classes=text_count, bad=[], pretrained=encoders.weights.pretrained)
    tokens = grid[0] * grid[1]
    plan = plan_split(dataset=dataset, config=config, input_size=input_size, tokens=tokens, dim=spec.vision_dim)
    group = st.create_split(root, plan=plan, tokens=tokens, dim=spec.vision_dim, input_size=input_size)
    done = st.done_shards(group)
    todo = [int(s) for s in np.flatnonzero(~done)]
    if config.workers > 1 and len(todo) > 1:
        from pipeline.distributed import run_parallel

        del encoders
        bad = run_parallel(config=config, shards=todo, group_path=plan.group_path, client=client, quiet=quiet)
    else:
        bad = run_shards(config=config, shards=todo, encoders=encoders, dataset=dataset, quiet=quiet) if todo else []
    skipped = plan.meta["plan_skipped"] + [list(b) for b in bad]
    if skipped:
        group.attrs["skipped"] = sorted({tuple(s) for s in skipped} | {tuple(s) for s in group.attrs.get("skipped", [])})
    return ExtractReport(out=config.out, split=plan.group_path, views=plan.num_views, shards_run=len(todo),
                         shards_skipped=int(done.sum()), text_classes=text_count, bad=[tuple(s) for s in skipped],
                         pretrained=bool(identity["pretrained"]))


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)
