"""The Python API: the few calls a notebook needs, each keyword-only, each returning data.

Every function here is also what a ``fusioner`` command does, minus the
printing: results come back as dicts (and arrays where there are pixels), and
the files the command would write are written too where the call names an
output folder. Configs are plain nested dicts (``{"optim": {"epochs": 20}}``),
checked as strictly as the command line checks ``--set``.

Like the commands, the calls show progress bars (live widgets in a Jupyter notebook
with ipywidgets, plain bars elsewhere) and print the command line's notes to stderr,
e.g. that features come from random-init weights; ``quiet=True`` turns both off.

>>> import pipeline
>>> pipeline.extract(backbone="clip-b", dataset="folder", data_root="../shared/data/coco128",
...                  out="cache/clip-b", random_init=True)                      # doctest: +SKIP
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.config import flatten_keys, from_dict, set_key, to_dict
from pipeline.encode.families import create_encoder as _create_encoder
from pipeline.encode.config import ExtractConfig
from pipeline.errors import UserError


RANDOM_INIT_EVAL_NOTE = "note: scored on random-init features; numbers are a pipeline check, not a result"


def _tell(notes: list[str], *, quiet: bool) -> None:
    """The command line's notes (random-init features, skipped images), on stderr unless ``quiet``."""
    if not quiet:
        for line in notes:
            print(line, file=sys.stderr)


def create_encoder(name: str, *, vision: bool = True, text: bool = True, weights: str | Path | None = None,
                   random_init: bool = False, input_size: int | None = None, device: str = "cpu"):
    """The frozen towers of encoder ``name`` (``fusioner encoders`` lists them) with their normalisation.

    Returns an object with ``.vision`` (``encode(uint8 images [B, S, S, 3]) -> [B, h*w, D]``) and ``.text``
    (``encode_names(names) -> [C, D]``), either ``None`` where the encoder has no such tower.
    """
    return _create_encoder(name, vision=vision, text=text, weights=weights, random_init=random_init,
                           input_size=input_size, device=device)


def extract(*, backbone: str, out: str | Path, dataset: str | None = None, data_root: str | Path | None = None,
            split: str = "train", quiet: bool = False, **settings: Any) -> dict:
    """Stage one: write ``backbone``'s features of one dataset split (and its class-name embeddings) to ``out``.

    ``settings`` are the other fields of :class:`pipeline.encode.plan.ExtractConfig` (``views=4``,
    ``random_init=True``, ``text_only=True``, ``input_size=224``, ...). Resumable: calling it again
    finishes what a killed call left. Returns the extraction report as a dict.
    """
    data = {"backbone": backbone, "out": str(out), "dataset": dataset,
            "data_root": str(data_root) if data_root is not None else None, "split": split, **settings}
    config = from_dict(ExtractConfig, data)
    from pipeline.encode.extract import extract as run

    report = run(config=config, quiet=quiet)
    _tell(report.notes, quiet=quiet)
    return to_dict(report)


def _changes(config: Any) -> dict:
    """``config`` as the nested dict of changes it must be (None: no changes), else the one-line error."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"config must be a dict of changes such as {{'optim': {{'epochs': 20}}}}, "
                        f"got a {type(config).__name__}")
    return config


def build_model(*, vision_dim: int, text_dim: int, preset: str = "paper", config: dict | None = None):
    """The fusion transformer and decoder for features of ``vision_dim`` and text of ``text_dim`` channels.

    ``config`` changes fields of the preset's model config (``{"fusion": {"layers": 6}}``).
    """
    from pipeline.model import build_model as build, make_model_config

    return build(make_model_config(vision_dim=vision_dim, text_dim=text_dim, preset=preset,
                                   overrides=_changes(config)))


def train_config(*, cache: str | Path, out: str | Path, protocol: str = "pascal5i", fold: int = 0,
                 text_cache: str | Path | None = None, split: str | None = None, preset: str = "paper",
                 config: dict | None = None):
    """The :class:`pipeline.training.config.TrainConfig` that :func:`train` would use (nothing runs)."""
    from pipeline.training.config import TrainConfig, build_config

    base = {"data": {"cache": str(cache), "protocol": protocol, "fold": fold, "split": split,
                     "text_cache": str(text_cache) if text_cache is not None else None}, "out": str(out)}
    built = to_dict(build_config(preset=preset, base=base))
    for key, value in flatten_keys(_changes(config)).items():
        set_key(built, key, value, where="config")
    return from_dict(TrainConfig, built)


def train(*, cache: str | Path, out: str | Path, protocol: str = "pascal5i", fold: int = 0,
          text_cache: str | Path | None = None, split: str | None = None, preset: str = "paper",
          config: dict | None = None, resume: bool = False, quiet: bool = False) -> dict:
    """Stage two: train the fusion module and decoder on the seen classes of ``protocol`` fold ``fold``.

    ``cache`` is a vision store (with text for CLIP; else give ``text_cache``). ``config`` is a nested dict of
    training-config changes, e.g. ``{"optim": {"epochs": 20, "batch_size": 16}}``. Writes the run folder
    ``out`` (checkpoints, ``model.safetensors``, ``config.json``, metrics) and returns its summary.
    """
    from pipeline.runs import RANDOM_INIT_TRAIN_NOTE, train_and_validate

    settings = train_config(cache=cache, out=out, protocol=protocol, fold=fold, text_cache=text_cache, split=split,
                            preset=preset, config=config)
    summary = train_and_validate(config=settings, resume=resume, quiet=quiet)
    _tell([] if summary["pretrained_features"] else [RANDOM_INIT_TRAIN_NOTE], quiet=quiet)
    return summary


def evaluate(*, run: str | Path, split: str | None = None, splits_dir: str | Path | None = None,
             protocol: str | None = None, limit: int | None = None, min_pixels: int | None = None,
             device: str = "auto", quiet: bool = False) -> dict:
    """Score a trained run on the novel classes of its fold, by the paper's protocol.

    Returns ``miou``, ``fb_iou``, ``per_class`` IoU, episode counts and where the episodes came from
    (``splits_dir``'s standard lists, else derived from the cached masks: a novel class covering at least
    ``min_pixels`` pixels of an image, by default the OSLSM/PFENet small-object rule).
    """
    from pipeline.eval.evaluate import evaluate_split
    from pipeline.eval.report import eval_split_name
    from pipeline.runtime import resolve_device
    from pipeline.training.checkpoints import load_model

    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    dev = resolve_device(device)
    model, config = load_model(run, device=dev)
    result = evaluate_split(model=model, vision_cache=config.data.cache, text_cache=config.data.text_store,
                            split=eval_split_name(config.data.cache, split), protocol=protocol or config.data.protocol,
                            fold=config.data.fold, novel_names=config.data.novel,
                            splits_dir=str(splits_dir) if splits_dir else None, device=dev, limit=limit, quiet=quiet,
                            **({"min_pixels": min_pixels} if min_pixels is not None else {}))
    _tell([] if result["pretrained_features"] else [RANDOM_INIT_EVAL_NOTE], quiet=quiet)
    return {k: v for k, v in result.items() if k != "meter"}


def predict(*, image: str | Path, classes: list[str], run: str | Path, out: str | Path | None = None,
            device: str = "cpu", resize: bool = False, batch_size: int = 16, quiet: bool = False) -> dict:
    """Segment any photo into free-form ``classes`` with a trained run.

    Returns ``label_map`` ([H, W] uint8, uint16 beyond 255 classes: 0 background, j + 1 = ``classes[j]``),
    ``probabilities`` ([C, H, W]) and the per-class ``coverage``; with ``out``, also writes the masks, the
    label map and an overlay there. ``batch_size`` windows are encoded at once.
    """
    from pipeline.eval.predict import prediction_notes, predict as run_prediction

    if not isinstance(classes, (list, tuple)) or not classes:
        raise UserError(f"classes must be a non-empty list of names such as ['cat', 'sofa'], got {classes!r:.60}")
    odd = [c for c in classes if not isinstance(c, str)]
    if odd:
        raise UserError(f"classes must be strings, got {odd[0]!r} ({type(odd[0]).__name__})")
    result = run_prediction(image=image, classes=list(classes), checkpoint=run, out=out, device=device,
                            resize=resize, batch_size=batch_size, quiet=quiet)
    _tell(prediction_notes(pretrained=result["pretrained_features"]), quiet=quiet)
    return result


def run_study(*, study: str | Path, workers: int | None = None, dry_run: bool = False, retries: int = 2,
              quiet: bool = False, runs_per_gpu: int = 1) -> dict:
    """A whole study file (folds x encoder pairs x variants) on a local dask cluster, ending in its table.

    Finished runs are skipped, so calling it again resumes. Returns the plan, the Markdown table, counts and
    the failed runs; writes ``results.csv``, ``table.md``, ``table.csv`` and ``chart.png`` to the study's out.
    ``runs_per_gpu`` > 1 trains that many runs at once on each GPU where their estimated memory fits.
    """
    from pipeline.sweep.command import run_study as run

    result = run(study=Path(study), workers=workers, dry_run=dry_run, retries=retries, quiet=quiet,
                 runs_per_gpu=runs_per_gpu)
    return {"plan": result.plan, "table": result.table, "out": str(result.out) if result.out else None,
            "done": result.done, "total": result.total, "failed": list(result.failed)}


__all__ = ["create_encoder", "extract", "build_model", "train_config", "train", "evaluate", "predict", "run_study"]
