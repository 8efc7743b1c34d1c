"""Sweeps: a killed study resumes to the same table, failures stay local, joined and SLURM clusters, checks.

Every sweep here is real: a dask LocalCluster of 2 worker processes (or a
`dask scheduler` + `dask worker` pair), one Python process per run, training
the tiny preset on caches extracted from a small generated dataset (random-init
test-vit vision and test-text text towers), so nothing depends on ../shared.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
import yaml
from distributed import Client
from helpers import run_sweep, wait_for_run_processes_to_end
from PIL import Image

from pipeline.bench.sweep import demo_study
from pipeline.errors import UserError
from pipeline.eval.report import selection_note
from pipeline.plots import CAVEAT_KEY, NOTES_KEY, RANDOM_INIT_CAVEAT
from pipeline.sweep.caches import decoder_summary
from pipeline.sweep.calm import CALM, calm_environ
from pipeline.sweep.study import SlurmSpec, expand_runs, load_study
from pipeline.sweep.tables import build_table
from pipeline.sweep.worker import pick_gpu, worker_slot

pytestmark = pytest.mark.processes  # sweeps start dask clusters and run processes

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"full": {}, "no-decoder": {"model.decoder.enabled": False}}


def _calm_probe():
    """What a worker's dask config holds for CALM's keys (a closure: pickled whole, for any worker's path)."""
    def settings() -> dict:
        return {key: dask.config.get(key) for key in CALM}

    return settings


calm_settings = _calm_probe()


def write_study(path: Path, caches, **changes) -> Path:
    vision, text = caches
    settings = {"folds": [0, 1], "seeds": [0], "steps": 12, "variants": VARIANTS, "checkpoint_every": 2, **changes}
    study = demo_study(vision=vision, text=text, out=path.with_suffix(""), **settings)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def sweep(study: Path, **options) -> int:
    return run_sweep(study, **{"workers": 2, "retries": 1, **options})


def starts(run_dir: Path) -> int:
    """How many times a process began this run (each writes one line)."""
    return len((run_dir / "attempts.log").read_text().splitlines())


def _partial(out: Path) -> list[Path]:
    return [p.parents[1] for p in out.glob("runs/*/checkpoints/latest") if not (p.parents[1] / "done.json").exists()]


@pytest.fixture(scope="module")
def reference(caches, tmp_path_factory) -> Path:
    """The 4-run study (2 folds x 2 variants) swept once, uninterrupted.

    Same worker count as the killed sweep: torch's CPU results depend on its thread count (cores // workers).
    """
    study = write_study(tmp_path_factory.mktemp("reference") / "ref.yaml", caches)
    assert sweep(study) == 0
    return study


@pytest.mark.reliability
def test_killed_sweep_reruns_only_the_missing_runs_and_gives_the_same_table(caches, reference, tmp_path):
    """Killed with one run frozen right after its step-4 checkpoint (a fault hook), two runs done.

    The frozen run cannot notice anything itself: only the kernel's parent-death signal ends it,
    so the run locks all come free only if the killed sweep's processes die with it.
    """
    study = write_study(tmp_path / "killed.yaml", caches)
    out = study.with_suffix("")
    claim = tmp_path / "frozen-run"
    here = str(Path(__file__).parent)
    env = {**os.environ, "FUSIONER_FREEZE_AT": f"4:{claim}", "FUSIONER_HOOKS": "freeze_hook:FreezeAfterStep",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", "study", str(study), "--workers", "2", "-q"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while len(list(out.glob("runs/*/done.json"))) < 2 or not (claim.exists() and claim.read_text().endswith("\n")):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before the moment to kill it"
        time.sleep(0.02)
    frozen = Path(claim.read_text().split()[1]).resolve()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_run_processes_to_end(out, time.monotonic() + 60)
    first = {p.parent: p.stat().st_mtime_ns for p in out.glob("runs/*/done.json")}
    partial = _partial(out)
    assert 2 <= len(first) < 4 and frozen in [p.resolve() for p in partial] and not (out / "table.csv").exists()

    assert sweep(study) == 0
    for run_dir, mtime in first.items():  # finished before the kill: not run again
        assert (run_dir / "done.json").stat().st_mtime_ns == mtime and starts(run_dir) == 1
    runs = sorted(out.glob("runs/*"))
    assert len(runs) == 4 and all((r / "done.json").is_file() for r in runs)
    for run_dir in partial:  # interrupted part-way: continued from its checkpoint, to the same numbers
        assert json.loads((run_dir / "done.json").read_text())["resumed"] and starts(run_dir) == 2
    ref_out = reference.with_suffix("")
    assert (out / "table.csv").read_text() == (ref_out / "table.csv").read_text()
    assert (out / "table.md").read_text() == (ref_out / "table.md").read_text()
    table = (out / "table.csv").read_text().splitlines()
    assert table[0] == "variant,fold 0,fold 1,mean" and len(table) == 3 and ",," not in "".join(table)
    assert "random-init" in (out / "table.md").read_text()
    assert "Weights: final (the last step) for every run" in (out / "table.md").read_text()
    assert {json.loads((r / "done.json").read_text())["selection"] for r in runs} == {"final"}
    chart = Image.open(out / "chart.png").text
    assert chart[CAVEAT_KEY] == RANDOM_INIT_CAVEAT and "no error bars: one seed per bar" in chart[NOTES_KEY]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",done," in r and ",final," in r for r in rows[1:]) and "selection" in rows[0]


@pytest.mark.reliability
def test_failed_runs_are_retried_reported_and_do_not_stop_the_others(caches, tmp_path, capsys):
    # log_every 0 crashes inside the run (step % 0); optim.batch_size 0, the crash used before, is now
    # refused when the study is planned (issue 14 item 6).
    variants = {"ok": {}, "crash": {"log_every": 0}, "bad-heads": {"model.fusion.heads": 3}}
    study = write_study(tmp_path / "failing.yaml", caches, folds=[0], variants=variants)
    assert sweep(study, retries=1, workers=1) == 1
    runs = {r.variant: r for r in expand_runs(load_study(path=study))}
    assert (runs["ok"].dir / "done.json").is_file()
    crash = json.loads((runs["crash"].dir / "failed.json").read_text())
    assert crash["attempts"] == 2 and "ZeroDivisionError" in crash["error"]  # a crash is retried
    bad = json.loads((runs["bad-heads"].dir / "failed.json").read_text())
    assert bad["attempts"] == 1 and "not divisible by fusion.heads 3" in bad["error"]  # a user error is not
    err = capsys.readouterr().err
    assert "failed: " in err and "ZeroDivisionError" in err and "fusion.heads" in err
    csv = (study.with_suffix("") / "results.csv").read_text()
    assert csv.count(",failed,") == 2 and csv.count(",done,") == 1
    assert "–" in (study.with_suffix("") / "table.md").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sweep_joins_an_existing_scheduler(caches, tmp_path):
    dask_cli = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    calm = {**os.environ, **calm_environ()}  # started by hand as docs/sweeps.md shows, calm settings included
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=calm)]
    try:
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard", "--name", "test-0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=calm))
        # One Mosaic-4-style run (all of an image's classes at once), tabled by metric.
        study = write_study(tmp_path / "joined.yaml", caches, folds=[1], variants={"all": {"eval.mode": "multiclass"}})
        spec = yaml.safe_load(study.read_text())
        study.write_text(yaml.safe_dump({**spec, "table": {"columns": "metric"}}))
        assert sweep(study, scheduler=address, workers=None) == 0
        with Client(address, timeout="30s") as client:
            assert list(client.run(calm_settings).values()) == [CALM]
        (run,) = expand_runs(load_study(path=study))
        assert run.eval["mode"] == "multiclass" and json.loads((run.dir / "done.json").read_text())["episodes"] > 0
        assert (study.with_suffix("") / "table.csv").read_text().splitlines()[0] == "pair,mIoU,FB-IoU"
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def test_the_export_lines_of_the_docs_are_the_calm_settings():
    """docs/sweeps.md spells out calm_environ() for workers started by hand: it follows CALM."""
    exported = {}
    for line in (ROOT / "docs" / "sweeps.md").read_text().splitlines():
        if line.startswith("export DASK_"):
            exported.update(word.split("=", 1) for word in line.split()[1:])
    assert exported == calm_environ()


def test_slurm_job_script_has_walltime_lifetimes_gpus_and_the_worker_command(tmp_path):
    from pipeline.sweep.slurm import slurm_cluster, walltime_seconds

    assert [walltime_seconds(t) for t in ("90", "01:30", "02:00:00", "1-02", "1-00:30:00")] == \
        [5400, 90, 7200, 93600, 88200]
    spec = SlurmSpec(walltime="02:00:00", queue="gpu", account="vision", cores_per_gpu=6, memory_per_gpu="20GB",
                     lifetime_margin="10m", lifetime_stagger="4m", setup=["module load cuda"])
    cluster = slurm_cluster(spec=spec, gpus_per_job=2, log_dir=tmp_path / "logs")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -t 02:00:00" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH -p gpu" in script and "#SBATCH -A vision" in script and "--cpus-per-task=12" in script
    assert "--lifetime 6360s" in script and "--lifetime-stagger 240s" in script and "--lifetime-restart" in script
    assert "--nworkers 2" in script and "--nthreads 1" in script and "module load cuda" in script
    assert sys.executable in script and "distributed.cli.dask_worker" in script
    # The workers start on other machines, with their own dask config: the job exports the calm settings
    # before the study's setup lines (which may override them), and dask reads them back as CALM.
    exports = dict(line.removeprefix("export ").split("=", 1) for line in script.splitlines()
                   if line.startswith("export DASK_"))
    assert script.index("export DASK_") < script.index("module load cuda")
    read_back = dask.config.collect_env(exports)
    assert {key: dask.config.get(key, config=read_back) for key in CALM} == CALM
    with pytest.raises(UserError, match="leaves no time"):
        slurm_cluster(spec=SlurmSpec(walltime="00:10:00"), gpus_per_job=1, log_dir=tmp_path)


def test_dry_run_lists_runs_with_their_state_and_writes_nothing(reference, capsys):
    out = reference.with_suffix("")
    before = sorted(str(p) for p in out.rglob("*"))
    assert sweep(reference, dry_run=True, overrides=["study.grid.seeds=[0, 1]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "8 runs: 4 done, 4 pending"
    assert sum(line.startswith("done ") for line in lines) == 4 and all(str(out / "runs") in l for l in lines[1:])
    assert any("| no-decoder | fold 1 | seed 1" in line for line in lines if line.startswith("pending"))
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_estimate_prices_runs_times_steps_times_seconds_per_step(reference, capsys, tmp_path):
    from pipeline.model import make_model_config
    from pipeline.store.layout import open_store, store_attrs
    from pipeline.sweep.estimate import training_rate
    from pipeline.training.flops import training_flops_per_sample

    assert sweep(reference, estimate=True, gpu="a100", overrides=["study.grid.seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| TEST-VIT (random) + TEST-TEXT (random) | full |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "4 (2)" and int(cells[5].replace(",", "")) == 4 * 12  # 4 runs of max_steps 12
    assert cells[8].startswith("store ")  # counted in the stores, which exist here
    spec = load_study(path=reference, overrides=[])
    data = expand_runs(spec)[0].config
    store = store_attrs(open_store(data["data"]["cache"]))
    text_dim = store_attrs(open_store(data["data"]["text_cache"]))["text_dim"]
    model = make_model_config(vision_dim=store["vision_dim"], text_dim=text_dim, preset="tiny")
    model.decoder.out_size = store["input_size"]
    flops = training_flops_per_sample(model, grid=tuple(store["grid"]), classes=1)
    assert float(cells[4]) == pytest.approx(flops / 1e9, abs=0.01)
    per_step = flops * 8 / training_rate(gpu="a100", timings=None).per_second
    assert float(cells[6]) == pytest.approx(per_step, abs=1e-4) and "projected" in out
    no_decoder = next(line for line in out.splitlines() if "| no-decoder |" in line)
    assert float(no_decoder.split("|")[5]) < float(cells[4])  # the row without decoder costs less
    timings = tmp_path / "gpu.json"
    timings.write_text('{"preset": "tiny", "batch_size": 8, "steps_per_s": 4.0, "machine": "H100 test"}\n')
    assert sweep(reference, estimate=True, gpu="h100", timings=timings) == 0
    out = capsys.readouterr().out
    assert "measured by bench gpu on H100 test" in out and "total: 0.0 GPU-hours" in out
    with pytest.raises(UserError, match="recorded figures exist for"):
        sweep(reference, estimate=True, gpu="tpu")


@pytest.mark.parametrize(("change", "message"), [
    ({"grid_extra": {"colours": [1]}}, "unknown grid key 'colours'"),
    ({"top": {"budget": 3}}, "unknown study key 'budget'"),
    ({"variants": {"x": {"model.fusion.colour": 1}}}, "unknown config key 'model.fusion.colour'"),
    ({"eval": {"split": "folder/val", "episodes": 3}}, "unknown config key 'eval.episodes'"),
    ({"vision": "/nonexistent/cache"}, "no feature store at /nonexistent/cache"),
    ({"eval": {"split": "voc/val"}}, "has no split 'voc/val'"),
    ({"table": {"rows": ["pair"]}}, "axis 'variant' has several values"),
])
@pytest.mark.reliability
def test_study_mistakes_are_one_line_user_errors(caches, tmp_path, change, message):
    study = yaml.safe_load(write_study(tmp_path / "s.yaml", caches).read_text())
    study["grid"].update(change.get("grid_extra", {}))
    study.update(change.get("top", {}))
    study["grid"]["variants"] = change.get("variants", study["grid"]["variants"])
    study["eval"] = change.get("eval", study["eval"])
    study["pairs"][0]["vision"] = change.get("vision", study["pairs"][0]["vision"])
    study.update({"table": change["table"]} if "table" in change else {})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(UserError) as err:
        # A dry run plans without caches (it lists the missing ones); a real run checks them first.
        missing_cache = "vision" in change or change.get("eval", {}).get("split") == "voc/val"
        sweep(path, dry_run=not missing_cache)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_study_from_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("eval: {split: voc/val}\npairs: []\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.sweep", "study", str(path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "non-empty list" in done.stderr


def test_swept_key_with_derived_heads_and_seed_statistics(caches, tmp_path):
    study = yaml.safe_load(write_study(tmp_path / "t7.yaml", caches).read_text())
    study["grid"] = {"folds": [0, 1], "seeds": [0, 1], "model.fusion.layers": [1, 3]}
    study["base"]["model"] = {"fusion": {"width": 64}}
    study["derived"] = {"model.fusion.heads": "model.fusion.width / 32"}
    path = tmp_path / "t7.yaml"
    path.write_text(yaml.safe_dump(study))
    spec = load_study(path=path)
    runs = expand_runs(spec)
    assert len(runs) == 8 and len({r.key for r in runs}) == 8 and spec.table.rows == ["model.fusion.layers"]
    assert {r.config["model"]["fusion"]["heads"] for r in runs} == {2}
    scores = {(1, 0): 50.0, (1, 1): 54.0, (3, 0): 60.0, (3, 1): 62.0}  # (layers, seed) -> mIoU of both folds
    results = {r.key: {"miou": scores[(r.values["model.fusion.layers"], r.seed)] + r.fold, "fb_iou": 70.0,
                       "pretrained_features": True} for r in runs}
    table = build_table(study=spec, runs=runs, results=results)
    assert table.columns == ["fold 0", "fold 1", "mean"] and table.seeds == 2
    assert table.notes == [selection_note(["final"] * 8)]  # records without a rule are final weights
    assert "Weights: final (the last step) for every run" in table.notes[0]
    assert "best of many test-set evaluations" in table.notes[0]
    mean, std = table.cells["layers=1"]["mean"]
    assert mean == pytest.approx(52.5) and std == pytest.approx(2.8284271, rel=1e-6)  # seeds 50.5 and 54.5
    del results[runs[0].key]
    partial = build_table(study=spec, runs=runs, results=results)
    assert partial.cells["layers=1"]["fold 0"] is None and partial.cells["layers=1"]["mean"] is None
    assert partial.cells["layers=3"]["mean"] is not None and "1 of 8 runs" in partial.notes[0]


def test_each_worker_gets_its_own_gpu():
    assert [worker_slot(n) for n in (0, 3, "SLURMCluster-4-1", "gpuhost-2", "tcp://1.2.3.4:5")] == [0, 3, 1, 2, None]
    assert [pick_gpu(worker_name=n, visible=["4", "5"]) for n in (0, 1, 2, "job-1")] == ["4", "5", "4", "5"]
    assert pick_gpu(worker_name=0, visible=["7"]) is None  # already pinned by whoever started the worker
    assert pick_gpu(worker_name="no-index", visible=["0", "1"]) is None


@pytest.mark.reliability
def test_fusioner_sweep_exits_1_listing_the_failed_runs_and_quiet_means_quiet(caches, tmp_path):
    """Every run failing is exit code 1 from the `fusioner` entry point too (it dropped the code), and -q
    output is the failed runs, one line each, without dask's multi-line logs."""
    from cli import main as cli_main

    variants = {"bad-heads": {"model.fusion.heads": 3}, "crash": {"log_every": 0}}
    study = write_study(tmp_path / "all-fail.yaml", caches, folds=[0], variants=variants)
    done = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "sweep", str(study),
                           "--workers", "1", "--retries", "0", "-q"], cwd=ROOT, capture_output=True, text=True)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 2 and all(line.startswith("failed: ") for line in lines), done.stderr[-3000:]
    assert cli_main(["sweep", str(study), "--dry-run"]) == 0


@pytest.mark.reliability
def test_a_fold_the_protocol_lacks_is_refused_at_planning(caches, tmp_path):
    study = write_study(tmp_path / "fold9.yaml", caches, folds=[0, 9])
    with pytest.raises(UserError, match=r"protocol 'pascal5i' has folds 0..3, not 9") as err:
        sweep(study, dry_run=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("table", "runs", "rows"), [
    ("table1", 96, 12), ("table2", 16, 4), ("table3", 1, 1), ("table4", 16, 4), ("table5", 8, 2), ("table7", 48, 12)])
def test_paper_studies_plan_without_any_cache(table, runs, rows, tmp_path, monkeypatch, capsys):
    """Issue 10: a dry run of every paper study lists its rows and folds and the caches to make."""
    monkeypatch.chdir(tmp_path)  # no cache/ folder here
    assert sweep(ROOT / "pipeline" / "studies" / f"{table}.yaml", dry_run=True) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"{runs} runs: {runs} pending" and all(" needs: " in line for line in lines[1:])
    assert "MISSING" in captured.err and "make: fusioner extract --backbone" in captured.err
    spec = load_study(path=ROOT / "pipeline" / "studies" / f"{table}.yaml")
    labels = {tuple(getattr(r, a) if a in ("pair", "variant") else None for a in spec.table.rows)
              for r in expand_runs(spec, check_caches=False)}
    assert len(labels) == rows


def test_paper_study_contents_follow_the_paper():
    studies = ROOT / "pipeline" / "studies"
    t4 = {r.variant: r.config for r in expand_runs(load_study(path=studies / "table4.yaml"), check_caches=False)}
    assert t4["neither"]["model"]["fusion"]["mode"] == "frozen" and not t4["neither"]["model"]["decoder"]["enabled"]
    t7 = expand_runs(load_study(path=studies / "table7.yaml"), check_caches=False)
    shapes = {(r.config["model"]["fusion"]["layers"], r.config["model"]["fusion"]["heads"],
               r.config["model"]["fusion"]["width"]) for r in t7}
    assert shapes == {(n, 8, 512) for n in (1, 3, 6, 12, 18, 24)} | {
        (12, h, 64 * h) for h in (1, 4, 8, 10, 12, 16)}
    t3 = expand_runs(load_study(path=studies / "table3.yaml"), check_caches=False)
    assert [(r.config["data"]["protocol"], r.config["data"]["split"], r.config["data"]["classes_per_sample"],
             r.eval["mode"]) for r in t3] == [("mosaic4", "mosaic4/train", "all", "multiclass")]
    t5 = expand_runs(load_study(path=studies / "table5.yaml"), check_caches=False)
    assert {(r.config["data"]["protocol"], r.config["data"]["split"], r.eval["split"]) for r in t5} == {
        ("coco2voc", "coco/train", "voc/val")}
    t2 = expand_runs(load_study(path=studies / "table2.yaml"), check_caches=False)
    rn = [r for r in t2 if "RN101" in r.pair]
    # The registry's clip-rn101 entry decides the depth (k = 5); the ViT rows keep k = 4.
    assert len(rn) == 8 and {decoder_summary(r) for r in rn} == {"decoder 512 x 5"}
    assert {decoder_summary(r) for r in t2 if "RN101" not in r.pair} == {"decoder 512 x 4"}


def test_table7_dry_run_shows_a_decoder_as_wide_as_each_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep(ROOT / "pipeline" / "studies" / "table7.yaml", dry_run=True) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "| fold 0 |" in line]
    widths = {line.split(" | ")[1]: line.split("decoder ")[1].split("  ")[0] for line in lines}
    assert widths["heads 1 / width 64"] == "64 x 4" and widths["heads 16 / width 1024"] == "1024 x 4"
    assert widths["layers 24"] == "512 x 4" and len(widths) == 12


def test_a_local_sweep_cluster_serves_the_dask_dashboard_and_its_workers_run_calm(capsys):
    """bokeh is installed where dask looks for it: the printed dashboard link answers. The workers got the
    sweep's calm settings (no stack sampling, slower ticks), which keep an idle cluster off the CPU."""
    import urllib.request

    pytest.importorskip("bokeh")  # the dashboard extra
    from pipeline.sweep.cluster import open_cluster

    with open_cluster(study=None, scheduler=None, slurm=False, jobs=1, gpus_per_job=1, workers=1, quiet=False) \
            as (client, _, _):
        assert list(client.run(calm_settings).values()) == [CALM]
        assert CALM["distributed.worker.profile.enabled"] is False
        link = client.dashboard_link
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never through a proxy
        with direct.open(link, timeout=30) as page:  # the scheduler's own HTTP server
            assert page.status == 200 and b"Dask" in page.read()
    assert f"dask dashboard: {link}" in capsys.readouterr().err


def test_hints_for_missing_training_caches_build_the_recipes_views():
    from pipeline.encode.config import RECIPE_VIEWS
    from pipeline.sweep.caches import make_command

    train = make_command("cache/clip-l", "voc/train", train_reader="voc")
    assert f"--views {RECIPE_VIEWS}" in train and RECIPE_VIEWS > 1
    assert "--views" not in make_command("cache/clip-l", "voc/val", train_reader="voc")
