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
    from pipeline.encoders import describe_encoders

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
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage one: run a frozen encoder once and cache its features in a Zarr store.

    A killed run resumes where it stopped when started again with the same options.

    Examples:

      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --out cache/clip-l

      fusioner extract --backbone clip-l --dataset voc --data-root ~/data/VOCdevkit/VOC2012 --split val

      fusioner extract --backbone bert-b --text-only --dataset voc --out cache/bert-b
    """
    from pipeline.extract import ExtractConfig, extract as run_extract

    config = ExtractConfig(
        backbone=backbone, out=str(out or Path("cache") / backbone), dataset=dataset,
        data_root=str(data_root) if data_root else None, split=split, dataset_options=_parse_options(option),
        views=views, eval_resize=eval_resize, stride=stride, seed=seed, input_size=input_size,
        batch_size=batch_size, shard_size=shard_size, text_only=text_only, vision_only=vision_only,
        weights=str(weights) if weights else None, random_init=random_init, skip_bad=skip_bad,
        overwrite=overwrite, workers=workers, device=device,
        extra_names=[n.strip() for n in (names or "").split(",") if n.strip()],
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
    from pipeline.store import describe_store

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
    typer.echo(f"input      {data['input_size']} px, grid {data['grid']}, vision dim {data['vision_dim']}, "
               f"text dim {data['text_dim']}")
    typer.echo(f"mean/std   {data['mean']} / {data['std']}")
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
