"""Data-path benchmark: can the CPU side feed a GPU?  ``python -m pipeline.bench datapath``

Three capacities, the encoder and the model left out, each as a ratio to a
reference measured in the same run (wall-clock figures on a shared machine
move; ratios within one run much less):

(1) **render**: decode + augment of a shuffled-layout extraction in one
    thread here (W=0) and in ``W`` = 1 and 2 render processes, in views/s in
    the steady state (from the arrival of every process's first shard: process
    start-up excluded). A render process works on one core, so W=1 is the
    per-core rate; scaling efficiency = rate(W=2) / (2 x rate(W=1)), which
    needs two idle cores to mean anything. The same again with the writers
    (the encoder replaced by writing zeros of the real feature size).
(2) **write**: whole shards of clip-l-sized random features through
    ``write_shard`` by the extraction's writer threads, against plain
    sequential ``write()`` of the same bytes to files on the same disk (page
    cache, no fsync for either).
(3) **read**: a clip-l-sized store (256 x 768 float16 per view, 224 px uint8
    masks) read by the training loader ``stream`` (whole-block reads, 1 and
    4 reader threads, targets left to the device), against plain sequential
    ``read()`` of the same shard files. (The row-by-row ``shards`` reader it was
    once compared with is gone; its recorded figures stay in docs/benchmarks.md.)
(4) **device augment**: the same shards augmented on a torch device by kornia
    (decode here, ``extract --augment-backend gpu``) against the albumentations
    render path in this thread (:mod:`pipeline.bench.device_augment`).

    python -m pipeline.bench datapath --images 96 --read-views 1200 --repeats 3
    python -m pipeline.bench datapath --data-root ../shared/data/coco128 --images 48 --read-views 700
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.bench.common import work_folder
from pipeline.data.augment import AugmentConfig
from pipeline.encode.config import ExtractConfig
from pipeline.encode.plan import plan_split
from pipeline.encode.registry import get_spec
from pipeline.errors import UserError
from pipeline.runtime import load_average, machine
from pipeline.store.layout import open_or_create_store, store_identity
from pipeline.store.splits import SplitPlan, create_split, num_shards

SHARDS = 16  # shards of the render store: enough that the first (timed out) is a small part

# --------------------------------------------------------------------------- #
# (1) render + write, encoder excluded
# --------------------------------------------------------------------------- #


def planned_store(*, work: Path, data_root: Path, images: int, views: int, backbone: str, shard_size: int,
                  augment: AugmentConfig | None = None):
    """A shuffled-layout store planned over the first ``images`` images (``augment``: the recipe's default);
    nothing extracted yet."""
    from pipeline.data.registry import create_dataset

    spec = get_spec(backbone)
    grid = spec.grid()
    ids = sorted(p.stem for p in (data_root / "images").iterdir())[:images]
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    config = ExtractConfig(backbone=backbone, out=str(work / "store"), dataset="folder", data_root=str(data_root),
                           dataset_options={"list_file": str(work / "ids.txt")}, views=views, layout="shuffled",
                           shard_size=shard_size, random_init=True, device="cpu", vision_only=True, overwrite=True,
                           augment=augment or AugmentConfig())
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


def _rendered_items(*, config: ExtractConfig, dataset, group, workers: int):
    """Rendered shards in order: ``workers`` render processes, or (0) rendered here in this thread."""
    from pipeline.encode.render_pool import rendered_shards
    from pipeline.encode.shards import render_shard, split_rows

    shards = list(range(num_shards(group)))
    size = int(group["masks"].shape[1])
    if workers:
        yield from rendered_shards(render=render_shard, config=config, group_path=f"{dataset.name}/{dataset.split}",
                                   shards=shards, input_size=size, workers=workers, pin=False,
                                   plan_rows=split_rows)
        return
    rows = split_rows(group)
    for shard in shards:
        r = render_shard(dataset=dataset, group=group, shard=shard, input_size=size, skip_bad=False, rows=rows)
        yield {"masks": r.masks, "valid": r.valid, "shard": r.shard, "source": r.source, "classes": r.classes,
               "cpu_seconds": r.cpu_seconds}


def render_rate(*, config: ExtractConfig, dataset, group, feature_shape, workers: int,
                write: bool = True) -> tuple[float, float]:
    """(views/s, views per CPU second of rendering) with ``workers`` render processes (0: one thread here), in the
    steady state, with or without writes.

    The CPU time is the rendering threads' own (``time.thread_time`` in each), so the second figure is the
    per-core rate whatever else the machine runs; the first is the wall clock's, which only idle cores make
    comparable between runs.

    The clock starts when the ``max(workers, 1)``-th shard arrives, when every process has delivered its first
    shard (process start-up and the first shard's imports excluded), and counts the shards after it, so the
    shards the other processes rendered during the first one are not counted in a time they did not take. It
    stops when the last shard arrives (and is written): the pool's shutdown after it, joining its processes,
    took as long as the rendering itself in a short run and is no part of a long extraction.
    """
    from pipeline.encode.shards import RenderedShard, ShardWriters

    warm, total = max(workers, 1), num_shards(group)
    writers = (ShardWriters(group=group, num_classes=len(group.attrs["class_names"]), count=config.writers)
               if write else None)
    start, end, counted, arrived, cpu = None, None, 0, 0, 0.0
    try:
        for item in _rendered_items(config=config, dataset=dataset, group=group, workers=workers):
            masks, valid = np.asarray(item["masks"]), np.asarray(item["valid"]).astype(bool)
            if writers is not None:
                feats = np.zeros((len(valid), *feature_shape), np.float16)  # the encoder's output, left out
                writers.put(int(item["shard"]), feats, RenderedShard(
                    shard=int(item["shard"]), images=None, masks=masks, valid=valid, bad=[],
                    source=np.asarray(item["source"]).astype(bool), classes=np.asarray(item["classes"]).astype(bool)))
            arrived += 1
            if arrived == warm:
                start = time.perf_counter()
            elif arrived > warm:
                counted += len(valid)
                cpu += float(item["cpu_seconds"])
            if arrived == total:  # stop the clock here: the pool's shutdown (joining the processes) is not work
                if writers is not None:
                    writers.close()  # the last writes are
                    writers = None
                end = time.perf_counter()
    finally:
        if writers is not None:
            writers.close()
    if start is None or not counted:
        raise UserError(f"too few shards to time {workers} render process(es): give more --images")
    return counted / max(end - start, 1e-9), counted / max(cpu, 1e-9)


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
                       read_views: int, repeats: int, batch_size: int = 32, device_augment: str = "auto") -> dict:
    if data_root is None:
        from pipeline.data.synthetic import make_shapes_dataset

        data_root = make_shapes_dataset(out=work / "data", count=images, size=(375, 500))  # PASCAL-sized
    elif not (data_root / "images").is_dir():
        raise UserError(f"--data-root {data_root}: expected the folder layout (images/, masks/)")
    shard = max(1, (images * views) // SHARDS)
    found: dict[str, list[float]] = {}
    per_view = (256 * 768 * 2 + 224 * 224)  # clip-l features + mask bytes
    load_before = load_average()
    for _ in range(repeats):
        for write in (False, True):
            for workers in (0, 1, 2):
                config, dataset, group, shape = planned_store(work=work, data_root=data_root, images=images,
                                                               views=views, backbone=backbone, shard_size=shard)
                key = f"render_w{workers}" if write else f"render_only_w{workers}"
                wall, per_cpu = render_rate(config=config, dataset=dataset, group=group, feature_shape=shape,
                                            workers=workers, write=write)
                found.setdefault(key, []).append(wall)
                if not write:
                    found.setdefault(f"render_cpu_w{workers}", []).append(per_cpu)
        written = write_rates(work=work, views=read_views, shard=max(1, (128 << 20) // per_view), writers=2)
        for key in ("store_MBps", "raw_MBps", "ratio"):
            found.setdefault(f"write_{key}", []).append(written[key])
        found.setdefault("raw_read_MBps", []).append(raw_read_rate(written["group"]))
        for key, value in loader_rates(store=work / "features", batches=max(4, read_views // batch_size),
                                       batch_size=batch_size).items():
            found.setdefault(f"read_{key}", []).append(value)
    med = {k: statistics.median(v) for k, v in found.items()}
    def plan(augment: AugmentConfig) -> tuple:
        _, dataset, group, _ = planned_store(work=work, data_root=data_root, images=images, views=views,
                                             backbone=backbone, shard_size=shard, augment=augment)
        return dataset, group

    on_device = _device_augment(plan=plan, repeats=repeats, device=device_augment)
    stream_mbps = med["read_stream_4"] * per_view / 1e6
    return {
        "machine": machine(), "load_average": load_before, "load_average_after": load_average(),
        "repeats": repeats, "images": images, "views": views, "shards": num_shards_of(images * views, shard),
        "backbone": backbone, "read_views": read_views, "medians": med, "all": found,
        "render_thread_views_per_s": med["render_only_w0"],
        "render_process_views_per_s": med["render_only_w1"],
        # views per CPU second of the rendering threads (the render processes' for W=1, 2): the per-core rate
        "render_per_core_views_per_s": statistics.median(found["render_cpu_w1"] + found["render_cpu_w2"]),
        "render_thread_per_cpu_views_per_s": med["render_cpu_w0"],
        # the share of a core each renderer had: well below 1 means other processes took the rest (load)
        "render_core_share": {f"w{w}": ratio_of_repeats(found, f"render_only_w{w}", f"render_cpu_w{w}", scale=max(w, 1))
                              for w in (0, 1, 2)},
        "render_process_vs_thread": ratio_of_repeats(found, "render_only_w1", "render_only_w0"),
        "render_scaling_efficiency": ratio_of_repeats(found, "render_only_w2", "render_only_w1", scale=2.0),
        "render_write_scaling_efficiency": ratio_of_repeats(found, "render_w2", "render_w1", scale=2.0),
        "writer_vs_raw_write": med["write_ratio"],
        "stream_MBps": stream_mbps, "stream_vs_raw_read": stream_mbps / med["raw_read_MBps"],
        "device_augment": on_device,
    }


def _device_augment(*, device: str, **kwargs) -> dict:
    """(4) the augmentation on a torch device against the CPU render path (pipeline.bench.device_augment)."""
    from pipeline.bench.device_augment import device_augment_rates

    if device == "none":
        return {"skipped": "--device-augment none"}
    try:
        return device_augment_rates(device=device, **kwargs)
    except UserError as err:  # kornia not installed: the rest of the figures stand
        return {"skipped": str(err)}


def ratio_of_repeats(found: dict, top: str, bottom: str, *, scale: float = 1.0) -> float:
    """The median over repeats of top / (scale x bottom), each ratio within one repeat (the load moves between)."""
    return statistics.median(a / (scale * b) for a, b in zip(found[top], found[bottom]))


def num_shards_of(views: int, shard: int) -> int:
    return -(-views // shard)


def summary(result: dict) -> str:
    """The render figures in words, for stderr (the JSON on stdout stays the record)."""
    cores, share = result["machine"].split(" CPU cores")[0], result["render_core_share"]
    return "\n".join([
        f"render, {result['images']} images x {result['views']} view(s) in {result['shards']} shards, load "
        f"{result['load_average']} before / {result['load_average_after']} after, {cores} cores:",
        f"  per core (views per CPU second of rendering, robust to load): {result['render_per_core_views_per_s']:.1f} "
        f"in render processes, {result['render_thread_per_cpu_views_per_s']:.1f} in the thread (target >= 100)",
        f"  one thread here           {result['render_thread_views_per_s']:7.1f} views/s "
        f"({share['w0']:.2f} of a core)",
        f"  one render process        {result['render_process_views_per_s']:7.1f} views/s ({share['w1']:.2f} of a core), "
        f"{result['render_process_vs_thread']:.2f} x the thread (target >= 1)",
        f"  two render processes      {result['medians']['render_only_w2']:7.1f} views/s ({share['w2']:.2f} of a core "
        f"each), scaling {result['render_scaling_efficiency']:.2f} (target >= 0.8 with 2 idle cores)",
        f"  with the writers (W=0/1/2) {result['medians']['render_w0']:.1f} / {result['medians']['render_w1']:.1f} / "
        f"{result['medians']['render_w2']:.1f} views/s, scaling {result['render_write_scaling_efficiency']:.2f}",
        _device_line(result["device_augment"])])


def _device_line(found: dict) -> str:
    if "skipped" in found:
        return f"  augmentation on a device  skipped ({found['skipped']})"
    return (f"  augmentation on {found['device']} ({found['torch_threads']} torch thread(s)) "
            f"{found['device_views_per_s']:.1f} views/s, {found['device_vs_cpu_render']:.2f} x the CPU render path "
            f"({found['cpu_render_views_per_s']:.1f} views/s) in this run, load {found['load_average']}")


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
    parser.add_argument("--device-augment", default="auto", metavar="DEVICE",
                        help="Device of the kornia augmentation measured against the CPU render path: auto (cuda if "
                             "there is one, else cpu), cpu, cuda, cuda:1 ..., or none.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with work_folder(args.work, prefix="fusioner-datapath-") as work:
        result = run_datapath_bench(work=work, data_root=args.data_root, images=args.images, views=args.views,
                                    backbone=args.backbone, read_views=args.read_views, repeats=args.repeats,
                                    device_augment=args.device_augment)
    print(json.dumps(result, indent=1, default=float))
    print(summary(result), file=sys.stderr)
    return 0
