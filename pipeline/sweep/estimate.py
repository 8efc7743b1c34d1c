"""What a study costs before it runs: ``fusioner sweep STUDY --estimate``.

Training GPU-hours = sum over the study's runs of (optimiser steps x seconds per step).
Steps come from each run's config and its sample count (its store when present,
else the standard lists; see :mod:`pipeline.sweep.sizes`); seconds per step are
the run's training FLOPs per sample, counted from the model its config builds
(:mod:`pipeline.training.flops`), times its batch size, over an achieved FLOP rate:

1. measured: the JSON line ``python -m pipeline.bench gpu`` printed on the card
   (``--timings FILE``): its samples/s times the counted FLOPs of its own preset; or
2. projected: the ``--gpu`` kind's dense bf16 peak times the fraction of peak the
   one recorded ``bench gpu`` run reached (:data:`REFERENCE`).

Caches a study needs and lacks are priced the same way: views to encode (images x
views per image) over the measured or projected extraction rate. Every line says
which source it used; a projection is no measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

# Dense bf16 peak TFLOP/s per GPU kind (vendor figures, no sparsity).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
# About what torch.cuda.mem_get_info reports free on an idle card of each kind (GiB; a100: the 80 GB one).
GPU_MEMORY_GIB = {"h100": 79, "h200": 139, "a100": 79, "l40s": 44}
# The one recorded `python -m pipeline.bench gpu` run (docs/benchmarks.md): paper preset on clip-l
# tokens, batch 32, streaming; clip-l pure forward; whole extraction.
REFERENCE = {"machine": "NVIDIA H200", "gpu": "h200", "preset": "paper", "backbone": "clip-l",
             "samples_per_s": 294.0, "forward_views_per_s": 1731.0, "extract_views_per_s": 493.0}


def read_timings(path: str | Path) -> dict:
    """The last line of ``python -m pipeline.bench gpu``'s output, checked: a rate and a batch above zero."""
    import math

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--timings {path}: file not found (the JSON line `python -m pipeline.bench gpu` printed)")
    try:
        lines = path.read_bytes().decode("utf-8").strip().splitlines()
        timings = json.loads(lines[-1]) if lines else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        timings = None
    if not isinstance(timings, dict):
        raise UserError(f"--timings {path}: not the JSON line `python -m pipeline.bench gpu` prints")
    rate, batch = timings.get("steps_per_s"), timings.get("batch_size")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise UserError(f"--timings {path}: steps_per_s must be a positive number, got {rate!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"--timings {path}: batch_size must be a whole number of at least 1, got {batch!r}")
    return timings


def check_gpu(gpu: str, *, timings_file: Path | None) -> dict | None:
    """The ``--gpu`` kind and the ``--timings`` file, checked before anything is counted."""
    if not timings_file and gpu not in PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu}: recorded figures exist for {', '.join(PEAK_TFLOPS)}; "
                        f"pass --timings FILE (the JSON `python -m pipeline.bench gpu` printed) for others")
    return read_timings(timings_file) if timings_file else None


@dataclass(frozen=True)
class Rate:
    per_second: float  # achieved FLOP/s, or views/s for extraction
    source: str


def _preset_flops(preset: str, backbone: str) -> int:
    """Training FLOPs per sample of a preset on a backbone's tokens (one class): what bench gpu trains."""
    from pipeline.encode.registry import get_spec
    from pipeline.model import make_model_config
    from pipeline.training.flops import training_flops_per_sample

    spec = get_spec(backbone)
    model = make_model_config(vision_dim=spec.vision_dim, text_dim=spec.text_dim or spec.vision_dim, preset=preset)
    model.decoder.out_size = spec.input_size
    return training_flops_per_sample(model, grid=spec.grid(), classes=1)


def training_rate(*, gpu: str, timings: dict | None) -> Rate:
    """Achieved training FLOP/s: measured by ``bench gpu`` (``--timings``) or projected for ``gpu``."""
    if timings:
        samples = timings.get("samples_per_s") or timings["steps_per_s"] * timings["batch_size"]
        preset, backbone = timings.get("preset", "paper"), timings.get("backbone", "clip-l")
        achieved = float(samples) * _preset_flops(preset, backbone)
        return Rate(achieved, f"measured by bench gpu on {timings.get('machine', 'an unnamed machine')} "
                              f"({float(samples):,.0f} samples/s of the {preset} preset = {achieved / 1e12:.1f} TFLOP/s)")
    fraction = _reference_train_fraction()
    return Rate(fraction * PEAK_TFLOPS[gpu] * 1e12,
                f"projected: {fraction:.1%} of {gpu}'s {PEAK_TFLOPS[gpu]:g} TFLOP/s bf16 peak, the fraction "
                f"training reached on an {REFERENCE['machine']} (bench gpu; not measured on {gpu})")


def _reference_train_fraction() -> float:
    flops = _preset_flops(REFERENCE["preset"], REFERENCE["backbone"])
    return REFERENCE["samples_per_s"] * flops / (PEAK_TFLOPS[REFERENCE["gpu"]] * 1e12)


def extraction_rate(*, backbone: str, input_size: int | None, gpu: str, timings: dict | None) -> Rate:
    """Views/s of a whole extraction with ``backbone``: measured by ``bench gpu`` or projected by FLOPs."""
    from pipeline.encode.flops import vision_flops_per_view

    if timings and timings.get("backbone") == backbone and timings.get("extract_views_per_s"):
        return Rate(float(timings["extract_views_per_s"]), f"measured by bench gpu on {timings.get('machine')}")
    reference = REFERENCE["extract_views_per_s"] * vision_flops_per_view(REFERENCE["backbone"])
    kind = gpu if gpu in PEAK_TFLOPS else REFERENCE["gpu"]
    views = reference * PEAK_TFLOPS[kind] / PEAK_TFLOPS[REFERENCE["gpu"]] / vision_flops_per_view(backbone, input_size)
    return Rate(views, f"projected from the {REFERENCE['machine']}'s {REFERENCE['extract_views_per_s']:g} "
                       f"{REFERENCE['backbone']} views/s by forward FLOPs and {kind} peak")


# --------------------------------------------------------------------------- #
# Per run: model inputs, FLOPs, steps
# --------------------------------------------------------------------------- #


def _store_inputs(store: str, *, memo: dict) -> dict:
    """vision_dim, text_dim, grid, input_size of a store: its attributes, else its encoder's registry entry."""
    from pipeline.encode.registry import get_spec
    from pipeline.store.layout import open_store, store_attrs
    from pipeline.sweep.caches import backbone_of

    if store in memo:
        return memo[store]
    try:
        attrs = store_attrs(open_store(store))
        found = {"vision_dim": attrs.get("vision_dim"), "text_dim": attrs.get("text_dim"),
                 "grid": tuple(attrs["grid"]) if attrs.get("grid") else None, "input_size": attrs.get("input_size"),
                 "backbone": attrs.get("encoder"), "from": "store"}
    except UserError:
        name = backbone_of(store)
        if name == "ENCODER":
            raise UserError(f"{store}: no store there, and its folder name does not start with an encoder name "
                            f"(fusioner encoders), so its token sizes are unknown; extract it first") from None
        spec = get_spec(name)
        found = {"vision_dim": spec.vision_dim or None, "text_dim": spec.text_dim or None,
                 "grid": spec.grid() if spec.vision_dim else None, "input_size": spec.input_size,
                 "backbone": name, "from": "registry"}
    memo[store] = found
    return found


def run_model(config: dict, *, memo: dict) -> tuple:
    """(ModelConfig, patch grid) of a run's resolved config, its input sizes from its stores or their encoders."""
    from pipeline.model import make_model_config

    data = config["data"]
    vision = _store_inputs(data["cache"], memo=memo)
    text = _store_inputs(data["text_cache"] or data["cache"], memo=memo)
    text_dim = text["text_dim"] or vision["text_dim"]
    if not (vision["vision_dim"] and vision["grid"] and text_dim):
        raise UserError(f"{data['cache']} / {data['text_cache']}: cannot tell the token sizes of this pair")
    overrides = {k: v for k, v in config["model"].items() if k not in ("vision_dim", "text_dim")}
    model = make_model_config(vision_dim=int(vision["vision_dim"]), text_dim=int(text_dim), preset="paper",
                              overrides=overrides)
    model.decoder.out_size = int(vision["input_size"])  # training always predicts at the view size
    return model, tuple(vision["grid"])


def run_peak_mib(run, *, device_type: str, memo: dict) -> int | None:
    """A run's estimated peak device memory in MiB (:mod:`pipeline.training.memory`); None for an online run."""
    import json

    from pipeline.config import to_dict
    from pipeline.sweep.sizes import training_samples
    from pipeline.training.memory import training_memory

    config = run.config
    if config["data"].get("online", {}).get("enabled"):
        return None
    model, grid = run_model(config, memo=memo.setdefault("inputs", {}))
    count = training_samples(config["data"], memo=memo.setdefault("samples", {}))
    classes = count.most or max(1, math.ceil(count.classes))
    bf16 = config.get("precision") == "bf16" or (config.get("precision", "auto") == "auto" and device_type == "cuda")
    batch = int(config["optim"]["batch_size"])
    key = (json.dumps(to_dict(model), sort_keys=True), grid, classes, batch, device_type, bf16)  # folds share one
    if key not in memo.setdefault("estimates", {}):
        estimate = training_memory(model, grid=grid, classes=classes, batch_size=batch, device_type=device_type,
                                   bf16=bf16)
        memo["estimates"][key] = -(-estimate.total // 2**20)
    return memo["estimates"][key]


def run_flops(config: dict, *, classes: float, memo: dict) -> int:
    """Training FLOPs per sample of a run's resolved config."""
    from pipeline.training.flops import training_flops_per_sample

    model, grid = run_model(config, memo=memo)
    return training_flops_per_sample(model, grid=grid, classes=max(1, math.ceil(classes)))


def row_labels(runs: list) -> dict[str, str]:
    """Run key -> the table row(s) it fills: pair, variant and swept values (folds and seeds share a row).

    One configuration that fills two rows (Table 7's 12-layer and width-512 rows) trains once and
    is priced once, under both names.
    """
    names: dict[str, list[str]] = {}
    pairs: dict[str, list[str]] = {}
    for run in runs:
        extra = "".join(f" {k.split('.')[-1]}={v}" for k, v in run.values.items())
        for seen, name in ((names, f"{run.variant}{extra}"), (pairs, run.pair)):
            if name not in seen.setdefault(run.key, []):
                seen[run.key].append(name)
    return {key: f"{' = '.join(pairs[key])} | {' = '.join(names[key])}" for key in names}


def _packed_gains(timings: dict | None) -> dict[int, tuple[float, float]]:
    """Runs at once -> (samples/s of the GPU, gain over one run) from ``bench gpu``'s ``packed`` rows."""
    gains = {}
    for row in (timings or {}).get("packed") or []:
        if not isinstance(row, dict) or "error" in row:
            continue
        runs, rate, gain = row.get("runs"), row.get("samples_per_s_per_gpu"), row.get("gain_over_one")
        if isinstance(runs, int) and all(isinstance(v, (int, float)) and v > 0 for v in (rate, gain)):
            gains[runs] = (float(rate), float(gain))
    return gains


def packing_speedup(*, runs_per_gpu: int, timings: dict | None) -> tuple[float, str]:
    """(GPU throughput of ``runs_per_gpu`` packed runs over one run alone, where the figure comes from).

    Measured only: the ``packed`` rows of ``bench gpu`` (``gain_over_one``: the samples/s of N runs
    trained at once on one GPU over one run's). Without a row for ``runs_per_gpu`` runs the study
    is priced one run at a time, from the single-run rate.
    """
    if runs_per_gpu == 1:
        return 1.0, ""
    gains = _packed_gains(timings)
    if runs_per_gpu in gains:
        rate, gain = gains[runs_per_gpu]
        return gain, (f"{runs_per_gpu} runs per GPU: {gain:.2f}x the samples/s of one run ({rate:,.0f} per GPU), "
                      f"measured by bench gpu's packed runs on {timings.get('machine', 'an unnamed machine')}: "
                      f"GPU-hours divided by it (those runs train the small preset; bigger models likely gain less)")
    return 1.0, (f"{runs_per_gpu} runs per GPU: priced as one run at a time, from the single-run rate; the packed "
                 f"rate is unmeasured (no packed row of {runs_per_gpu} runs in a bench gpu --timings file)")


def estimate_study(*, runs: list, gpu: str, timings_file: Path | None = None, runs_per_gpu: int = 1) -> dict:
    """Per table row: runs, samples, GFLOP/sample, steps, seconds per step, GPU-hours; extraction; totals.

    With ``runs_per_gpu`` > 1 the GPU-hours are divided by the measured packed speed-up, if any.
    """
    from pipeline.sweep.sizes import SampleCount, training_samples
    from pipeline.sweep.study import run_state

    timings = check_gpu(gpu, timings_file=timings_file)
    rate = training_rate(gpu=gpu, timings=timings)
    rows: dict[str, dict] = {}
    samples_memo: dict = {}
    inputs_memo: dict = {}
    labels = row_labels(runs)
    for run in {r.key: r for r in runs}.values():
        optim = run.config["optim"]
        count = training_samples(run.config["data"], memo=samples_memo)
        try:
            flops = run_flops(run.config, classes=count.classes, memo=inputs_memo)
        except UserError as err:  # a store that is neither there nor named after its encoder
            flops, count = None, SampleCount(None, count.classes, f"FLOPs unknown: {err}")
        seconds_per_step = flops * int(optim["batch_size"]) / rate.per_second if flops else None
        row = rows.setdefault(labels[run.key], {"runs": 0, "done": 0, "samples": [], "sources": [], "steps": 0,
                                               "gflop": flops / 1e9 if flops else None, "unpriced": 0,
                                               "seconds_per_step": seconds_per_step, "seconds": 0.0,
                                               "todo_seconds": 0.0})
        row["runs"] += 1
        row["done"] += run_state(run.dir) == "done"
        source = count.source
        if count.samples is None and flops and optim.get("max_steps"):
            source += f"; optim.max_steps {optim['max_steps']} priced as an upper bound"
        row["sources"] += [source] if source not in row["sources"] else []
        if flops is None or (count.samples is None and not optim.get("max_steps")):
            row["unpriced"] += 1
            continue
        if count.samples is None:
            steps = int(optim["max_steps"])
        else:
            steps = int(optim["epochs"]) * -(-count.samples // int(optim["batch_size"]))
            row["samples"].append(count.samples)
        if optim.get("max_steps"):
            steps = min(steps, int(optim["max_steps"]))
        row["steps"] += steps
        row["seconds"] += steps * seconds_per_step
        row["todo_seconds"] += 0.0 if run_state(run.dir) == "done" else steps * seconds_per_step
    packing = packing_speedup(runs_per_gpu=runs_per_gpu, timings=timings)[1]
    if runs_per_gpu > 1:
        _pack_rows(rows=rows, runs=runs, labels=labels, gpu=gpu, runs_per_gpu=runs_per_gpu, timings=timings)
        packing += (f"; each row packs as many runs as its peak memory fits on one {gpu} "
                    f"(about {GPU_MEMORY_GIB[gpu]} GiB free), at most {runs_per_gpu}" if gpu in GPU_MEMORY_GIB else
                    f"; the memory of a {gpu} is unknown here, so every row is priced one run at a time")
    extraction = estimate_extraction(runs=runs, gpu=gpu, timings=timings, rows=labels)
    total = sum(r["seconds"] for r in rows.values()) / 3600
    return {"gpu": gpu, "rate": rate, "rows": rows, "extraction": extraction, "gpu_hours": total, "packing": packing,
            "gpu_hours_left": sum(r["todo_seconds"] for r in rows.values()) / 3600,
            "extract_gpu_hours": sum(e["seconds"] for e in extraction if e["seconds"]) / 3600}


def _pack_rows(*, rows: dict, runs: list, labels: dict, gpu: str, runs_per_gpu: int, timings: dict | None) -> None:
    """Each row's peak memory, how many of its runs one ``gpu`` holds (at most ``runs_per_gpu``), and its
    GPU-hours divided by the measured speed-up of that many packed runs (none measured: unchanged)."""
    memo: dict = {}
    for run in {r.key: r for r in runs}.values():
        row = rows[labels[run.key]]
        try:
            peak = run_peak_mib(run, device_type="cuda", memo=memo)
        except UserError:
            peak = None
        row["peak_mib"] = max(row.get("peak_mib") or 0, peak or 0) or None
    for row in rows.values():
        card = GPU_MEMORY_GIB.get(gpu)
        row["fit"] = min(runs_per_gpu, card * 1024 // row["peak_mib"]) if card and row.get("peak_mib") else None
        speedup = packing_speedup(runs_per_gpu=row["fit"], timings=timings)[0] if row["fit"] else 1.0
        row["seconds"] /= speedup
        row["todo_seconds"] /= speedup


def estimate_extraction(*, runs: list, gpu: str, timings: dict | None, rows: dict[str, str]) -> list[dict]:
    """Each missing vision split the runs read: images x views per image / extraction rate, and its users."""
    from pipeline.data.views import window_boxes
    from pipeline.encode.config import ExtractConfig
    from pipeline.sweep.caches import is_present, needed
    from pipeline.sweep.sizes import split_images

    users: dict[tuple[str, str], set[str]] = {}
    splits_dirs: dict[tuple[str, str], str | None] = {}
    training: set[tuple[str, str]] = set()
    for run in runs:
        for key in needed(run):
            if key[1] != "text":
                users.setdefault(key, set()).add(rows[run.key])
                splits_dirs[key] = run.eval.get("splits_dir")
        training.add((run.config["data"]["cache"], run.config["data"]["split"] or "<training split>"))
    views_per_image = ExtractConfig(backbone="clip-l", out="-").views
    out = []
    for (store, split), rows_using in users.items():
        if is_present(store, split):
            continue
        images, size, source = split_images(split, splits_dir=splits_dirs[(store, split)])
        try:
            inputs = _store_inputs(store, memo={})
        except UserError as err:
            out.append({"store": store, "split": split, "images": images, "images_from": source, "views": None,
                        "views_from": "?", "views_per_s": None, "rate_from": str(err), "seconds": None,
                        "rows": sorted(rows_using)})
            continue
        size_px = int(inputs["input_size"])
        if (store, split) in training:
            per_image, how = views_per_image, f"{views_per_image} view(s) per image (fusioner extract --views)"
        elif size and not split.startswith("mosaic4/"):
            per_image = len(window_boxes(height=size[1], width=size[0], size=size_px, stride=(2 * size_px) // 3))
            how = f"{per_image} windows per {size[0]}x{size[1]} image"
        else:
            per_image, how = 1, "1 view per image"
        rate = extraction_rate(backbone=inputs["backbone"], input_size=size_px, gpu=gpu, timings=timings)
        views = images * per_image if images else None
        out.append({"store": store, "split": split, "images": images, "images_from": source, "views": views,
                    "views_from": how, "views_per_s": rate.per_second, "rate_from": rate.source,
                    "seconds": views / rate.per_second if views else None, "rows": sorted(rows_using)})
    return out


def format_estimate(estimate: dict, *, study_name: str) -> str:
    packed = any("fit" in row for row in estimate["rows"].values())
    extra = (" peak GiB (runs per GPU) |", "---|") if packed else ("", "")
    head = "| row | runs (done) | samples/epoch | GFLOP/sample | steps | s/step | GPU-hours | samples from |"
    lines = [f"study {study_name} on {estimate['gpu']}: training", head + extra[0],
             "|---|---|---|---|---|---|---|---|" + extra[1]]
    for label, row in estimate["rows"].items():
        samples = (f"{min(row['samples']):,}" if min(row["samples"], default=0) == max(row["samples"], default=0)
                   else f"{min(row['samples']):,}-{max(row['samples']):,}") if row["samples"] else "?"
        hours = f"{row['seconds'] / 3600:,.2f}" + (f" (+{row['unpriced']} unpriced)" if row["unpriced"] else "")
        gflop = f"{row['gflop']:,.2f}" if row["gflop"] is not None else "?"
        per_step = f"{row['seconds_per_step']:.4f}" if row["seconds_per_step"] is not None else "?"
        fit = ""
        if packed:
            peak = f"{row['peak_mib'] / 1024:,.1f}" if row.get("peak_mib") else "?"
            fit = f" {peak} ({row['fit'] if row.get('fit') is not None else '?'}) |"
        lines.append(f"| {label} | {row['runs']} ({row['done']}) | {samples} | {gflop} | {row['steps']:,} "
                     f"| {per_step} | {hours} | {'; '.join(row['sources'])} |{fit}")
    lines.append(f"seconds per step: {estimate['rate'].source}")
    if estimate.get("packing"):
        lines.append(f"packing: {estimate['packing']}")
    if estimate["extraction"]:
        lines += ["", "extraction of the missing caches:",
                  "| store split | images | views | views/s | GPU-hours | used by | images from; views from; rate from |",
                  "|---|---|---|---|---|---|---|"]
        for item in estimate["extraction"]:
            hours = f"{item['seconds'] / 3600:,.2f}" if item["seconds"] else "?"
            images = f"{item['images']:,}" if item["images"] else "?"
            views = f"{item['views']:,}" if item["views"] else "?"
            users = (f"all {len(item['rows'])} rows" if len(item["rows"]) == len(estimate["rows"])
                     else f"{len(item['rows'])} row(s): {', '.join(item['rows'])}")
            lines.append(f"| {item['store']} {item['split']} | {images} | {views} | {item['views_per_s'] or 0:,.0f} | "
                         f"{hours} | {users} | {item['images_from']}; "
                         f"{item['views_from']}; {item['rate_from']} |")
    lines.append(f"total: {estimate['gpu_hours']:,.1f} GPU-hours of training ({estimate['gpu_hours_left']:,.1f} for "
                 f"runs not done) + {estimate['extract_gpu_hours']:,.2f} of extraction")
    return "\n".join(lines)
