"""The ``fusioner`` command line: typer declarations over :mod:`pipeline`.

Each command declares its options and calls one keyword-only function of the
package with typed values (paths, numbers, lists, ``{dotted key: value}``
mappings; never ``"key=value"`` strings), then prints what it returned. Every
error goes through :func:`pipeline.errors.run_entry`: a user error or a usage
error prints one line (or click's usage block) and exits with code 2;
``--verbose`` shows the traceback.
"""

from __future__ import annotations

# This file is over the ~400-line module guideline on purpose: it holds only the typer declarations of
# every command (options, help, examples); each command body is one call into :mod:`pipeline`.

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from pipeline import __version__
from pipeline.config import parse_override
from pipeline.data.augment import AugmentConfig
from pipeline.data.labels import parse_names
from pipeline.encode.config import ExtractConfig
from pipeline.errors import UserError, in_flags, run_entry
from pipeline.host import keep_freed_memory

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
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
)


_EXTRACT_DEFAULTS = {f.name: f.default for f in fields(ExtractConfig)}
_AUGMENT_DEFAULTS = {f.name: f.default for f in fields(AugmentConfig)}


@dataclass
class GlobalOptions:
    """The options given before the command name, kept in typer's context object for the command."""

    verbose: bool = False
    quiet: bool = False


# Options every command takes, before or after the command name: `fusioner -q train ...` = `fusioner train -q ...`.
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", show_default=False)]
# `--set key=value`: the value is read as YAML (numbers, lists, true/false); each item arrives parsed,
# as a (dotted key, typed value) pair, so the command hands the library a {key: value} mapping.
Settings = Annotated[List[str], typer.Option(
    "--set", metavar="KEY=VALUE", parser=parse_override, show_default=False,
    help="Dotted config setting, value read as YAML, e.g. --set optim.epochs=50 (repeatable).")]


def _extract_default(name: str) -> str:
    """``ExtractConfig``'s default for ``name``, shown in ``--help``: the config holds the one copy of it."""
    return str(_EXTRACT_DEFAULTS[name])


def _augment_default(name: str) -> str:
    return str(_AUGMENT_DEFAULTS[name])


def _names(value: Optional[str]) -> Optional[List[str]]:
    """A comma-separated option as the list of names it holds (quotes and apostrophes kept verbatim)."""
    return None if value is None else parse_names(value)


def _quiet(ctx: typer.Context, flag: bool) -> bool:
    """The command's ``--quiet``, or the one given before the command name (``fusioner -q train``)."""
    options = ctx.find_object(GlobalOptions)
    return flag or bool(options and options.quiet)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusioner {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Verbose = False,
    quiet: Quiet = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, show_default=False,
                                          help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = GlobalOptions(verbose=verbose, quiet=quiet)


def _settings(sets: List[Any], **named: Any) -> dict:
    """The named options (``data__cache`` is ``data.cache``; unset ones left out), then ``--set``'s settings."""
    settings = {key.replace("__", "."): value for key, value in named.items() if value is not None}
    settings.update(dict(sets))
    return settings


def _echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ---------------------------------- stage one ---------------------------------- #


@app.command()
def encoders(quiet: Quiet = False, verbose: Verbose = False) -> None:
    """List the frozen encoders: towers, patch size, dims and where weights come from.

    \b
    Example:
      fusioner encoders
    """
    from pipeline.encode.registry import encoders_table

    typer.echo(encoders_table())


# Longer than the ~60-line rule: it is a list of typer declarations, one per option of stage one,
# and the body below them is one call into the library.
@app.command()
def extract(
    ctx: typer.Context,
    backbone: str = typer.Option(..., "--backbone", "-b", metavar="NAME", help="Encoder name (see `fusioner encoders`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="PATH", show_default="cache/<backbone>",
                                       help="Store path."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", metavar="NAME",
                                          help="Reader: voc, coco, fss, folder, mosaic4."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="PATH", help="Dataset root folder."),
    split: Optional[str] = typer.Option(None, "--split", show_default=_extract_default("split"), metavar="NAME",
                              help="train (augmented views) or val/test (evaluation windows)."),
    option: List[str] = typer.Option([], "--option", metavar="KEY=VALUE", parser=parse_override,
                                                 show_default=False,
                                                 help="Reader option, e.g. list_file=val.txt (repeatable)."),
    views: Optional[int] = typer.Option(
        None, "--views", show_default=_extract_default("views"), metavar="N",
        help="Seeded augmented views per training image: 1 for quick checks, 4 for the paper's studies "
             "(K x the time and disk; the released code draws a fresh view every step)."),
    eval_resize: bool = typer.Option(False, "--eval-resize", help="Evaluation images resized whole, not windowed."),
    stride: Optional[int] = typer.Option(None, "--stride", metavar="PX", show_default="2/3 of the window",
                                         help="Sliding-window stride."),
    seed: Optional[int] = typer.Option(None, "--seed", show_default=_extract_default("seed"), metavar="N", help="Seed of the augmented views."),
    border: Optional[str] = typer.Option(None, "--border", metavar="MODE", show_default=_augment_default("border"),
                               help="Mask label of pixels augmentation brings in from outside: background or ignore."),
    augment_backend: Optional[str] = typer.Option(
        None, "--augment-backend", metavar="WHERE", show_default=_augment_default("backend"),
        help="cpu (albumentations, in the render processes) or gpu (kornia, batched on the encoder's device; "
             "the gpu-augment extra). Recorded: a store resumes only with the same one."),
    input_size: Optional[int] = typer.Option(None, "--input-size", metavar="PX", show_default="the encoder's",
                                             help="Encoder input size."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", show_default=_extract_default("batch_size"),
                                            help="Views per encoder batch."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", metavar="N", show_default="about 16 MiB",
                                             help="Views per shard."),
    text_only: bool = typer.Option(False, "--text-only", help="Only the class-name embeddings."),
    vision_only: bool = typer.Option(False, "--vision-only", help="Skip the class-name embeddings."),
    names: Optional[str] = typer.Option(None, "--names", callback=_names, metavar="NAMES",
                                help="Extra class names to embed, comma-separated."),
    weights: Optional[Path] = typer.Option(None, "--weights", metavar="PATH", help="Local checkpoint file or folder."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (pipeline checks, timing)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images as skipped instead of stopping."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the store and start over."),
    verify: bool = typer.Option(False, "--verify", help="Check every chunk of finished shards; rewrite damaged ones."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", show_default=_extract_default("workers"),
                                         help="Worker processes (dask), each owning whole shards."),
    render_workers: Optional[int] = typer.Option(None, "--render-workers", metavar="N",
                                                show_default=_extract_default("render_workers"),
                                       help="Processes decoding and rendering shards ahead of the encoder (0: one thread)."),
    writers: Optional[int] = typer.Option(None, "--writers", metavar="N", show_default=_extract_default("writers"), help="Threads writing finished shards."),
    layout: Optional[str] = typer.Option(None, "--layout", show_default=_extract_default("layout"), metavar="LAYOUT",
                               help="image, or shuffled: views in a seeded random order in ~128 MiB shards, for streaming."),
    device: Optional[str] = typer.Option(None, "--device", show_default=_extract_default("device"), metavar="DEVICE", help="auto, cpu, cuda, cuda:1 ..."),
    class_words: Optional[str] = typer.Option(None, "--class-words", show_default=_extract_default("class_words"), metavar="WORDS",
                                    help="raw split-file names (auto for voc/coco, as released) or natural words."),
    normalize: Optional[str] = typer.Option(None, "--normalize", show_default=_extract_default("normalize"), metavar="STATS",
                                  help="auto (voc/coco: the released dataset statistics), encoder, pascal, coco."),
    last_window: Optional[str] = typer.Option(None, "--last-window", show_default=_extract_default("last_window"), metavar="RULE", help="pad (released) or slide the last partial window."),
    window_fill: Optional[str] = typer.Option(None, "--window-fill", show_default=_extract_default("window_fill"),
                                              metavar="FILL",
                                              help="Padded window pixels: released (-1 after normalisation) or black."),
    episodes: Optional[Path] = typer.Option(None, "--episodes", metavar="SPLITS",
                                            help="Splits folder: only the images its standard episodes score."),
    fold: List[int] = typer.Option([], "--fold", metavar="N", help="With --episodes: these folds (default all)."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage one: run a frozen encoder once and cache its features in a Zarr store.

    A killed run resumes where it stopped when started again with the same options.

    Examples:

    \b
      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --out cache/clip-l
      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --split val
      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --views 4 --layout shuffled --render-workers 12
      fusioner extract --backbone bert-b --text-only --dataset voc --out cache/bert-b
      fusioner extract --backbone clip-l --dataset coco --data-root ~/data/coco --split val --episodes ../shared/splits
    """
    from pipeline.encode.extract import extract as run_extract

    given = dict(split=split, views=views, seed=seed, batch_size=batch_size, workers=workers, device=device,
                 class_words=class_words, normalize=normalize, last_window=last_window, window_fill=window_fill,
                 render_workers=render_workers, writers=writers, layout=layout)
    config = ExtractConfig(
        backbone=backbone, out=str(out or Path("cache") / backbone), dataset=dataset,
        data_root=str(data_root) if data_root else None, dataset_options=dict(option),
        eval_resize=eval_resize, stride=stride, input_size=input_size, shard_size=shard_size,
        text_only=text_only, vision_only=vision_only, weights=str(weights) if weights else None,
        random_init=random_init, skip_bad=skip_bad, overwrite=overwrite, verify=verify,
        extra_names=list(names or []), episodes=str(episodes) if episodes else None, episode_folds=list(fold),
        augment=AugmentConfig(**{key: value for key, value in (("border", border), ("backend", augment_backend))
                                 if value is not None}),
        **{key: value for key, value in given.items() if value is not None},  # unset: the config's default
    )
    report = run_extract(config=config, quiet=_quiet(ctx, quiet))
    typer.echo(report.describe())
    for line in report.notes:
        typer.echo(line, err=True)


@app.command()
def info(
    store: Path = typer.Argument(..., metavar="STORE", hidden=True),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Describe a feature store (STORE: its path, e.g. cache/clip-l): encoder, weights, sizes, splits, counts, bytes.

    \b
    Example:
      fusioner info cache/clip-l
    """
    from pipeline.store.info import describe_store, format_store

    data = describe_store(store)
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else format_store(data))


# ---------------------------------- datasets ---------------------------------- #


@app.command()
def datasets(quiet: Quiet = False, verbose: Verbose = False) -> None:
    """List the dataset readers (with the layout each expects) and the zero-shot protocols.

    \b
    Example:
      fusioner datasets
    """
    from pipeline.data.protocols import describe_all

    typer.echo(describe_all())


@app.command("make-mosaic")
def make_mosaic(
    ctx: typer.Context,
    fss_root: Path = typer.Option(..., "--fss-root", metavar="PATH", help="FSS-1000 root (one folder per class)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="PATH", help="Output folder (mask-folder layout + mosaic4.json)."),
    classes_file: Path = typer.Option(..., "--classes-file", metavar="PATH", help="Test classes, e.g. splits/fss/test.txt."),
    count: int = typer.Option(600, "--count", metavar="N", help="Number of composites."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the class and image draws."),
    tile: int = typer.Option(224, "--tile", metavar="PX", help="Tile side in pixels (composite is 2x2 tiles)."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Write the Mosaic-4 benchmark: 2x2 composites of FSS-1000 test images of 4 different classes.

    \b
    Example:
      fusioner make-mosaic --fss-root ~/data/FSS-1000 --classes-file ../shared/splits/fss/test.txt --out ~/data/mosaic4
    """
    from pipeline.data.mosaic import make_mosaic as run

    path = run(fss_root=fss_root, out=out, classes_file=classes_file, count=count, seed=seed, tile=tile,
               progress=not _quiet(ctx, quiet))
    typer.echo(f"wrote {count} composites to {path}")


# ---------------------------------- stage two ---------------------------------- #


@app.command()
def train(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Option(None, "--cache", metavar="PATH", help="Vision store (e.g. cache/clip-l)."),
    text_cache: Optional[Path] = typer.Option(None, "--text-cache", metavar="PATH", show_default="--cache",
                                              help="Text store."),
    split: Optional[str] = typer.Option(None, "--split", metavar="NAME", show_default="the store's training split",
                                        help="Training split in the store, e.g. voc/train or train."),
    protocol: Optional[str] = typer.Option(None, "--protocol", metavar="NAME",
                                           help="pascal5i, coco20i, coco2voc, custom."),
    fold: Optional[int] = typer.Option(None, "--fold", metavar="N", help="Fold whose classes are held out."),
    novel: Optional[str] = typer.Option(None, "--novel", callback=_names, metavar="NAMES",
                                        help="Held-out class names for --protocol custom, comma-separated."),
    preset: Optional[str] = typer.Option(None, "--preset", metavar="NAME", show_default="paper",
                                         help="Model size: paper, small, tiny."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", metavar="PATH", help="YAML config file."),
    overrides: Settings = [],
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="PATH", show_default="runs/default",
                                       help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    online: bool = typer.Option(False, "--online",
                                help="Run the frozen encoder on a fresh augmentation at every step (no cache)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="PATH", help="--online: dataset folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", metavar="NAME", show_default="folder",
                                          help="--online: reader name."),
    backbone: Optional[str] = typer.Option(None, "--backbone", metavar="NAME", help="--online: encoder, e.g. clip-l."),
    random_init: bool = typer.Option(False, "--random-init", help="--online: seeded random encoder weights."),
    tensorboard: bool = typer.Option(False, "--tensorboard",
                                     help="Also write TensorBoard event files to the run folder's tensorboard/ (same as "
                                          "--set tensorboard=true; needs fusioner[tensorboard])."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage two: train the fusion module and decoder from cached features (no encoder runs),
    or with --online from fresh augmentations through the frozen encoder at every step.

    Examples:

    \b
      fusioner train --cache cache/clip-l --protocol pascal5i --fold 0 --out runs/pascal-f0
      fusioner train --cache cache/dino-b --text-cache cache/bert-b --fold 1 --set model.fusion.mode=late
      fusioner train --config my.yaml --set optim.epochs=50 --resume --out runs/x
      fusioner train --online --data-root ~/data/VOCdevkit/VOC2012 --dataset voc --backbone clip-l --cache cache/clip-l
    """
    from pipeline.runs import train_from_settings

    if not online and (data_root or dataset or backbone or random_init):
        raise UserError("--data-root, --dataset, --backbone and --random-init go with --online")
    result = train_from_settings(
        config_file=config_file, preset=preset, resume=resume, quiet=_quiet(ctx, quiet),
        print_config=print_config,
        settings=_settings(overrides, data__cache=cache and str(cache),
                           data__text_cache=text_cache and str(text_cache), data__split=split,
                           data__protocol=protocol, data__fold=fold, data__novel=novel, out=out and str(out),
                           data__online__enabled=online or None,
                           data__online__data_root=data_root and str(data_root), data__online__dataset=dataset,
                           data__online__backbone=backbone, data__online__random_init=random_init or None,
                           tensorboard=tensorboard or None))
    if print_config:
        _echo_json(result.config)
        return
    typer.echo(result.describe())
    for line in result.notes:
        typer.echo(line, err=True)


# The library settings a command takes as a flag of another name. A setting named like one of the
# command's parameters (``render_workers``) is shown as that parameter's flag without being listed here;
# train's other settings are `--set key=value`.
TRAIN_FLAGS = {"data.cache": "--cache", "data.text_cache": "--text-cache", "data.split": "--split",
               "data.protocol": "--protocol", "data.fold": "--fold", "data.novel": "--novel", "out": "--out",
               "resume": "--resume", "data.online.data_root": "--data-root", "data.online.dataset": "--dataset",
               "data.online.backbone": "--backbone", "data.online.random_init": "--random-init"}


def _deprecated_splits(value: Optional[Path]) -> Optional[Path]:
    if value is not None:
        typer.echo("note: eval --splits is deprecated, use --episode-lists", err=True)
    return value


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    runs: List[Path] = typer.Argument(..., metavar="RUN", hidden=True),
    split: Optional[str] = typer.Option(None, "--split", metavar="NAME", show_default="the store's evaluation split",
                                        help="Evaluation split in the vision store, e.g. voc/val or val."),
    cache: Optional[Path] = typer.Option(None, "--cache", metavar="PATH", show_default="the run's",
                                         help="Vision store."),
    text_cache: Optional[Path] = typer.Option(None, "--text-cache", metavar="PATH", show_default="the run's",
                                              help="Text store."),
    protocol: Optional[str] = typer.Option(None, "--protocol", metavar="NAME", show_default="the run's",
                                           help="Protocol."),
    episode_lists: Optional[Path] = typer.Option(
        None, "--episode-lists", metavar="PATH", show_default="derived from the masks",
        help="Folder of standard episode lists (pascal/val/fold0.txt ...)."),
    splits: Optional[Path] = typer.Option(None, "--splits", hidden=True, callback=_deprecated_splits,
                                          help="Old name of --episode-lists."),
    mosaic: bool = typer.Option(False, "--mosaic", help="Mosaic-4: |W| = the 4 classes of each image at once."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", show_default="all",
                                        help="Evaluate the first N episodes."),
    min_pixels: int = typer.Option(2048, "--min-pixels", metavar="N",
                                   help="Without lists: a novel class needs this many pixels to make an episode."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="PATH", show_default="the first run",
                                       help="Where to write eval.json/.csv/.md."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:1 ..."),
    allow_mismatch: List[str] = typer.Option(
        [], "--allow-mismatch", metavar="ASPECTS",
        help="Score stores that differ from the run's in these aspects anyway (encoder, weights, input_size, "
             "normalize, class_words; comma list or repeated); recorded in eval.json."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Evaluate trained runs (one RUN folder per fold) on held-out classes: mIoU per fold and mean, FB-IoU, per-class IoU.

    Examples:

    \b
      fusioner eval runs/pascal-f0 runs/pascal-f1 runs/pascal-f2 runs/pascal-f3 --split voc/val --episode-lists ../shared/splits
      fusioner eval runs/mosaic --split mosaic4/test --mosaic
    """
    from pipeline.eval.report import evaluate_runs

    table = evaluate_runs(runs=runs, split=split, cache=cache, text_cache=text_cache, protocol=protocol,
                          splits_dir=episode_lists or splits, mode="multiclass" if mosaic else "binary", limit=limit,
                          min_pixels=min_pixels, out=out, device=device, quiet=_quiet(ctx, quiet),
                          allow_mismatch=tuple(allow_mismatch))
    typer.echo(table)


@app.command()
def predict(
    ctx: typer.Context,
    image: Path = typer.Argument(..., metavar="IMAGE", hidden=True),
    classes: str = typer.Option(..., "--classes", callback=_names, metavar="NAMES",
                                help='Comma-separated class names, e.g. "cat, potted plant, sofa".'),
    checkpoint: Path = typer.Option(..., "--checkpoint", metavar="RUN", help="Run directory of a trained model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="PATH", show_default="predictions/IMAGE-STEM",
                                       help="Output folder."),
    resize: bool = typer.Option(False, "--resize", help="One resized view instead of sliding windows."),
    stride: Optional[int] = typer.Option(None, "--stride", metavar="PX", show_default="2/3 of a window",
                                         help="Step between windows; coarser is faster on large photos."),
    batch_size: int = typer.Option(16, "--batch-size", metavar="N",
                                   help="Windows encoded at once (bounds memory on large photos)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:1 ..."),
    allow_mismatch: List[str] = typer.Option(
        [], "--allow-mismatch", metavar="ASPECTS",
        help="Use stores that differ from the run's in these aspects anyway (encoder, weights, input_size, "
             "normalize, class_words)."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Segment a photo (IMAGE: JPEG/PNG) into free-form classes: one mask per class and a coloured overlay with a legend.

    \b
    Example:
      fusioner predict photo.jpg --classes "cat, potted plant, sofa" --checkpoint runs/pascal-f0
    """
    from pipeline.eval.predict import predict_photo

    summary = predict_photo(image=image, classes=classes, checkpoint=checkpoint,
                            out=out or Path("predictions") / image.stem, device=device, resize=resize,
                            stride=stride, batch_size=batch_size, quiet=_quiet(ctx, quiet),
                            allow_mismatch=tuple(allow_mismatch))
    typer.echo(summary["text"])
    for line in summary["notes"]:
        typer.echo(line, err=True)


@app.command()
def serve(
    ctx: typer.Context,
    run: Path = typer.Argument(..., metavar="RUN", hidden=True),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                             help="Address to listen on; 127.0.0.1 keeps the page to this machine."),
    port: int = typer.Option(7860, "--port", metavar="N", help="Port to listen on (0: any free port)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", metavar="MB", help="Largest photo accepted."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:1 ..."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Serve a web page over a trained RUN: upload a photo, type class names, see one mask per name.

    The run is loaded once; requests queue for it. The page's overlay, masks, label map and JSON are
    those `fusioner predict` writes for the same photo, names and views. Needs the serve extra.

    \b
    Example:
      fusioner serve runs/pascal-f0 --port 7860
    """
    from pipeline.serve.server import serve as run_server

    run_server(run=run, host=host, port=port, device=device, max_upload_mb=max_upload_mb, quiet=_quiet(ctx, quiet),
               announce=typer.echo)


# ------------------------------------ sweep ----------------------------------- #


@app.command()
def sweep(
    ctx: typer.Context,
    study: Optional[str] = typer.Argument(None, metavar="STUDY", hidden=True, show_default=False),
    list_studies: bool = typer.Option(False, "--list", help="List the studies shipped with the package and exit."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                            help="Join a running dask cluster, e.g. tcp://head:8786."),
    slurm: bool = typer.Option(False, "--slurm", help="Start dask workers as SLURM jobs (dask-jobqueue)."),
    jobs: int = typer.Option(1, "--jobs", metavar="N", help="SLURM jobs to start."),
    gpus_per_job: int = typer.Option(1, "--gpus-per-job", metavar="N", help="GPUs (and workers) per SLURM job."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N",
                                          show_default="one per GPU, else 2 CPU workers", help="Local workers."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, their folders and what is done; run nothing."),
    estimate: bool = typer.Option(False, "--estimate", help="Print the study's GPU-hours (runs x steps x s/step); run nothing."),
    gpu: str = typer.Option("h100", "--gpu", metavar="KIND", help="GPU kind --estimate prices: h100, h200, a100, l40s."),
    timings: Optional[Path] = typer.Option(None, "--timings", metavar="FILE",
                                           help="JSON from `python -m pipeline.bench gpu` to use measured s/step."),
    retries: int = typer.Option(2, "--retries", metavar="N", help="Retries of a failed run before it is reported."),
    runs_per_gpu: int = typer.Option(1, "--runs-per-gpu", metavar="N",
                                     help="Runs each GPU worker trains at once, where their estimated memory fits "
                                          "(a run out of memory is retried alone)."),
    overrides: Settings = [],
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run a whole STUDY (a YAML file, or the name of a shipped one: folds x encoder pairs x variants x seeds) on dask
    and write the paper's table.

    A killed sweep resumes when the same command is run again: finished runs are skipped.
    `--set` changes the base training config (optim.epochs=50) or, as study.SECTION.KEY=value,
    the study file itself (study.grid.seeds=[0,1,2]).

    Examples:

    \b
      fusioner sweep --list
      fusioner sweep table1
      fusioner sweep pipeline/studies/table1.yaml --scheduler tcp://head:8786
      fusioner sweep pipeline/studies/table1.yaml --slurm --jobs 8 --gpus-per-job 1
      fusioner sweep pipeline/studies/table1.yaml --dry-run
      fusioner sweep table1 --estimate --gpu h100
      fusioner sweep table7 --runs-per-gpu 3
    """
    from pipeline.sweep.catalog import describe_studies
    from pipeline.sweep.command import sweep_command

    if list_studies or study is None:
        typer.echo(describe_studies())
        raise typer.Exit(0 if list_studies else 2)
    code = sweep_command(study=study, scheduler=scheduler, slurm=slurm, jobs=jobs, gpus_per_job=gpus_per_job,
                         workers=workers, dry_run=dry_run, retries=retries, quiet=_quiet(ctx, quiet),
                         overrides=dict(overrides), estimate=estimate, gpu=gpu, timings=timings,
                         runs_per_gpu=runs_per_gpu)
    if code:
        raise typer.Exit(code)


# ------------------------------------ demo ------------------------------------ #


@app.command()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", metavar="PATH", help="Output folder."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", metavar="PATH", show_default="generated shapes",
                                             help="Real photos in the mask-folder layout."),
    novel: Optional[str] = typer.Option(None, "--novel", callback=_names, metavar="NAMES",
                                        help="Held-out class names, comma-separated (needed with --data-root)."),
    epochs: int = typer.Option(8, "--epochs", metavar="N", help="Training epochs."),
    backbone: str = typer.Option("clip-b", "--backbone", "-b", metavar="NAME",
                                 help="Vision encoder, random-init (test-vit: a tiny one, for a quick check)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", metavar="PX", show_default="the encoder's",
                                             help="Vision encoder input size (a small one for a quicker check)."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run the whole pipeline offline in a few minutes: data, extract, train, eval, predict, report.

    Examples:

    \b
      fusioner demo
      fusioner demo --data-root ../shared/data/coco128 --novel "cat,dog,bus" --out demo-coco
    """
    from pipeline.demo import run_demo

    report = run_demo(out=out, data_root=data_root, novel=novel or None, epochs=epochs, backbone=backbone,
                      input_size=input_size, quiet=_quiet(ctx, quiet))
    typer.echo(report.read_text())
    typer.echo(f"wrote {report} (with {out}/prediction/overlay.png and {out}/run/curves.png)")


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: one-line user errors and usage errors, exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # training and extraction steps reuse freed memory instead of faulting it in again
    # A command's typer.Exit(code) comes back as app()'s value in non-standalone mode.
    return run_entry(lambda: _invoke(args), verbose="--verbose" in args or "-v" in args)


RENAMED_FLAGS = {
    "train": TRAIN_FLAGS,
    "extract": {"extra_names": "--names", "episode_folds": "--fold", "dataset_options": "--option"},
    "eval": {"splits_dir": "--episode-lists", "vision_cache": "--cache"},
}


def command_flags(args: List[str]) -> dict:
    """The flag of each setting of the command ``args`` runs: its parameters' names, then RENAMED_FLAGS."""
    group = typer.main.get_command(app)
    name = next((arg for arg in args if arg in group.commands), None)  # type: ignore[attr-defined]
    if name is None:
        return {}
    params = group.commands[name].params  # type: ignore[attr-defined]
    flags = {p.name: max(p.opts, key=len) for p in params if p.param_type_name == "option"}
    return {**flags, **RENAMED_FLAGS.get(name, {})}


def _invoke(args: List[str]):
    """The typer app; a closed output pipe is re-raised as such (typer turns it into exit code 1).

    The library names the settings it was given (:func:`pipeline.errors.setting`); here they were
    typed as flags, so its messages show the running command's flags instead.
    """
    try:
        return app(args=args, prog_name="fusioner", standalone_mode=False)
    except UserError as err:
        raise UserError(in_flags(str(err), command_flags(args))) from err
    except SystemExit:
        # How typer (and click, whichever copy) answers EPIPE: stdout wrapped to swallow flushes, exit 1.
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":
            raise BrokenPipeError("the reader closed the output") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
