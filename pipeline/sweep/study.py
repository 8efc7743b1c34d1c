"""Study files: a whole experiment grid as data, expanded into runs, gathered into the paper's tables.

A study names its caches (one vision/text store pair per row of Table 1), the
evaluation, a ``base`` training config and a grid (folds x pairs x variants x
any dotted config key x seeds). Every run's directory is the hash of its
resolved training config and evaluation settings, so the same run is never
trained twice, a renamed label reuses finished work, and a changed setting
gets a fresh directory. Loading is strict: an unknown key, a missing cache or
a split the cache lacks is a one-line :class:`UserError` before anything runs.
Execution lives in :mod:`pipeline.sweep`; this module never starts a process.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

from pipeline.config import as_settings, config_hash, flatten_keys, from_dict, get_key, load_file, set_key, to_dict
from pipeline.errors import UserError
from pipeline.sweep.catalog import find_study
from pipeline.eval.config import EvalConfig

SECTIONS = ("name", "title", "out", "runs", "pairs", "eval", "base", "grid", "derived", "table", "slurm")
STATES = ("done", "failed", "partial", "pending")


@dataclass
class TableSpec:
    rows: list[str] = field(default_factory=list)  # axes naming a row: pair, variant, dotted keys
    columns: str = "fold"  # fold (folds + mean), metric (mIoU, FB-IoU), or one axis
    metric: Literal["miou", "fb_iou"] = "miou"


@dataclass
class SlurmSpec:
    """What ``--slurm`` asks of the batch system; lifetimes are derived from the walltime."""

    walltime: str = "04:00:00"
    queue: str | None = None
    account: str | None = None
    cores_per_gpu: int = 8
    memory_per_gpu: str = "32GB"
    lifetime_margin: str = "15m"  # workers retire this long before the walltime kills them
    lifetime_stagger: str = "5m"  # so a job's workers do not all retire at once
    job_extra: list[str] = field(default_factory=list)  # more #SBATCH lines
    setup: list[str] = field(default_factory=list)  # shell lines before the worker starts


@dataclass(frozen=True)
class Pair:
    label: str
    vision: str
    text: str
    overrides: tuple = ()  # (dotted key, value) pairs


@dataclass
class Study:
    name: str
    title: str
    path: Path
    out: Path  # results.csv, table.md, table.csv, chart.png
    runs: Path  # run directories (default out/runs; studies may share one, so a run common to two tables trains once)
    pairs: list[Pair]
    eval: dict
    base: dict  # resolved TrainConfig as a dict
    folds: list[int]
    seeds: list[int]
    variants: dict[str, dict]
    values: dict[str, list]  # dotted key -> the values it takes
    derived: dict[str, tuple[str, str, int]]
    table: TableSpec
    slurm: SlurmSpec


@dataclass
class Run:
    key: str
    dir: Path
    pair: str
    variant: str
    fold: int
    seed: int
    values: dict
    config: dict
    eval: dict

    def describe(self) -> str:
        extra = "".join(f" {k.split('.')[-1]}={v}" for k, v in self.values.items())
        return f"{self.pair} | {self.variant} | fold {self.fold} | seed {self.seed}{extra}"


def _split_overrides(mapping, *, where: str) -> tuple[dict, dict]:
    """A variant's override set -> (training keys, eval keys)."""
    if mapping is None:
        return {}, {}
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of dotted keys, got {mapping!r}")
    flat = flatten_keys(mapping)
    if "preset" in flat:
        raise UserError(f"{where}: 'preset' belongs in base (a preset sets many model keys at once)")
    train = {k: v for k, v in flat.items() if not k.startswith("eval.")}
    evals = {k[5:]: v for k, v in flat.items() if k.startswith("eval.")}
    return train, evals


def _apply_study_overrides(raw: dict, sets: dict, path: Path) -> None:
    """``study.<section>[.<key>]=value`` changes the study file itself (e.g. study.grid.seeds=[0,1])."""
    for key, value in sets.items():
        section, _, rest = key[len("study."):].partition(".")
        if section not in SECTIONS:
            raise UserError(f"`overrides` {key}: unknown study section '{section}' (known: {', '.join(SECTIONS)})")
        if not rest:
            raw[section] = value
        elif section == "base":
            raw["base"] = {**flatten_keys(raw.get("base") or {}), rest: value}
        elif section == "grid" and rest.startswith("variants."):  # study.grid.variants.late={...}
            grid = raw.setdefault("grid", {})
            grid["variants"] = {**(grid.get("variants") or {}), rest[len("variants."):]: value}
        else:
            if not isinstance(raw.get(section, {}), dict):
                raise UserError(f"`overrides` {key}: study section '{section}' is not a mapping")
            raw.setdefault(section, {})[rest] = value


def _ints(value, *, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: expected a non-empty list of integers, got {value!r}")
    return list(value)


def _resolve_path(text, *, where: str) -> str:
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}: expected a path, got {text!r}")
    return str(Path(text).expanduser().resolve())


def _pairs(raw, path: Path) -> list[Pair]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{path}: 'pairs' must be a non-empty list of {{vision, text, label}} mappings")
    pairs = []
    for i, item in enumerate(raw):
        where = f"{path}: pairs[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping with vision, text, label")
        unknown = sorted(set(item) - {"vision", "text", "label", "set"})
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (known: label, set, text, vision)")
        vision = _resolve_path(item.get("vision"), where=f"{where}.vision")
        text = _resolve_path(item.get("text") or item.get("vision"), where=f"{where}.text")
        label = str(item.get("label") or f"{Path(vision).name} + {Path(text).name}")
        train, evals = _split_overrides(item.get("set"), where=f"{where}.set")
        pairs.append(Pair(label=label, vision=vision, text=text,
                          overrides=tuple(train.items()) + tuple((f"eval.{k}", v) for k, v in evals.items())))
    labels = [p.label for p in pairs]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UserError(f"{path}: two pairs share the label '{twice}'")
    return pairs


_DERIVED = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*([*/])\s*(\d+)\s*$")


def _derived(raw, path: Path) -> dict[str, tuple[str, str, int]]:
    """``model.fusion.heads: model.fusion.width / 64`` keeps a key tied to another (Table 7)."""
    out = {}
    for key, text in (raw or {}).items():
        match = _DERIVED.match(str(text))
        if not match or int(match.group(3)) == 0:
            raise UserError(f"{path}: derived '{key}': expected '<dotted key> / N' or '<dotted key> * N', got {text!r}")
        out[key] = (match.group(1), match.group(2), int(match.group(3)))
    return out


def load_study(*, path: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Study:
    """Read and check a study file (a path, or the name of a shipped study); ``overrides`` are ``--set`` settings (study.* or TrainConfig keys),
    a mapping of dotted keys to typed values (``key=value`` strings are parsed)."""
    from pipeline.training.config import build_config

    path = find_study(path)
    raw = load_file(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown study key '{unknown[0]}' (known: {', '.join(SECTIONS)})")
    settings = {key.strip(): value for key, value in as_settings(overrides).items()}
    _apply_study_overrides(raw, {k: v for k, v in settings.items() if k.startswith("study.")}, path)
    train_sets = {k: v for k, v in settings.items() if not k.startswith("study.")}
    name = str(raw.get("name") or path.stem)
    grid = dict(raw.get("grid") or {})
    base_flat = flatten_keys(raw.get("base") or {})
    preset = base_flat.pop("preset", None)
    nested: dict = {}
    for key, value in base_flat.items():  # dotted -> nested for build_config's merge
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        base = to_dict(build_config(base=nested, preset=preset, overrides=train_sets))
        evals = to_dict(from_dict(EvalConfig, raw.get("eval") or {}, prefix="eval."))
        table = from_dict(TableSpec, raw.get("table") or {}, prefix="table.")
        slurm = from_dict(SlurmSpec, raw.get("slurm") or {}, prefix="slurm.")
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if not evals["split"]:
        raise UserError(f"{path}: eval.split is required (the evaluation split of the vision store, e.g. voc/val)")
    folds = _ints(grid.pop("folds", [base["data"]["fold"]]), where=f"{path}: grid.folds")
    seeds = _ints(grid.pop("seeds", [base["seed"]]), where=f"{path}: grid.seeds")
    variants = grid.pop("variants", None) or {"default": {}}
    if not isinstance(variants, dict):
        raise UserError(f"{path}: grid.variants must map names to override sets")
    for key, values in grid.items():
        if "." not in key:
            raise UserError(f"{path}: unknown grid key '{key}' (known: folds, seeds, variants, or a dotted config key)")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key} must be a non-empty list of values")
    out = Path(_resolve_path(raw.get("out") or f"sweeps/{name}", where=f"{path}: out"))
    study = Study(name=name, title=str(raw.get("title") or name), path=path, out=out,
                  runs=Path(_resolve_path(raw["runs"], where=f"{path}: runs")) if raw.get("runs") else out / "runs",
                  pairs=_pairs(raw.get("pairs"), path), eval=evals, base=base, folds=folds, seeds=seeds,
                  variants={str(k): v for k, v in variants.items()}, values=dict(grid),
                  derived=_derived(raw.get("derived"), path), table=table, slurm=slurm)
    _check_table(study)
    return study


def axes(study: Study) -> dict[str, list[str]]:
    """Row/column axes and their labels in grid order (fold and seed are averaged unless columns)."""
    out = {"pair": [p.label for p in study.pairs], "variant": list(study.variants)}
    out.update({k: [value_label(k, v) for v in vals] for k, vals in study.values.items()})
    return out


def value_label(key: str, value) -> str:
    return f"{key.split('.')[-1]}={json.dumps(value) if not isinstance(value, str) else value}"


def _check_table(study: Study) -> None:
    spec, known = study.table, axes(study)
    rows = spec.rows or [a for a, labels in known.items() if len(labels) > 1 and a != spec.columns] or ["pair"]
    for axis in rows:
        if axis not in known:
            raise UserError(f"{study.path}: table.rows: unknown axis '{axis}' (known: {', '.join(known)})")
    if spec.columns not in ("fold", "metric") and (spec.columns not in known or spec.columns in rows):
        raise UserError(f"{study.path}: table.columns must be fold, metric or an axis not in rows, got '{spec.columns}'")
    loose = [a for a, labels in known.items() if len(labels) > 1 and a not in rows and a != spec.columns]
    if loose:
        raise UserError(f"{study.path}: axis '{loose[0]}' has several values but is neither in table.rows nor "
                        f"table.columns")
    spec.rows = rows


def _derive(config: dict, derived: dict, *, where: str) -> None:
    for key, (source, op, number) in derived.items():
        try:
            value = get_key(config, source)
        except (KeyError, TypeError):
            raise UserError(f"{where}: derived '{key}': unknown config key '{source}'") from None
        if op == "*":
            set_key(config, key, value * number, where=where)
        elif value % number:
            raise UserError(f"{where}: derived '{key}': {source} = {value} is not divisible by {number}")
        else:
            set_key(config, key, value // number, where=where)


# Training keys that only add output beside a run (not what it trains or scores): left out of the run's
# hash, so turning them on neither moves the run's folder nor re-runs a finished study.
LOGGING_KEYS = ("tensorboard",)


def _check_fold(data: dict, *, where: str) -> None:
    """A fold the protocol lacks fails at planning (and ``--dry-run``), not on a worker."""
    from pipeline.data.protocols import check_fold, protocol_entry

    try:
        entry = protocol_entry(data["protocol"])
        if not entry.named_novel:  # custom protocols: the folds come from the user's class names
            check_fold(data["protocol"], data["fold"])
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def expand_runs(study: Study, *, check_caches: bool = True) -> list[Run]:
    """Every (pair, variant, values, fold, seed) of the grid as a resolved, hashed run."""
    from pipeline.training.config import TrainConfig

    runs = []
    keys = list(study.values)
    for pair, (variant, overrides), combo, fold, seed in product(
            study.pairs, study.variants.items(), product(*study.values.values()), study.folds, study.seeds):
        values = dict(zip(keys, combo))
        where = f"{study.path}: run {pair.label} | {variant} | fold {fold} | seed {seed}"
        config = copy.deepcopy(study.base)
        config["data"]["cache"], config["data"]["text_cache"] = pair.vision, pair.text
        config["data"]["fold"], config["seed"] = fold, seed
        variant_train, variant_eval = _split_overrides(overrides, where=f"{study.path}: variant '{variant}'")
        pair_train, pair_eval = _split_overrides(dict(pair.overrides), where=where)
        value_train, value_eval = _split_overrides(values, where=where)
        for key, value in [*pair_train.items(), *variant_train.items(), *value_train.items()]:
            set_key(config, key, value, where=where)
        evals = {**study.eval, **pair_eval, **variant_eval, **value_eval}
        _derive(config, study.derived, where=where)
        config["out"] = ""
        try:
            config = to_dict(from_dict(TrainConfig, config))
            evals = to_dict(from_dict(EvalConfig, evals, prefix="eval."))
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        _check_fold(config["data"], where=where)
        if evals["splits_dir"]:
            evals["splits_dir"] = _resolve_path(evals["splits_dir"], where=f"{where}: eval.splits_dir")
        key = config_hash({"train": {k: v for k, v in config.items() if k not in LOGGING_KEYS}, "eval": evals})
        run_dir = study.runs / key
        config["out"] = str(run_dir)
        runs.append(Run(key=key, dir=run_dir, pair=pair.label, variant=variant, fold=fold, seed=seed,
                        values=values, config=config, eval=evals))
    if check_caches:
        check_caches_exist(runs, study=study)
    return runs


def check_caches_exist(runs: list[Run], *, study: Study) -> None:
    """Missing stores and splits fail here, in one line, not hours later on a worker."""
    from pipeline.store.layout import has_text, open_store
    from pipeline.store.splits import list_splits, match_split

    splits: dict[str, list[str]] = {}
    for run in runs:
        data = run.config["data"]
        for path, wanted in ((data["cache"], [data["split"], run.eval["split"]]), (data["text_cache"], [])):
            if path not in splits:
                try:
                    root = open_store(path)
                except UserError as err:
                    raise UserError(f"{study.path}: pair '{run.pair}': {err}") from None
                splits[path] = list_splits(root) + (["text"] if has_text(root) else [])
            for split in filter(None, wanted):
                if match_split(splits[path], split) is None:
                    raise UserError(f"{study.path}: pair '{run.pair}': {path} has no split '{split}' "
                                    f"(it has: {', '.join(splits[path]) or 'none'})")
        if "text" not in splits[data["text_cache"]]:
            raise UserError(f"{study.path}: pair '{run.pair}': {data['text_cache']} holds no class-name embeddings")


def run_state(run_dir: Path) -> str:
    """done (done.json), failed (failed.json), partial (checkpoints, no marker) or pending."""
    if (run_dir / "done.json").is_file():
        return "done"
    if (run_dir / "failed.json").is_file():
        return "failed"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "partial"
    return "pending"


def read_marker(run_dir: Path, name: str) -> dict | None:
    try:
        return json.loads((run_dir / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
