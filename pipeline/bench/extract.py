"""Stage-one benchmark: is extraction bound by the encoder, and how fast is the cache read back?

One process, one thread setting, the same images throughout:

(a) the encoder's forward pass alone, on views rendered and normalised
    beforehand, in the very batches extraction uses (per shard, ``--batch-size``);
(b) the whole ``extract`` (plan, build, decode, render, encode, write) into a
    fresh store. ``extract / forward`` says how much the rest of the pipeline
    adds on top of the encoder: near 1 means decode and write are hidden;
(c) random training batches read back from that store, from memory
    (``load_into_memory``) and straight from zarr (the loader's one read per
    view, and the one orthogonal selection per batch it used before), in MB/s
    and batches/s.

(a) and (b) alternate ``--repeats`` times and the best wall time of each is
compared; the CPU seconds of this process are given beside them, a figure that
other jobs on a shared machine move far less than wall time.

    python -m pipeline.bench extract --images 64 --backbone clip-b --input-size 224 --random-init
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.data.registry import create_dataset
from pipeline.data.augment import view_numbers
from pipeline.data.views import ViewParams
from pipeline.encode.extract import ExtractReport, extract
from pipeline.encode.families import create_encoder
from pipeline.encode.config import ExtractConfig
from pipeline.encode.plan import plan_split
from pipeline.encode.registry import get_spec
from pipeline.encode.shards import planned_view
from pipeline.encode.towers import VisionEncoder
from pipeline.errors import UserError, run_entry
from pipeline.runtime import load_average, machine, resolve_device
from pipeline.store.info import describe_store
from pipeline.store.layout import open_store
from pipeline.store.reader import load_into_memory, open_split

# ../shared beside the checkout (pipeline/bench/extract.py -> parents[2] is the checkout)
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128"


@dataclass
class ForwardJob:
    """Extraction's views, rendered before any clock runs, and the batches extraction cuts them into."""

    build: Callable[[], VisionEncoder]
    views: np.ndarray  # [N, S, S, 3] uint8
    batches: list[tuple[int, int]]  # [begin, end) of each batch: fixed size from each shard's start
    device: torch.device
    build_seconds: float


@dataclass
class ReadTiming:
    mode: str
    seconds: float
    batches: int
    bytes: int
    load_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 2**20 / self.seconds

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds


def _subset(*, data_root: Path, images: int, folder: Path) -> dict:
    """Reader options naming the first ``images`` images, so every phase sees the same ones."""
    ids = create_dataset("folder", root=data_root, split="train").ids
    if images > len(ids):
        raise UserError(f"{data_root} has {len(ids)} images, --images asked for {images}")
    path = folder / "images.txt"
    path.write_text("\n".join(ids[:images]) + "\n")
    return {"list_file": str(path)}


def prepare_forward(*, config: ExtractConfig) -> ForwardJob:
    """Render the plan's views exactly as extract will, and time one encoder build."""
    device = resolve_device(config.device)
    build = partial(create_encoder, config.backbone, text=False, weights=config.weights,
                    random_init=config.random_init, input_size=config.input_size, device=device)
    build()  # imports the model library, as any process does once before its first extraction
    start = time.perf_counter()
    vision = build().vision  # the build that extract repeats
    build_seconds = time.perf_counter() - start
    dataset = create_dataset(config.dataset, root=config.data_root, split=config.split, **config.dataset_options)
    plan = plan_split(dataset=dataset, config=config, input_size=vision.input_size,
                      tokens=vision.grid[0] * vision.grid[1], dim=vision.dim)
    views = np.zeros((plan.num_views, vision.input_size, vision.input_size, 3), np.uint8)
    numbers = view_numbers(plan.view_image)
    for index in np.unique(plan.view_image):
        record = dataset.load(int(index))
        for v in np.flatnonzero(plan.view_image == index):
            params = ViewParams(box=tuple(int(x) for x in plan.view_box[v]), flip=bool(plan.view_flip[v]),
                                jitter=tuple(float(x) for x in plan.view_jitter[v]))
            views[v], _ = planned_view(record, meta=plan.meta, kind=plan.kind, image_index=int(index),
                                       view_number=int(numbers[v]), params=params, size=vision.input_size)
    batches = []
    for begin in range(0, plan.num_views, plan.shard_size):
        stop = min(begin + plan.shard_size, plan.num_views)
        batches += [(b, min(b + config.batch_size, stop)) for b in range(begin, stop, config.batch_size)]
    return ForwardJob(build=lambda: build().vision, views=views, batches=batches, device=device,
                      build_seconds=build_seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Clock:
    """Wall seconds, and CPU seconds of every thread of this process (other processes excluded)."""

    wall: float
    cpu: float


def _clocked(work) -> tuple[Clock, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return Clock(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu), result


def time_forward(*, job: ForwardJob) -> Clock:
    """The encoder's forward passes alone, with extract's autocast and copy to host.

    Each repeat gets a freshly built encoder, as every extraction does: a new
    model's first passes run measurably slower than those of one that has been
    running for a while, and that is the encoder's cost, not the pipeline's.
    """
    vision, device = job.build(), job.device
    pixels = [vision.normalize(job.views[begin:end]) for begin, end in job.batches]

    def run() -> None:
        with torch.inference_mode():
            for batch in pixels:
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    vision.forward_tokens(batch).float().cpu()  # [B, h*w, D]
        _sync(device)

    _sync(device)
    return _clocked(run)[0]


def time_extract(*, config: ExtractConfig) -> tuple[Clock, ExtractReport]:
    """The real command, end to end, into a fresh store (``config.overwrite`` is set)."""
    return _clocked(lambda: extract(config=config, quiet=True))


def time_reads(*, store: str, batch_size: int, batches: int, seed: int) -> list[ReadTiming]:
    """Random training batches (features + masks of ``batch_size`` random views), three ways."""
    split = open_split(store=store)
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(split.num_views, size=min(batch_size, split.num_views), replace=False))
             for _ in range(batches)]
    start = time.perf_counter()
    memory = load_into_memory(split)
    load = time.perf_counter() - start
    features, mask_array = split.group["features"], split.group["masks"]
    out = []
    for mode in ("memory", "zarr", "zarr, one selection per batch"):
        size = 0
        start = time.perf_counter()
        for views in picks:
            if mode == "memory":
                feats, masks = memory["features"][views], memory["masks"][views]
            elif mode == "zarr":  # the loader's direct path: one read per view (CachedSplit.features)
                feats, masks = split.features(views), split.masks(views)
            else:  # what the loader did before: one orthogonal selection per batch, for comparison
                feats = features.get_orthogonal_selection((views, slice(None), slice(None)))
                masks = mask_array.get_orthogonal_selection((views, slice(None), slice(None)))
            size += feats.nbytes + masks.nbytes
        out.append(ReadTiming(mode=mode, seconds=time.perf_counter() - start, batches=batches, bytes=size,
                              load_seconds=load if mode == "memory" else 0.0))
    return out


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


@dataclass
class ExtractBench:
    """Everything one run measured, kept apart from how it is printed."""

    backbone: str
    input_size: int
    images: int
    data_name: str
    views_per_image: int
    batch_size: int
    shard_size: int
    views: int
    pretrained: bool
    build_seconds: float
    forward: list[Clock]
    full: list[Clock]
    described: dict
    reads: list[ReadTiming]
    load_before: str
    load_after: str


def run_extract_bench(*, data_root: Path, images: int, backbone: str, input_size: int | None, views: int,
                      batch_size: int, random_init: bool, weights: str | None, device: str, threads: int,
                      repeats: int, read_batches: int, keep: Path | None) -> ExtractBench:
    """All three phases on the same images, with one torch thread setting.

    Forward and extract alternate ``repeats`` times, so a change of machine
    load falls on both; the report compares the best of each.
    """
    torch.set_num_threads(threads)
    spec = get_spec(backbone)
    if "vision" not in spec.towers:
        raise UserError(f"encoder '{backbone}' has no vision tower to benchmark")
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusioner-bench-"))
    try:
        config = ExtractConfig(backbone=backbone, out=str(keep or work / "store"), dataset="folder",
                               data_root=str(data_root), dataset_options=_subset(data_root=data_root, images=images,
                                                                                 folder=work),
                               views=views, input_size=input_size or spec.input_size, batch_size=batch_size,
                               vision_only=True, random_init=random_init, weights=weights, device=device,
                               overwrite=True)
        job = prepare_forward(config=config)
        forward, full = [], []
        for _ in range(repeats):
            forward.append(time_forward(job=job))
            clock, report = time_extract(config=config)
            full.append(clock)
        described = describe_store(config.out)["splits"][report.split]
        shard = int(open_store(config.out)[report.split].attrs["shard_size"])
        reads = time_reads(store=config.out, batch_size=32, batches=read_batches, seed=0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExtractBench(backbone=backbone, input_size=config.input_size, images=images, data_name=data_root.name,
                        views_per_image=views, batch_size=batch_size, shard_size=shard, views=len(job.views),
                        pretrained=report.pretrained, build_seconds=job.build_seconds, forward=forward, full=full,
                        described=described, reads=reads, load_before=load_before, load_after=load_average())


def format_table(bench: ExtractBench) -> str:
    """The Markdown table of one run; wall figures are the best of the repeats."""
    best_forward, best_full = min(c.wall for c in bench.forward), min(c.wall for c in bench.full)
    cpu_forward, cpu_full = min(c.cpu for c in bench.forward), min(c.cpu for c in bench.full)
    pairs = ", ".join(f"{b.wall / a.wall:.2f}" for a, b in zip(bench.forward, bench.full))
    repeats, n = len(bench.forward), bench.views
    weights = "random-init (timing is architecture-bound, unaffected)" if not bench.pretrained else "pretrained"
    rows = [
        ("machine", f"{machine()}; 1-min load average {bench.load_before} before, {bench.load_after} after"),
        ("encoder", f"{bench.backbone} @ {bench.input_size} px, weights {weights}"),
        ("data", f"{bench.images} images of {bench.data_name}, {bench.views_per_image} view(s) each = {n} views, "
                 f"batch {bench.batch_size}, shards of {bench.shard_size} views"),
        ("(a) encoder forward only", f"{best_forward:.2f} s = {n / best_forward:.2f} views/s (wall, best of "
                                     f"{repeats}: {_seconds([c.wall for c in bench.forward])}); "
                                     f"CPU {cpu_forward:.2f} s"),
        ("(b) full extract", f"{best_full:.2f} s = {n / best_full:.2f} views/s (wall, best of {repeats}: "
                             f"{_seconds([c.wall for c in bench.full])}); CPU {cpu_full:.2f} s; includes about "
                             f"{bench.build_seconds:.2f} s encoder build"),
        ("extract / forward, wall", f"**{best_full / best_forward:.3f}** (target <= 1.10; pair by pair: {pairs})"),
        ("extract / forward, CPU", f"{cpu_full / cpu_forward:.3f} (work added by plan, build, decode, render, write)"),
        ("store", f"{bench.described['bytes_per_view']} B/view, features {bench.described['features']}, "
                  f"{bench.described['bytes'] / 2**20:.1f} MiB"),
    ]
    for read in bench.reads:
        extra = f", after a {read.load_seconds:.2f} s load of the split" if read.mode == "memory" else ""
        rows.append((f"(c) read, {read.mode}", f"{read.mb_per_s:.1f} MB/s, {read.batches_per_s:.1f} batches/s "
                                               f"(batch 32 random views, {read.batches} batches{extra})"))
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ext = commands.add_parser("extract", help="encoder forward vs. full extraction, then cache read speed",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ext.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="folder-layout data (default: %(default)s)")
    ext.add_argument("--images", type=int, default=64, help="first N images of the data (default: %(default)s)")
    ext.add_argument("--backbone", default="clip-b", help="vision encoder (default: %(default)s)")
    ext.add_argument("--input-size", type=int, default=None, help="encoder input size (default: the encoder's)")
    ext.add_argument("--views", type=int, default=1, help="augmented views per image (default: %(default)s)")
    ext.add_argument("--batch-size", type=int, default=32, help="encoder batch (default: %(default)s)")
    ext.add_argument("--random-init", action="store_true", help="random weights (no checkpoint needed)")
    ext.add_argument("--weights", default=None, help="local checkpoint instead of --random-init")
    ext.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    ext.add_argument("--threads", type=int, default=torch.get_num_threads(),
                     help="torch threads for every phase (default: %(default)s)")
    ext.add_argument("--repeats", type=int, default=1,
                     help="forward and extract alternate this often; the best of each is compared "
                          "(default: %(default)s)")
    ext.add_argument("--read-batches", type=int, default=50, help="random batches per read mode (default: %(default)s)")
    ext.add_argument("--keep", type=Path, default=None, help="write the store here and keep it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bench = run_extract_bench(data_root=args.data_root, images=args.images, backbone=args.backbone,
                              input_size=args.input_size, views=args.views, batch_size=args.batch_size,
                              random_init=args.random_init, weights=args.weights, device=args.device,
                              threads=args.threads, repeats=args.repeats, read_batches=args.read_batches,
                              keep=args.keep)
    print(format_table(bench))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
