"""The cache-vs-online table: mIoU on seen and novel classes, training wall time and bytes of cache per variant.

Reads a finished ``cache-vs-online`` study (``fusioner sweep pipeline/studies/cache-vs-online.yaml``):
novel-class mIoU and training time come from each run's ``done.json``; seen-class mIoU is
scored here on the same evaluation split with the fold's seen classes held out as if novel
(episodes derived from the masks); the cache's bytes are the files of the training split in
the run's vision store (none for an online run).

    python -m pipeline.bench caching pipeline/studies/cache-vs-online.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import from_dict
from pipeline.data.protocols import create_protocol
from pipeline.errors import UserError, run_entry
from pipeline.eval.evaluate import evaluate_split
from pipeline.runtime import machine
from pipeline.sweep.study import expand_runs, load_study, read_marker
from pipeline.training.checkpoints import load_model
from pipeline.training.config import TrainConfig


def split_bytes(store: str | Path, split: str) -> int:
    """Bytes on disk of one split of a store (its features, masks and plan arrays)."""
    folder = Path(store) / split
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def seen_miou(*, run_dir: Path, config: TrainConfig, split: str) -> float:
    """mIoU over the fold's seen classes, each scored like a novel class (episodes from the masks)."""
    model, _ = load_model(run_dir, device="cpu")
    protocol = create_protocol(config.data.protocol)
    seen = [protocol.class_names[v - 1] for v in protocol.fold(config.data.fold).seen]
    result = evaluate_split(model=model, vision_cache=config.data.cache, text_cache=config.data.text_store,
                            split=split, protocol="custom", fold=0, novel_names=seen, device="cpu", quiet=True)
    return float(result["miou"])


def caching_rows(study_path: Path) -> list[dict]:
    study = load_study(path=study_path)
    rows = []
    for run in expand_runs(study, check_caches=False):
        done = read_marker(run.dir, "done.json")
        if done is None:
            raise UserError(f"{run.dir}: run '{run.pair}' is not finished; run the sweep first")
        config = from_dict(TrainConfig, run.config)
        online = config.data.online.enabled
        rows.append({"variant": run.pair, "novel": float(done["miou"]),
                     "seen": seen_miou(run_dir=run.dir, config=config, split=run.eval["split"]),
                     "train_seconds": float(done["train_seconds"]), "steps": _steps(run.dir),
                     "cache_bytes": 0 if online else split_bytes(config.data.cache, config.data.split)})
    return rows


def _steps(run_dir: Path) -> int:
    summary = read_marker(run_dir, "summary.json") or {}
    return int(summary.get("steps", 0))


def table(rows: list[dict]) -> str:
    lines = ["| variant | mIoU seen | mIoU novel | steps | train wall time (s) | cache of the training split |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        size = "none (encoder runs every step)" if not row["cache_bytes"] else f"{row['cache_bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {row['variant']} | {row['seen']:.1f} | {row['novel']:.1f} | {row['steps']} | "
                     f"{row['train_seconds']:.0f} | {size} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench caching", description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the cache-vs-online study file, after its sweep finished")
    args = parser.parse_args(argv)
    print(table(caching_rows(args.study)))
    print(f"\nmachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry(main))
