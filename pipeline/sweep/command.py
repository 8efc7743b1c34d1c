"""`fusioner sweep`: plan a study, run what is missing, write its tables."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import as_settings
from pipeline.errors import UserError, run_entry
from pipeline.sweep.caches import decoder_summary, describe_caches, needed
from pipeline.sweep.cluster import open_cluster
from pipeline.sweep.scheduler import run_all
from pipeline.sweep.study import Run, expand_runs, load_study, run_state


def describe_runs(runs: list[Run]) -> str:
    """What --dry-run prints: each run, whether it is done, and where it lives."""
    states = [run_state(run.dir) for run in runs]
    lines = [f"{len(runs)} runs: " + ", ".join(f"{states.count(s)} {s}" for s in ("done", "partial", "failed", "pending")
                                              if s in states)]
    lines += [f"{state:8s} {run.describe()}  {decoder_summary(run)}  {run.dir}  needs: "
              + ", ".join(f"{store} {split}" for store, split in needed(run)) for run, state in zip(runs, states)]
    return "\n".join(lines)


def sweep_command(*, study: Path, scheduler: str | None, slurm: bool, jobs: int, gpus_per_job: int,
                  workers: int | None, dry_run: bool, retries: int, quiet: bool, overrides: Mapping[str, Any],
                  estimate: bool = False, gpu: str = "h100", timings: Path | None = None,
                  runs_per_gpu: int = 1) -> int:
    """Run a whole study (folds x encoder pairs x variants x swept keys x seeds) and write the paper's table.

    Finished runs are skipped, so a killed sweep resumes by running the same command again; an
    interrupted run continues from its last checkpoint. Each run trains and evaluates in its own
    process; failed runs are retried ``--retries`` times, then listed with their error while the
    others finish. Writes results.csv, table.md, table.csv and chart.png into the study's out folder.
    Exit code 0 when every run is done, 1 when some failed, 2 on a bad study file.

    Examples:

      fusioner sweep pipeline/studies/table4.yaml                        # LocalCluster: one worker per GPU

      fusioner sweep pipeline/studies/table1.yaml --dry-run              # list runs, their folders and done state

      fusioner sweep pipeline/studies/table1.yaml --estimate --gpu h100  # GPU-hours before committing a cluster

      fusioner sweep pipeline/studies/tiny.yaml --workers 2 --set optim.max_steps=20

      fusioner sweep pipeline/studies/table7.yaml --runs-per-gpu 3           # up to 3 runs per GPU where they fit

      fusioner sweep pipeline/studies/table2.yaml --scheduler tcp://10.0.0.5:8786

      fusioner sweep pipeline/studies/table7.yaml --slurm --jobs 4 --gpus-per-job 2 --set study.slurm.walltime=08:00:00

    ``--set key=value`` changes the base training config (``optim.epochs=50``) or, as
    ``study.<section>.<key>=value``, the study file itself (``study.grid.seeds=[0,1,2]``,
    ``study.out=/scratch/t4``).
    """
    if estimate:
        print(estimate_command(study=study, gpu=gpu, timings=timings, overrides=overrides,
                               runs_per_gpu=runs_per_gpu))
        return 0
    result = run_study(study=study, scheduler=scheduler, slurm=slurm, jobs=jobs, gpus_per_job=gpus_per_job,
                       workers=workers, dry_run=dry_run, retries=retries, quiet=quiet, overrides=overrides,
                       runs_per_gpu=runs_per_gpu)
    if dry_run:
        print(result.plan)
        print(result.caches, file=sys.stderr)  # stdout stays one line per run, for scripts
        return 0
    if not quiet:
        print(result.table)
        print(f"{result.done} of {result.total} runs done, {len(result.failed)} failed; wrote {result.out}/results.csv, "
              f"table.md, table.csv, chart.png")
    for line in result.failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if result.failed else 0


def check_runs_per_gpu(runs_per_gpu) -> None:
    if isinstance(runs_per_gpu, bool) or not isinstance(runs_per_gpu, int) or runs_per_gpu < 1:
        raise UserError(f"--runs-per-gpu must be a whole number of at least 1, got {runs_per_gpu!r}")


def estimate_command(*, study: Path, gpu: str, timings: Path | None, overrides: Mapping[str, Any] | None,
                     runs_per_gpu: int = 1) -> str:
    """The ``--estimate`` table: runs x steps x seconds per step = GPU-hours, per preset (runs nothing)."""
    from pipeline.sweep.estimate import check_gpu, estimate_study, format_estimate

    check_runs_per_gpu(runs_per_gpu)
    check_gpu(gpu, timings_file=timings)  # a wrong --gpu or --timings first, before the study is read
    spec = load_study(path=Path(study), overrides=overrides or {})
    runs = expand_runs(spec, check_caches=False)  # pricing comes before extraction: no store needed
    return format_estimate(estimate_study(runs=runs, gpu=gpu, timings_file=timings, runs_per_gpu=runs_per_gpu),
                           study_name=spec.name)


@dataclass
class StudyResult:
    """What a study run returns: its plan, its table, and which runs failed."""

    plan: str  # one line per run: state, description, folder, the stores it reads
    caches: str = ""  # dry run: every store/split the runs need, present or missing, and how to make it
    table: str = ""  # the paper-layout table, Markdown
    out: Path | None = None  # where results.csv, table.md, table.csv and chart.png are
    done: int = 0
    total: int = 0
    failed: list[str] = field(default_factory=list)  # "<run>: <error>" for each failed run


def run_study(*, study: Path, scheduler: str | None = None, slurm: bool = False, jobs: int = 1,
              gpus_per_job: int = 1, workers: int | None = None, dry_run: bool = False, retries: int = 2,
              quiet: bool = True, overrides: Mapping[str, Any] | None = None, runs_per_gpu: int = 1) -> StudyResult:
    """Plan a study, run what is not done yet (unless ``dry_run``) and write its tables; prints nothing.

    ``runs_per_gpu`` > 1 lets each worker run that many runs at once where their estimated peak
    memory fits its device (:mod:`pipeline.sweep.packing`); a run that fits no device even alone is refused.
    """
    import os

    from pipeline.sweep.packing import MEMORY_VARIABLE, parse_memory, plan_memory, worker_devices
    from pipeline.sweep.tables import markdown, write_outputs

    if scheduler and slurm:
        raise UserError("--scheduler and --slurm exclude each other")
    if retries < 0 or jobs < 1 or gpus_per_job < 0 or (workers is not None and workers < 1):
        raise UserError("--retries and --gpus-per-job must be >= 0, --jobs and --workers >= 1")
    check_runs_per_gpu(runs_per_gpu)
    if runs_per_gpu > 1 and os.environ.get(MEMORY_VARIABLE):
        parse_memory(os.environ[MEMORY_VARIABLE])  # a bad figure fails here, not inside every worker
    spec = load_study(path=Path(study), overrides=overrides or {})
    runs = expand_runs(spec, check_caches=not dry_run)  # a dry run plans without any cache present
    if dry_run:
        return StudyResult(plan=describe_runs(runs), caches=describe_caches(runs))
    unique = {r.key: r for r in runs}
    todo = [run for run in unique.values() if run_state(run.dir) != "done"]
    errors: dict[str, str] = {}
    if todo:
        with open_cluster(study=spec, scheduler=scheduler, slurm=slurm, jobs=jobs, gpus_per_job=gpus_per_job,
                          workers=workers, quiet=quiet, runs_per_gpu=runs_per_gpu) as (client, threads, gpus):
            memory = None
            if runs_per_gpu > 1:  # before any run.json is written: a refusal leaves nothing behind
                memory = plan_memory(runs=todo, devices=worker_devices(client, gpus=gpus))
            errors = run_all(client=client, runs=runs, study_name=spec.name, retries=retries, threads=threads,
                             gpus=gpus, quiet=quiet, memory=memory)
    table = write_outputs(study=spec, runs=runs)
    return StudyResult(plan=describe_runs(runs), table=markdown(table, rows_name=" / ".join(spec.table.rows)),
                       out=spec.out, done=sum(run_state(r.dir) == "done" for r in unique.values()),
                       total=len(unique),
                       failed=[f"{r.describe()}: {errors[r.key]}" for r in unique.values() if r.key in errors])


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.sweep run DIR`` (one run, the per-run process) or ``study STUDY ...``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train and evaluate one prepared run directory")
    one.add_argument("run_dir", type=Path)
    one.add_argument("--threads", type=int, default=None)
    whole = commands.add_parser("study", help="what `fusioner sweep` runs")
    whole.add_argument("study", type=Path)
    whole.add_argument("--scheduler", default=None)
    whole.add_argument("--slurm", action="store_true")
    whole.add_argument("--jobs", type=int, default=1)
    whole.add_argument("--gpus-per-job", type=int, default=1)
    whole.add_argument("--workers", type=int, default=None)
    whole.add_argument("--dry-run", action="store_true")
    whole.add_argument("--estimate", action="store_true")
    whole.add_argument("--gpu", default="h100")
    whole.add_argument("--timings", type=Path, default=None)
    whole.add_argument("--retries", type=int, default=2)
    whole.add_argument("--runs-per-gpu", type=int, default=1)
    whole.add_argument("--quiet", "-q", action="store_true")
    whole.add_argument("--set", dest="overrides", action="append", default=[])
    return run_entry(lambda: _dispatch(parser.parse_args(argv)))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from pipeline.sweep.worker import main as run_main

        return run_main(["run", str(args.run_dir)] + (["--threads", str(args.threads)] if args.threads else []))
    return sweep_command(study=args.study, scheduler=args.scheduler, slurm=args.slurm, jobs=args.jobs,
                         gpus_per_job=args.gpus_per_job, workers=args.workers, dry_run=args.dry_run,
                         estimate=args.estimate, gpu=args.gpu, timings=args.timings, retries=args.retries,
                         quiet=args.quiet, overrides=as_settings(args.overrides), runs_per_gpu=args.runs_per_gpu)


if __name__ == "__main__":
    sys.exit(main())
