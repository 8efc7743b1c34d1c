"""``fusioner eval``: score trained runs and lay the numbers out like the paper's tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.data.protocols import SMALL_OBJECT_PIXELS
from pipeline.data.labels import TRAIN_SPLITS
from pipeline.config import write_json_atomic
from pipeline.errors import UserError
from pipeline.store.layout import open_store, store_attrs
from pipeline.store.splits import list_splits, resolve_split


# The released code scores the test episodes several times per epoch, keeps no checkpoint and reports the best.
PAPER_SELECTION_NOTE = ("The paper's figures are the best of many test-set evaluations (the released code scores the "
                        "test episodes several times per epoch and reports the best); these weights were not chosen "
                        "on the test set.")
SELECTION_WORDS = {"final": "final (the last step)",
                   "best-val": "best-val (best validation mIoU on a split disjoint from the test episodes)"}


def run_selection(run: str | Path) -> str:
    """Which weights a run reports: its summary.json ``selection`` rule, else its config's ``select``, else final."""
    import json

    run = Path(run)
    for name, pick in (("summary.json", lambda d: (d.get("selection") or {}).get("rule")),
                       ("config.json", lambda d: d.get("select"))):
        path = run / name
        if path.is_file():
            rule = pick(json.loads(path.read_text()))
            if rule:
                return str(rule)
    return "final"


def selection_note(rules) -> str:
    """One line saying which weights the scores come from, and how the paper's were chosen."""
    counts = {rule: list(rules).count(rule) for rule in dict.fromkeys(rules)}
    if len(counts) == 1:
        which = f"Weights: {SELECTION_WORDS.get(next(iter(counts)), next(iter(counts)))} for every run."
    else:
        which = "Weights: " + ", ".join(f"{SELECTION_WORDS.get(r, r)} for {n} runs" for r, n in counts.items()) + "."
    return f"{which} {PAPER_SELECTION_NOTE}"


def eval_split_name(cache: str, split: str | None) -> str:
    if split:
        return resolve_split(open_store(cache), split)
    names = [s for s in list_splits(open_store(cache)) if s.split("/")[-1] not in TRAIN_SPLITS]
    if len(names) != 1:
        raise UserError(f"{cache}: name the evaluation split with `split` (candidates: {', '.join(names) or 'none'})")
    return names[0]


def check_inputs(*, runs: list[Path], split: str | None, cache: Path | None, text_cache: Path | None) -> None:
    """Every run folder, store and split exists: checked before any model is built or encoder loaded."""
    from pipeline.store.layout import has_text

    for run in runs:
        saved = Path(run) / "config.json"
        if not saved.is_file():
            raise UserError(f"no trained model at {run} (expected model.safetensors and config.json)")
        try:
            data = json.loads(saved.read_text())["data"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{saved}: not a training config") from None
        vision = str(cache or data["cache"])
        text = str(text_cache or data.get("text_cache") or data["cache"])
        eval_split_name(vision, split)  # the store and its split
        if not has_text(open_store(text)):
            raise UserError(f"{text}: holds no class-name embeddings (extract it with --text-only, or pass the "
                            f"right `text_cache`)")


def run_label(config, *, vision_store: str | None = None, text_store: str | None = None) -> str:
    """'clip-l + clip-l, early' style label: the encoders of the stores scored (default: the run's)."""
    vision = store_attrs(open_store(vision_store or config.data.cache))["encoder"]
    text = store_attrs(open_store(text_store or config.data.text_store))["encoder"]
    model = config.model
    variant = model.fusion.mode + ("" if model.decoder.enabled else ", no decoder")
    return f"{vision} + {text}, {variant}"


def class_cell(name: str, iou: float | None, episodes: dict) -> str:
    """``cat 41.2`` or, for a class no episode scored, ``cat n/a (0 episodes)``, never 0.0."""
    if iou is None:
        return f"{name} n/a ({episodes.get(name, 0)} episodes)"
    return f"{name} {iou:.1f}" + (f" ({episodes[name]} ep.)" if name in episodes else "")


def markdown_table(*, rows: dict[str, dict[int, float]], fb: dict[str, float], title: str) -> str:
    folds = sorted({f for r in rows.values() for f in r})
    header = "| " + " | ".join(["model"] + [f"fold {f}" for f in folds] + ["mean", "FB-IoU"]) + " |"
    lines = [f"**{title}**", "", header, "|" + "---|" * (len(folds) + 3)]
    for label, by_fold in rows.items():
        cells = [f"{by_fold[f]:.1f}" if f in by_fold else "-" for f in folds]
        mean = sum(by_fold.values()) / len(by_fold)
        lines.append("| " + " | ".join([label] + cells + [f"{mean:.1f}", f"{fb[label]:.1f}"]) + " |")
    return "\n".join(lines)


def evaluate_runs(*, runs: list[Path], split: str | None, cache: Path | None, text_cache: Path | None,
                  protocol: str | None, splits_dir: Path | None, mode: str, limit: int | None,
                  out: Path | None, min_pixels: int = SMALL_OBJECT_PIXELS, device: str, quiet: bool,
                  allow_mismatch: tuple[str, ...] = ()) -> str:
    """Evaluate each run on its fold; write eval.json, per_class.csv and table.md; return the table.

    Stores that differ from what a run was trained on (:mod:`pipeline.eval.identity`) are refused
    unless the difference is named in ``allow_mismatch``; then eval.json and the table say so.
    """
    check_inputs(runs=runs, split=split, cache=cache, text_cache=text_cache)
    from pipeline.eval.evaluate import evaluate_split
    from pipeline.eval.identity import check_allow, check_stores
    from pipeline.runtime import resolve_device
    from pipeline.training.checkpoints import load_model

    dev = resolve_device(device)
    allow_mismatch = check_allow(allow_mismatch)
    results, rows, fb_rows = [], {}, {}
    pretrained = True
    for run in runs:
        model, config = load_model(run, device=dev)
        vision = str(cache or config.data.cache)
        text = str(text_cache or config.data.text_store)
        name = eval_split_name(vision, split)
        allowed = check_stores(run=run, config=config, vision_store=vision, text_store=text, split=name,
                               allow=allow_mismatch)
        proto = protocol or config.data.protocol
        result = evaluate_split(model=model, vision_cache=vision, text_cache=text, split=name, protocol=proto,
                                fold=config.data.fold, novel_names=config.data.novel,
                                splits_dir=str(splits_dir) if splits_dir else None, device=dev, mode=mode,
                                limit=limit, quiet=quiet, min_pixels=min_pixels)
        label = run_label(config, vision_store=vision, text_store=text)
        rows.setdefault(label, {})[config.data.fold] = result["miou"]
        fb_rows.setdefault(label, []).append(result["fb_iou"])
        pretrained &= bool(result["pretrained_features"])
        results.append({"run": str(run), "split": name, "protocol": proto, "fold": config.data.fold,
                        "label": label, "selection": run_selection(run), "mismatches_allowed": allowed,
                        **{k: v for k, v in result.items() if k != "meter"},
                        "meter": result["meter"]})
    fb = {k: sum(v) / len(v) for k, v in fb_rows.items()}
    title = f"{results[0]['protocol']} on {results[0]['split']} (mIoU %, {results[0]['episode_source']})"
    table = markdown_table(rows=rows, fb=fb, title=title)
    table += "\n\nepisodes: " + ", ".join(f"fold {r['fold']}: {r['episodes']}" for r in results)
    table += "\n\n_" + selection_note([r["selection"] for r in results]) + "_"
    if not pretrained:
        table += "\n\n_Features come from random-init encoders: a pipeline check, not a result._"
    scored_anyway = sorted({m for r in results for m in r["mismatches_allowed"]})
    if scored_anyway:
        table += "\n\n_Scored on stores that differ from the training ones (--allow-mismatch): " + \
            "; ".join(scored_anyway) + "._"
    target = Path(out or runs[0])
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "eval.json", results)
    with open(target / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "fold", "class", "iou", "episodes"])
        for r in results:
            for cls, iou in r["per_class"].items():
                writer.writerow([r["run"], r["fold"], cls, "n/a" if iou is None else f"{iou:.3f}",
                                 r.get("episodes_per_class", {}).get(cls, "")])
    (target / "table.md").write_text(table + "\n")
    per_class = "\n".join(f"  fold {r['fold']}: " + ", ".join(class_cell(c, v, r.get("episodes_per_class", {}))
                                                             for c, v in r["per_class"].items())
                          for r in results)
    return f"{table}\n\nper-class IoU:\n{per_class}\n\nwrote {target}/eval.json, per_class.csv, table.md"
