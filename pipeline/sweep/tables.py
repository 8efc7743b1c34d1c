"""A study's finished runs laid out like the paper: results.csv, table.md, table.csv, chart.png.

Rows are the study's row axes (encoder pair, variant, a swept key); columns are
the folds plus their mean (Tables 1, 2, 4, 7), the two metrics (Table 3) or
one more axis. Several seeds give mean +- standard deviation over seeds, the
fold mean being taken per seed first. A cell whose runs are not all done shows
a dash rather than a mean over fewer folds, so a half-finished study can never
be mistaken for a finished one; features from random-init encoders are said
under the table because such numbers check the pipeline and are not results.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.eval.report import selection_note
from pipeline.sweep.study import Run, Study, read_marker, run_state, value_label

METRIC_NAMES = {"miou": "mIoU", "fb_iou": "FB-IoU"}


@dataclass
class Table:
    title: str
    columns: list[str]
    cells: dict[str, dict[str, tuple[float, float] | None]]  # row -> column -> (mean, std over seeds)
    seeds: int
    notes: list[str] = field(default_factory=list)
    random_init: int = 0  # runs whose features came from random-init encoders


def axis_label(axis: str, run: Run) -> str:
    return run.pair if axis == "pair" else run.variant if axis == "variant" else value_label(axis, run.values[axis])


def row_label(study: Study, run: Run) -> str:
    return " / ".join(axis_label(axis, run) for axis in study.table.rows)


def _columns_of(study: Study, run: Run) -> list[tuple[str, str]]:
    """(column label, metric) pairs a run contributes to."""
    spec = study.table
    if spec.columns == "fold":
        return [(f"fold {run.fold}", spec.metric)]
    if spec.columns == "metric":
        return [(METRIC_NAMES[m], m) for m in METRIC_NAMES]
    return [(axis_label(spec.columns, run), spec.metric)]


def _aggregate(per_seed: list[float | None]) -> tuple[float, float] | None:
    if not per_seed or any(v is None for v in per_seed):
        return None
    return statistics.fmean(per_seed), (statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0)


def build_table(*, study: Study, runs: list[Run], results: dict[str, dict]) -> Table:
    """Cells from ``results`` (run key -> done.json); a missing run blanks its cells."""
    per: dict[tuple[str, str, int], list[float | None]] = {}
    rows: list[str] = []
    columns: list[str] = []
    for run in runs:
        row = row_label(study, run)
        rows += [row] if row not in rows else []
        result = results.get(run.key)
        for column, metric in _columns_of(study, run):
            columns += [column] if column not in columns else []
            per.setdefault((row, column, run.seed), []).append(None if result is None else result[metric])

    def seed_means(row: str, column: str) -> list[float | None]:
        return [None if None in per.get((row, column, s), [None]) else statistics.fmean(per[(row, column, s)])
                for s in study.seeds]

    cells = {row: {column: _aggregate(seed_means(row, column)) for column in columns} for row in rows}
    if study.table.columns == "fold":
        columns = [f"fold {f}" for f in study.folds]
        for row in rows:
            folds = [seed_means(row, column) for column in columns]
            per_seed = [None if any(f[i] is None for f in folds) else statistics.fmean(f[i] for f in folds)
                        for i in range(len(study.seeds))]
            cells[row]["mean"] = _aggregate(per_seed)
        columns.append("mean")
    done = [r for r in results.values() if r is not None]
    notes = []
    missing = sum(1 for run in runs if results.get(run.key) is None)
    if missing:
        notes.append(f"{missing} of {len(runs)} runs are not done (failed or not run): their cells show '–'.")
    random_init = sum(1 for r in done if not r.get("pretrained_features", True))
    if random_init:
        notes.append(f"Features of {random_init} of {len(done)} runs come from random-init encoders: "
                     f"these numbers check the pipeline, they are not results.")
    if done:
        notes.append(selection_note([r.get("selection", "final") for r in done]))
    metric = "mIoU / FB-IoU" if study.table.columns == "metric" else METRIC_NAMES[study.table.metric]
    seeds = f", mean ± std over {len(study.seeds)} seeds" if len(study.seeds) > 1 else ""
    title = f"{study.title} ({metric} %, eval {study.eval['split']}{seeds})"
    return Table(title=title, columns=columns, cells=cells, seeds=len(study.seeds), notes=notes,
                 random_init=random_init)


def _fmt(cell: tuple[float, float] | None, seeds: int) -> str:
    if cell is None:
        return "–"
    return f"{cell[0]:.1f} ± {cell[1]:.1f}" if seeds > 1 else f"{cell[0]:.1f}"


def markdown(table: Table, *, rows_name: str) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join([rows_name] + table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    for row, cells in table.cells.items():
        lines.append("| " + " | ".join([row] + [_fmt(cells.get(c), table.seeds) for c in table.columns]) + " |")
    lines += [""] + [f"_{note}_" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_table_csv(table: Table, *, rows_name: str, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = [rows_name]
        for column in table.columns:
            header += [column] + ([f"{column} std"] if table.seeds > 1 else [])
        writer.writerow(header)
        for row, cells in table.cells.items():
            line = [row]
            for column in table.columns:
                cell = cells.get(column)
                line += ["" if cell is None else f"{cell[0]:.2f}"]
                line += (["" if cell is None else f"{cell[1]:.2f}"] if table.seeds > 1 else [])
            writer.writerow(line)


def write_results_csv(*, study: Study, runs: list[Run], path: Path) -> dict[str, dict]:
    """One row per grid point, with its state and metrics; returns run key -> done record."""
    results: dict[str, dict] = {}
    keys = list(study.values)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "pair", "variant", "fold", "seed", *keys, "status", "miou", "fb_iou", "episodes",
                         "pretrained_features", "selection", "error", "dir"])
        for run in runs:
            done = read_marker(run.dir, "done.json")
            failed = read_marker(run.dir, "failed.json") if done is None else None
            results[run.key] = done
            metrics = ([f"{done['miou']:.4f}", f"{done['fb_iou']:.4f}", done["episodes"], done["pretrained_features"],
                        done.get("selection", "final")] if done else ["", "", "", "", ""])
            writer.writerow([run.key, run.pair, run.variant, run.fold, run.seed, *[run.values[k] for k in keys],
                             run_state(run.dir), *metrics, (failed or {}).get("error", ""), str(run.dir)])
    return results


def write_outputs(*, study: Study, runs: list[Run]) -> Table:
    """results.csv, table.md, table.csv and chart.png under the study's out folder."""
    from pipeline.plots import bar_chart

    study.out.mkdir(parents=True, exist_ok=True)
    results = write_results_csv(study=study, runs=runs, path=study.out / "results.csv")
    table = build_table(study=study, runs=runs, results=results)
    rows_name = " / ".join(study.table.rows)
    (study.out / "table.md").write_text(markdown(table, rows_name=rows_name))
    write_table_csv(table, rows_name=rows_name, path=study.out / "table.csv")
    column = "mean" if "mean" in table.columns else None
    bars, errors = {}, {}
    for row, cells in table.cells.items():
        for name in ([column] if column else table.columns):
            cell = cells.get(name)
            if cell is not None:
                label = row if column or len(table.columns) == 1 else f"{row} / {name}"
                bars[label], errors[label] = cell
    (study.out / "chart.png").unlink(missing_ok=True)
    if bars:
        bar_chart(rows=bars, errors=errors if table.seeds > 1 else None, out=study.out / "chart.png",
                  title=study.title, ylabel=f"{METRIC_NAMES[study.table.metric]} (%)", seeds=table.seeds,
                  caveat=table.random_init > 0)
    return table
