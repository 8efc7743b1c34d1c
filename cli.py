"""The ``fusioner`` command line: thin entry points over :mod:`pipeline`.

Each command parses its options, checks paths and calls one keyword-only
function of the package. User errors print one line and exit with code 2;
``--verbose`` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import UserError

app = typer.Typer(
    name="fusioner",
    help=(
        "Open-vocabulary semantic segmentation on frozen vision-language models "
        "(Fusioner, BMVC 2022) as a two-stage pipeline: extract frozen features "
        "into a Zarr cache once, then train and evaluate the fusion module and "
        "decoder from it.\n\n"
        "Example:  fusioner demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"verbose": False}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
) -> None:
    _STATE["verbose"] = verbose


# --------------------------------------------------------------------------- #
# Commands are registered below, one section per stage.
# --------------------------------------------------------------------------- #


def _parse_options(items: List[str]) -> dict:
    """``--option key=value`` pairs for a dataset reader."""
    from pipeline.config import parse_override

    return dict(parse_override(item) for item in items)


def _echo_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


# ---------------------------------- stage one ---------------------------------- #


@app.command()
def encoders() -> None:
    """List the frozen encoders: towers, patch size, dims and where weights come from.

    Example:  fusioner encoders
    """
    from pipeline.encode.registry import describe_encoders

    rows = describe_encoders()
    keys = ["name", "towers", "arch", "patch", "grid@224", "vision_dim", "text_dim", "weights"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys[:-1]}
    typer.echo("  ".join(k.ljust(widths.get(k, 0)) for k in keys))
    for row in rows:
        typer.echo("  ".join(str(row[k]).ljust(widths.get(k, 0)) for k in keys))


@app.command()
def extract(
    backbone: str = typer.Option(..., "--backbone", "-b", help="Encoder name (see `fusioner encoders`)."),
    out: Path = typer.Option(None, "--out", "-o", help="Store path (default cache/<backbone>)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Reader: voc, coco, fss, folder, mosaic4."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root folder."),
    split: str = typer.Option("train", "--split", help="train (augmented views) or val/test (evaluation windows)."),
    option: List[str] = typer.Option([], "--option", help="Reader option key=value, e.g. list_file=val.txt."),
    views: int = typer.Option(1, "--views", help="Seeded augmented views per training image."),
    eval_resize: bool = typer.Option(False, "--eval-resize", help="Evaluation images resized whole, not windowed."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding-window stride (default 2/3 of the window)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmented views."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Encoder input size (default: the encoder's)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Views per shard (default about 16 MiB)."),
    text_only: bool = typer.Option(False, "--text-only", help="Only the class-name embeddings."),
    vision_only: bool = typer.Option(False, "--vision-only", help="Skip the class-name embeddings."),
    names: Optional[str] = typer.Option(None, "--names", help="Extra class names to embed, comma-separated."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local checkpoint file or folder."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (pipeline checks, timing)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images as skipped instead of stopping."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the store and start over."),
    workers: int = typer.Option(1, "--workers", help="Worker processes (dask), each owning whole shards."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    class_words: str = typer.Option("auto", "--class-words",
                                    help="raw split-file names (auto for voc/coco, as released) or natural words."),
    normalize: str = typer.Option("auto", "--normalize",
                                  help="auto (voc/coco: the released dataset statistics), encoder, pascal, coco."),
    last_window: str = typer.Option("pad", "--last-window", help="pad (released) or slide the last partial window."),
    episodes: Optional[Path] = typer.Option(None, "--episodes",
                                            help="Splits folder: only the images its standard episodes score."),
    fold: List[int] = typer.Option([], "--fold", help="With --episodes: these folds (default all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage one: run a frozen encoder once and cache its features in a Zarr store.

    A killed run resumes where it stopped when started again with the same options.

    Examples:

      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --out cache/clip-l

      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --split val

      fusioner extract --backbone bert-b --text-only --dataset voc --out cache/bert-b

      fusioner extract --backbone clip-l --dataset coco --data-root ~/data/coco --split val --episodes ../shared/splits
    """
    from pipeline.encode.extract import extract as run_extract
    from pipeline.encode.plan import ExtractConfig

    config = ExtractConfig(
        backbone=backbone, out=str(out or Path("cache") / backbone), dataset=dataset,
        data_root=str(data_root) if data_root else None, split=split, dataset_options=_parse_options(option),
        views=views, eval_resize=eval_resize, stride=stride, seed=seed, input_size=input_size,
        batch_size=batch_size, shard_size=shard_size, text_only=text_only, vision_only=vision_only,
        weights=str(weights) if weights else None, random_init=random_init, skip_bad=skip_bad,
        overwrite=overwrite, workers=workers, device=device,
        extra_names=[n.strip() for n in (names or "").split(",") if n.strip()],
        class_words=class_words, normalize=normalize, last_window=last_window,
        episodes=str(episodes) if episodes else None, episode_folds=list(fold),
    )
    report = run_extract(config=config, quiet=quiet)
    if report.split:
        typer.echo(f"{report.out} {report.split}: {report.views} views, {report.shards_run} shards written, "
                   f"{report.shards_skipped} already done")
    if report.text_classes:
        typer.echo(f"{report.out} text: {report.text_classes} class names embedded")
    if report.bad:
        typer.echo(f"skipped {len(report.bad)} bad image(s):", err=True)
        for image_id, reason in report.bad:
            typer.echo(f"  {image_id}: {reason}", err=True)
    if not report.pretrained:
        typer.echo("note: random-init weights; features are for pipeline checks, not results", err=True)


@app.command()
def info(
    store: Path = typer.Argument(..., help="Store path, e.g. cache/clip-l."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Describe a feature store: encoder, weights, sizes, splits, counts and bytes.

    Example:  fusioner info cache/clip-l
    """
    from pipeline.store.info import describe_store

    data = describe_store(store)
    if as_json:
        _echo_json(data)
        return
    weights = data["weights"]
    typer.echo(f"store      {data['path']}  (format {data['format_version']}, {data['bytes'] / 2**20:.1f} MiB)")
    typer.echo(f"encoder    {data['encoder']}  weights: {weights['source']}"
               + ("" if weights["pretrained"] else "  [random-init: not a result]"))
    if weights.get("sha256"):
        typer.echo(f"sha256     {weights['sha256']}")
    if data["grid"]:
        typer.echo(f"input      {data['input_size']} px, grid {data['grid']}, vision dim {data['vision_dim']}, "
                   f"text dim {data['text_dim']}")
        typer.echo(f"mean/std   {data['mean']} / {data['std']}")
    else:
        typer.echo(f"text only  dim {data['text_dim']}")
    typer.echo(f"created    {data['created']}  versions: "
               + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()))
    if "text" in data:
        t = data["text"]
        typer.echo(f"text       {t['classes']} classes x {t['dim']} ({t['templates']} prompt templates)")
    for name, split in data["splits"].items():
        typer.echo(f"split      {name}: {split['kind']}, {split['images']} images, {split['views']} views, "
                   f"shards {split['shards_done']}{'' if split['complete'] else ' (incomplete: re-run extract to resume)'}, "
                   f"{split['bytes'] / 2**20:.1f} MiB ({split['bytes_per_view']} B/view), features {split['features']}")
        if split["skipped"]:
            typer.echo(f"           skipped {len(split['skipped'])} bad image(s): "
                       + ", ".join(s[0] for s in split["skipped"][:5]))


# ---------------------------------- datasets ---------------------------------- #


@app.command()
def datasets() -> None:
    """List the dataset readers (with the layout each expects) and the zero-shot protocols.

    Example:  fusioner datasets
    """
    from pipeline.data.protocols import describe_all

    typer.echo(describe_all())


@app.command("make-mosaic")
def make_mosaic(
    fss_root: Path = typer.Option(..., "--fss-root", help="FSS-1000 root (one folder per class)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (mask-folder layout + mosaic4.json)."),
    classes_file: Path = typer.Option(..., "--classes-file", help="Test classes, e.g. splits/fss/test.txt."),
    count: int = typer.Option(600, "--count", help="Number of composites."),
    seed: int = typer.Option(0, "--seed"),
    tile: int = typer.Option(224, "--tile", help="Tile side in pixels (composite is 2x2 tiles)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write the Mosaic-4 benchmark: 2x2 composites of FSS-1000 test images of 4 different classes.

    Example:  fusioner make-mosaic --fss-root ~/data/FSS-1000 --classes-file ../shared/splits/fss/test.txt --out ~/data/mosaic4
    """
    from pipeline.data.mosaic import make_mosaic as run

    path = run(fss_root=fss_root, out=out, classes_file=classes_file, count=count, seed=seed, tile=tile,
               progress=not quiet)
    typer.echo(f"wrote {count} composites to {path}")


# ---------------------------------- stage two ---------------------------------- #


def _train_config(*, config_file, preset, cache, text_cache, split, protocol, fold, novel, out, overrides):
    from pipeline.config import load_file
    from pipeline.train.config import build_config

    base = load_file(config_file) if config_file else {}
    sets = list(overrides)
    for key, value in (("data.cache", cache), ("data.text_cache", text_cache), ("data.split", split),
                       ("data.protocol", protocol), ("data.fold", fold), ("out", out)):
        if value is not None:
            sets.insert(0, f"{key}={value}")
    if novel:
        sets.insert(0, "data.novel=[" + ", ".join(f'"{n.strip()}"' for n in novel.split(",")) + "]")
    return build_config(base=base, preset=preset, overrides=sets)


@app.command()
def train(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Vision store (e.g. cache/clip-l)."),
    text_cache: Optional[Path] = typer.Option(None, "--text-cache", help="Text store (default: --cache)."),
    split: Optional[str] = typer.Option(None, "--split", help="Training split in the store, e.g. voc/train."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="pascal5i, coco20i, coco2voc, custom."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Fold whose classes are held out."),
    novel: Optional[str] = typer.Option(None, "--novel", help="Held-out class names for --protocol custom."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model size: paper, small, tiny."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    overrides: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set model.fusion.layers=6."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage two: train the fusion module and decoder from cached features (no encoder runs).

    Examples:

      fusioner train --cache cache/clip-l --protocol pascal5i --fold 0 --out runs/pascal-f0

      fusioner train --cache cache/dino-b --text-cache cache/bert-b --fold 1 --set model.fusion.mode=late

      fusioner train --config my.yaml --set optim.epochs=50 --resume --out runs/x
    """
    from pipeline.config import to_dict
    from pipeline.eval.validation import train_and_validate as run

    config = _train_config(config_file=config_file, preset=preset, cache=cache, text_cache=text_cache, split=split,
                           protocol=protocol, fold=fold, novel=novel, out=out, overrides=overrides)
    if print_config:
        _echo_json(to_dict(config))
        return
    summary = run(config=config, resume=resume, quiet=quiet)
    typer.echo(f"{config.out}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
               f"data wait {100 * summary['data_wait_fraction']:.1f}% of step time")
    if summary["val"]:
        last = summary["val"][-1]
        typer.echo(f"validation mIoU {last['miou']:.1f}  FB-IoU {last['fb_iou']:.1f}  ({last['episodes']} episodes)")
    if not summary["pretrained_features"]:
        typer.echo("note: trained on random-init features; numbers are a pipeline check, not a result", err=True)


@app.command("eval")
def eval_command(
    runs: List[Path] = typer.Argument(..., help="Run directories (one per fold) to evaluate."),
    split: Optional[str] = typer.Option(None, "--split", help="Evaluation split in the vision store, e.g. voc/val."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Vision store (default: the run's)."),
    text_cache: Optional[Path] = typer.Option(None, "--text-cache", help="Text store (default: the run's)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Protocol (default: the run's)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder of standard episode lists (pascal/val/fold0.txt ...)."),
    mosaic: bool = typer.Option(False, "--mosaic", help="Mosaic-4: |W| = the 4 classes of each image at once."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N episodes."),
    min_pixels: int = typer.Option(2048, "--min-pixels", help="Without lists: a novel class needs this many pixels to make an episode."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write eval.json/.csv/.md (default: first run)."),
    device: str = typer.Option("auto", "--device"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate trained runs on held-out classes: mIoU per fold and mean, FB-IoU, per-class IoU.

    Examples:

      fusioner eval runs/pascal-f0 runs/pascal-f1 runs/pascal-f2 runs/pascal-f3 --split voc/val --splits ../shared/splits

      fusioner eval runs/mosaic --split mosaic4/test --mosaic
    """
    from pipeline.eval.report import evaluate_runs

    table = evaluate_runs(runs=runs, split=split, cache=cache, text_cache=text_cache, protocol=protocol,
                          splits_dir=splits, mode="multiclass" if mosaic else "binary", limit=limit,
                          min_pixels=min_pixels, out=out, device=device, quiet=quiet)
    typer.echo(table)


@app.command()
def predict(
    image: Path = typer.Argument(..., help="A photo (JPEG/PNG)."),
    classes: str = typer.Option(..., "--classes", help='Comma-separated class names, e.g. "cat, potted plant, sofa".'),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run directory of a trained model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: predictions/<image stem>)."),
    resize: bool = typer.Option(False, "--resize", help="One resized view instead of sliding windows."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Segment a photo into free-form classes: one mask per class and a coloured overlay with a legend.

    Example:  fusioner predict photo.jpg --classes "cat, potted plant, sofa" --checkpoint runs/pascal-f0
    """
    from pipeline.eval.predict import parse_classes
    from pipeline.eval.predict import predict as run
    from pipeline.runtime import resolve_device

    names = parse_classes(classes)
    target = out or Path("predictions") / image.stem
    summary = run(image=image, classes=names, checkpoint=checkpoint, out=target,
                  device=str(resolve_device(device)), resize=resize)
    for name, share in summary["coverage"].items():
        typer.echo(f"{name:>24s}  {100 * share:5.1f}% of pixels")
    typer.echo(f"wrote {target}/overlay.png and {len(names)} masks")
    if not summary["pretrained_features"]:
        typer.echo("note: random-init vision tower; the masks are a pipeline check, not a result", err=True)


# ------------------------------------ sweep ----------------------------------- #


@app.command()
def sweep(
    study: Path = typer.Argument(..., help="Study file (YAML), e.g. pipeline/studies/table1.yaml."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Join a running dask cluster, e.g. tcp://head:8786."),
    slurm: bool = typer.Option(False, "--slurm", help="Start dask workers as SLURM jobs (dask-jobqueue)."),
    jobs: int = typer.Option(1, "--jobs", help="SLURM jobs to start."),
    gpus_per_job: int = typer.Option(1, "--gpus-per-job", help="GPUs (and workers) per SLURM job."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local workers (default: one per GPU, else 2 CPU workers)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, their folders and what is done; run nothing."),
    retries: int = typer.Option(2, "--retries", help="Retries of a failed run before it is reported."),
    overrides: List[str] = typer.Option([], "--set", help="Override a base config key or study.<key>."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run a whole study (folds x encoder pairs x variants x seeds) on dask and write the paper's table.

    A killed sweep resumes when the same command is run again: finished runs are skipped.

    Examples:

      fusioner sweep pipeline/studies/table1.yaml

      fusioner sweep pipeline/studies/table1.yaml --scheduler tcp://head:8786

      fusioner sweep pipeline/studies/table1.yaml --slurm --jobs 8 --gpus-per-job 1

      fusioner sweep pipeline/studies/table1.yaml --dry-run
    """
    from pipeline.sweep.command import sweep_command

    code = sweep_command(study=study, scheduler=scheduler, slurm=slurm, jobs=jobs, gpus_per_job=gpus_per_job,
                         workers=workers, dry_run=dry_run, retries=retries, quiet=quiet, overrides=overrides)
    if code:
        raise typer.Exit(code)


# ------------------------------------ demo ------------------------------------ #


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Real photos in the mask-folder layout instead of generated shapes."),
    novel: Optional[str] = typer.Option(None, "--novel", help="Held-out class names (needed with --data-root)."),
    epochs: int = typer.Option(8, "--epochs", help="Training epochs."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run the whole pipeline offline in a few minutes: data, extract, train, eval, predict, report.

    Examples:

      fusioner demo

      fusioner demo --data-root ../shared/data/coco128 --novel "cat,dog,bus" --out demo-coco
    """
    from pipeline.demo import run_demo

    names = [n.strip() for n in novel.split(",")] if novel else None
    report = run_demo(out=out, data_root=data_root, novel=names, epochs=epochs, quiet=quiet)
    typer.echo(report.read_text())
    typer.echo(f"wrote {report} (with {out}/prediction/overlay.png and {out}/run/curves.png)")


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point with one-line user errors (exit code 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or "-v" in args
    try:
        app(args=args, standalone_mode=False)
    except UserError as err:
        if verbose:
            raise
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer.Exit and friends
        return int(exc.code or 0)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            if verbose:
                raise
            err.show()
            return err.exit_code
        if isinstance(err, click.exceptions.Exit):
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
