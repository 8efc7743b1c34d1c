"""Data-path benchmark: can the CPU side feed a GPU?  ``python -m pipeline.bench datapath``

Three capacities, the encoder and the model left out, each as a ratio to a
reference measured in the same run (wall-clock figures on a shared machine
move; ratios within one run much less):

(1) **render**: decode + augment + write of a shuffled-layout extraction with
    ``W`` = 1 and 2 render processes (the encoder replaced by writing zeros of
    the real feature size), in views/s after the first shard arrives (process
    start-up excluded); scaling efficiency = rate(W=2) / (2 x rate(W=1)).
    Today's single render thread (W=0) is given beside them.
(2) **write**: whole shards of clip-l-sized random features through
    ``write_shard`` by the extraction's writer threads, against plain
    sequential ``write()`` of the same bytes to files on the same disk (page
    cache, no fsync for either).
(3) **read**: a clip-l-sized store (256 x 768 float16 per view, 224 px uint8
    masks) read by the training loader ``stream`` (whole-block reads, 1 and
    4 reader threads, targets left to the device), against plain sequential
    ``read()`` of the same shard files. (The row-by-row ``shards`` reader it was
    once compared with is gone; its recorded figures stay in docs/benchmarks.md.)

    python -m pipeline.bench datapath --images 96 --read-views 1200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.bench.common import work_folder
from pipeline.encode.config import ExtractConfig
from pipeline.encode.plan import plan_split
from pipeline.encode.registry import get_spec
from pipeline.errors import UserError
from pipeline.runtime import load_average, machine
from pipeline.store.layout import open_or_create_store, store_identity
from pipeline.store.splits import SplitPlan, create_split, num_shards

# --------------------------------------------------------------------------- #
# (1) render + write, encoder excluded
# --------------------------------------------------------------------------- #


def _planned_store(*, work: Path, data_root: Path, images: int, views: int, backbone: str, shard_size: int):
    """A shuffled-layout store planned over the first ``images`` images; nothing extracted yet."""
    from pipeline.data.registry import create_dataset

    spec = get_spec(backbone)
    grid = spec.grid()
    ids = sorted(p.stem for p in (data_root / "images").iterdir())[:images]
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    config = ExtractConfig(backbone=backbone, out=str(work / "store"), dataset="folder", data_root=str(data_root),
                           dataset_options={"list_file": str(work / "ids.txt")}, views=views, layout="shuffled",
                           shard_size=shard_size, random_init=True, device="cpu", vision_only=True, overwrite=True)
    dataset = create_dataset("folder", root=str(data_root), split="train", list_file=str(work / "ids.txt"))
    identity = store_identity(encoder=spec.name, weights={"pretrained": False, "source": "random-init"},
                              input_size=spec.input_size, grid=grid, vision_dim=spec.vision_dim, text_dim=None,
                              mean=spec.mean, std=spec.std)
    root = open_or_create_store(config.out, identity=identity, overwrite=True)
    plan = plan_split(dataset=dataset, config=config, input_size=spec.input_size, tokens=grid[0] * grid[1],
                      dim=spec.vision_dim)
    group = create_split(root, plan=plan, tokens=grid[0] * grid[1], dim=spec.vision_dim,
                         input_size=spec.input_size)
    return config, dataset, group, (grid[0] * grid[1], spec.vision_dim)


def render_rate(*, config: ExtractConfig, dataset, group, feature_shape, workers: int) -> float:
    """Views/s of render + write with ``workers`` render processes (0: today's one thread), after the first shard."""
    from pipeline.encode.render_pool import rendered_shards
    from pipeline.encode.shards import RenderedShard, ShardWriters, render_shard

    shards = list(range(num_shards(group)))
    path = f"{dataset.name}/{dataset.split}"
    if workers:
        items = rendered_shards(render=render_shard, config=config, group_path=path, shards=shards,
                                input_size=int(group["masks"].shape[1]), workers=workers, pin=False)
    else:
        items = ({"masks": r.masks, "valid": r.valid, "shard": r.shard, "source": r.source} for r in (
            render_shard(dataset=dataset, group=group, shard=s, input_size=int(group["masks"].shape[1]),
                         skip_bad=False) for s in shards))
    writers = ShardWriters(group=group, num_classes=len(group.attrs["class_names"]), count=config.writers)
    first, counted = None, 0
    try:
        for item in items:
            masks, valid = np.asarray(item["masks"]), np.asarray(item["valid"]).astype(bool)
            feats = np.zeros((len(valid), *feature_shape), np.float16)  # the encoder's output, left out
            source = np.asarray(item["source"]).astype(bool)
            writers.put(int(item["shard"]), feats, RenderedShard(shard=int(item["shard"]), images=None, masks=masks,
                                                                 valid=valid, bad=[], source=source))
            if first is None:
                first = time.perf_counter()
            else:
                counted += len(valid)
    finally:
        writers.close()
    return counted / max(time.perf_counter() - first, 1e-9)


# --------------------------------------------------------------------------- #
# (2) writes and (3) reads of a clip-l-sized store
# --------------------------------------------------------------------------- #


def feature_store(*, work: Path, views: int, shard: int, classes: int = 20):
    """An empty split of ``views`` clip-l-sized views (planned synthetically: no images needed)."""
    spec = get_spec("clip-l")
    grid, size = spec.grid(), spec.input_size
    identity = store_identity(encoder=spec.name, weights={"pretrained": False, "source": "random-init"},
                              input_size=size, grid=grid, vision_dim=spec.vision_dim, text_dim=None,
                              mean=spec.mean, std=spec.std)
    root = open_or_create_store(work / "features", identity=identity, overwrite=True)
    plan = SplitPlan(dataset="bench", split="train", kind="views", image_ids=[str(i) for i in range(views)],
                     image_hw=np.full((views, 2), size, np.int32), view_image=np.arange(views, dtype=np.int32),
                     view_box=np.tile(np.array([0, 0, size, size], np.int32), (views, 1)),
                     view_flip=np.zeros(views, bool), view_jitter=np.tile(np.float32([1, 1, 1, 0]), (views, 1)),
                     class_names=[f"class{k}" for k in range(1, classes + 1)], shard_size=shard, meta={})
    return create_split(root, plan=plan, tokens=grid[0] * grid[1], dim=spec.vision_dim, input_size=size)


def shard_data(rng: np.random.Generator, n: int, group, classes: int = 20):
    feats = rng.standard_normal((n, *group["features"].shape[1:]), dtype=np.float32).astype(np.float16)
    size = group["masks"].shape[1]
    masks = np.zeros((n, size, size), np.uint8)
    for v in range(n):  # one or two class rectangles per view
        for c in rng.choice(np.arange(1, classes + 1), size=2, replace=False):
            y, x = rng.integers(0, size // 2, 2)
            masks[v, y:y + size // 2, x:x + size // 2] = c
    present = np.zeros((n, classes), bool)
    for v in range(n):
        values = np.unique(masks[v])
        present[v, values[values > 0] - 1] = True
    return feats, masks, present


def write_rates(*, work: Path, views: int, shard: int, writers: int) -> dict:
    """MB/s of the writer threads filling a store vs plain sequential writes of the same bytes."""
    from pipeline.encode.shards import RenderedShard, ShardWriters

    group = feature_store(work=work, views=views, shard=shard)
    rng = np.random.default_rng(0)
    shards = [shard_data(rng, min(shard, views - s * shard), group) for s in range(num_shards(group))]
    total = sum(f.nbytes + m.nbytes for f, m, _ in shards)
    start = time.perf_counter()
    pool = ShardWriters(group=group, num_classes=20, count=writers)
    for s, (feats, masks, present) in enumerate(shards):
        pool.put(s, feats, RenderedShard(shard=s, images=None, masks=masks, valid=np.ones(len(feats), bool), bad=[]))
    pool.close()
    store_seconds = time.perf_counter() - start
    raw = work / "raw"
    raw.mkdir(exist_ok=True)
    start = time.perf_counter()
    for s, (feats, masks, _) in enumerate(shards):
        with open(raw / f"{s}.bin", "wb") as handle:
            handle.write(feats.tobytes())
            handle.write(masks.tobytes())
    raw_seconds = time.perf_counter() - start
    shutil.rmtree(raw)
    return {"store_MBps": total / store_seconds / 1e6, "raw_MBps": total / raw_seconds / 1e6,
            "ratio": raw_seconds / store_seconds, "group": group}


def raw_read_rate(group) -> float:
    """MB/s of plain sequential reads of the features and masks shard files."""
    folder = Path(str(group.store.root)) / group.path
    files = [p for name in ("features", "masks") for p in (folder / name / "c").rglob("*") if p.is_file()]
    start, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(16 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e6


def loader_rates(*, store: Path, batches: int, batch_size: int) -> dict:
    """Views/s of the training loader over the store: stream with 1 and 4 readers, through zarr, with CPU targets."""
    import torch

    from pipeline.store.reader import open_split
    from pipeline.training.batches import training_pairs
    from pipeline.training.stream import stream_batches

    split = open_split(store=store, split="bench/train")
    samples = training_pairs(split=split, seen=tuple(range(1, 21)), classes_per_sample="all")
    text = np.zeros((20, 768), np.float32)
    common = dict(split=split, samples=samples, text=text, batch_size=batch_size, epoch=0, seed=0, novel=())

    def rate(iterator, touch=lambda b: None) -> float:
        start, views = time.perf_counter(), 0
        for number, batch in enumerate(iterator):
            touch(batch)
            views += len(batch.views)
            if number + 1 >= batches:
                break
        return views / (time.perf_counter() - start)

    cpu = torch.device("cpu")
    return {"stream_1": rate(stream_batches(**common, readers=1)),
            "stream_4": rate(stream_batches(**common, readers=4)),
            "stream_4_zarr": rate(stream_batches(**common, readers=4, direct=False)),
            "stream_4_cpu_targets": rate(stream_batches(**common, readers=4), lambda b: b.to_device(cpu))}


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


def run_datapath_bench(*, work: Path, data_root: Path | None, images: int, views: int, backbone: str,
                       read_views: int, repeats: int, batch_size: int = 32) -> dict:
    if data_root is None:
        from pipeline.data.synthetic import make_shapes_dataset

        data_root = make_shapes_dataset(out=work / "data", count=images, size=(375, 500))  # PASCAL-sized
    elif not (data_root / "images").is_dir():
        raise UserError(f"--data-root {data_root}: expected the folder layout (images/, masks/)")
    shard = max(1, (images * views) // 8)
    found: dict[str, list[float]] = {}
    per_view = (256 * 768 * 2 + 224 * 224)  # clip-l features + mask bytes
    for _ in range(repeats):
        for workers in (0, 1, 2):
            config, dataset, group, shape = _planned_store(work=work, data_root=data_root, images=images,
                                                           views=views, backbone=backbone, shard_size=shard)
            found.setdefault(f"render_w{workers}", []).append(
                render_rate(config=config, dataset=dataset, group=group, feature_shape=shape, workers=workers))
        written = write_rates(work=work, views=read_views, shard=max(1, (128 << 20) // per_view), writers=2)
        for key in ("store_MBps", "raw_MBps", "ratio"):
            found.setdefault(f"write_{key}", []).append(written[key])
        found.setdefault("raw_read_MBps", []).append(raw_read_rate(written["group"]))
        for key, value in loader_rates(store=work / "features", batches=max(4, read_views // batch_size),
                                       batch_size=batch_size).items():
            found.setdefault(f"read_{key}", []).append(value)
    med = {k: statistics.median(v) for k, v in found.items()}
    stream_mbps = med["read_stream_4"] * per_view / 1e6
    return {
        "machine": machine(), "load_average": load_average(), "repeats": repeats, "images": images, "views": views,
        "backbone": backbone, "read_views": read_views, "medians": med, "all": found,
        "render_scaling_efficiency": med["render_w2"] / (2 * med["render_w1"]),
        "writer_vs_raw_write": med["write_ratio"],
        "stream_MBps": stream_mbps, "stream_vs_raw_read": stream_mbps / med["raw_read_MBps"],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench datapath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="Folder-layout photos (default: generated).")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--views", type=int, default=1, help="Views per image (shuffled layout: one decode each).")
    parser.add_argument("--backbone", default="clip-l", help="Sets the feature size written (no encoder runs).")
    parser.add_argument("--read-views", type=int, default=1200, help="Views of the clip-l-sized read/write store.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with work_folder(args.work, prefix="fusioner-datapath-") as work:
        result = run_datapath_bench(work=work, data_root=args.data_root, images=args.images, views=args.views,
                                    backbone=args.backbone, read_views=args.read_views, repeats=args.repeats)
    print(json.dumps(result, indent=1, default=float))
    return 0
