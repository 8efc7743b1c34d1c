"""`fusioner sweep STUDY --estimate` prices a study from its configs, before any store exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.sweep.command import estimate_command, sweep_command
from pipeline.sweep.estimate import estimate_study
from pipeline.sweep.study import expand_runs, load_study


def _fresh(study: str, tmp_path: Path, splits_dir: Path, monkeypatch, *extra: str):
    """A shipped study as a fresh clone sees it: no store, nothing run, the lists at ``splits_dir``."""
    monkeypatch.chdir(tmp_path)  # cache/... resolves here, where nothing was extracted
    sets = [f"data.train_lists={splits_dir}", f"study.eval.splits_dir={splits_dir}", f"study.out={tmp_path / 'out'}",
            f"study.runs={tmp_path / 'runs'}", *extra]
    return load_study(path=study, overrides=sets)


def _listed_pascal(splits_dir: Path, fold: int) -> int:
    pairs = set()
    for other in range(4):
        if other != fold:
            pairs |= {line.strip() for line in (splits_dir / "pascal" / "trn" / f"fold{other}.txt").read_text().split()}
    return len(pairs)


def _listed_coco(splits_dir: Path, fold: int) -> int:
    listed = json.loads((splits_dir / "coco" / "trn" / f"fold{fold}.json").read_text())
    return len({(cls, path) for cls, paths in listed.items() for path in paths})


def test_table2_is_priced_on_a_fresh_clone_from_the_standard_lists(tmp_path, splits_dir, monkeypatch):
    spec = _fresh("table2", tmp_path, splits_dir, monkeypatch)
    runs = expand_runs(spec, check_caches=False)
    estimate = estimate_study(runs=runs, gpu="h100")
    rows = estimate["rows"]
    pascal, coco = rows["CLIP-L + CLIP-L | PASCAL-5i"], rows["CLIP-L + CLIP-L | COCO-20i"]
    assert pascal["samples"] == [_listed_pascal(splits_dir, fold) for fold in range(4)]
    assert coco["samples"] == [_listed_coco(splits_dir, fold) for fold in range(4)]
    assert coco["samples"][0] == 95_476  # the released recipe's COCO-20i fold-0 pairs
    assert pascal["sources"] == [f"pascal5i lists in {splits_dir}"] and "coco20i lists" in coco["sources"][0]
    # 510 epochs of ceil(samples / 32) steps per fold
    assert pascal["steps"] == sum(510 * -(-n // 32) for n in pascal["samples"])
    assert estimate["gpu_hours"] > 0 and all(row["unpriced"] == 0 for row in rows.values())
    missing = {(Path(e["store"]).name, e["split"]): e for e in estimate["extraction"]}
    assert set(missing) == {(enc, split) for enc in ("clip-l", "clip-rn101")
                            for split in ("voc/train", "voc/val", "coco/train", "coco/val")}
    assert missing["clip-l", "voc/train"]["images"] == 10_582 and missing["clip-l", "voc/val"]["images"] == 1_449
    assert missing["clip-l", "voc/train"]["rows"] == ["CLIP-L + CLIP-L | PASCAL-5i"]  # the runs sharing it
    assert missing["clip-l", "voc/train"]["seconds"] > 0 and estimate["extract_gpu_hours"] > 0
    # RN101 encodes a view with fewer FLOPs than ViT-L/14: a faster projected extraction
    assert missing["clip-rn101", "voc/train"]["views_per_s"] > missing["clip-l", "voc/train"]["views_per_s"]


def test_the_printed_estimate_says_where_each_count_came_from(tmp_path, splits_dir, monkeypatch, capsys):
    _fresh("table4", tmp_path, splits_dir, monkeypatch)
    sets = [f"data.train_lists={splits_dir}", f"study.eval.splits_dir={splits_dir}", f"study.out={tmp_path / 'o'}",
            f"study.runs={tmp_path / 'r'}"]
    assert sweep_command(study=Path("table4"), scheduler=None, slurm=False, jobs=1, gpus_per_job=1, workers=None,
                         dry_run=False, retries=0, quiet=True, overrides=sets, estimate=True, gpu="a100") == 0
    out = capsys.readouterr().out
    for variant in ("full", "no-decoder", "no-fusion", "neither"):
        row = next(line for line in out.splitlines() if line.startswith(f"| CLIP-L + CLIP-L | {variant} |"))
        assert f"pascal5i lists in {splits_dir}" in row and row.split("|")[3].strip() == "4 (0)"
    assert "projected: " in out and "a100" in out and "extraction of the missing caches:" in out
    assert "voc/train | 10,582 |" in out and "all 4 rows" in out


def test_table7_rows_cost_what_their_width_and_depth_cost(tmp_path, splits_dir, monkeypatch):
    runs = expand_runs(_fresh("table7", tmp_path, splits_dir, monkeypatch), check_caches=False)
    assert len({r.key for r in runs}) == 44
    rows = estimate_study(runs=runs, gpu="h100")["rows"]
    gflop = {label.split(" | ", 1)[1]: row["gflop"] for label, row in rows.items()}
    assert len(set(gflop.values())) == len(gflop) == 11  # the 12-layer row is the width-512 row
    depth = [gflop[f"layers {n}"] for n in (1, 3, 6)] + [gflop["layers 12 = heads 8 / width 512"]] + [
        gflop[f"layers {n}"] for n in (18, 24)]
    width = [gflop[f"heads {h} / width {w}"] for h, w in ((1, 64), (4, 256))] + [
        gflop["layers 12 = heads 8 / width 512"]] + [gflop[f"heads {h} / width {w}"] for h, w in
                                                     ((10, 640), (12, 768), (16, 1024))]
    assert depth == sorted(depth) and width == sorted(width)
    seconds = {label: row["seconds_per_step"] for label, row in rows.items()}
    assert len(set(seconds.values())) == 11


def test_an_unknown_gpu_is_reported_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"`gpu` v100: recorded figures exist for h100"):
        estimate_command(study=Path("no-such-study"), gpu="v100", timings=None, overrides={})


@pytest.mark.parametrize("body", ['{"preset": "paper", "batch_size": 32, "steps_per_s": 0}',
                                  '{"preset": "paper", "samples_per_s": -3}', "not json"])
def test_a_timings_file_without_a_positive_rate_is_one_line(tmp_path, body):
    timings = tmp_path / "gpu.json"
    timings.write_text(body + "\n")
    with pytest.raises(UserError, match=r"`timings` .*gpu\.json"):
        estimate_command(study=Path("no-such-study"), gpu="h100", timings=timings, overrides={})


def test_runs_that_cannot_be_counted_are_listed_unpriced_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # cache-vs-online's stores are named k1, k4, ...: no encoder name, no store, so no token sizes
    print(estimate_command(study=Path("cache-vs-online"), gpu="h100", timings=None,
                           overrides={"study.out": str(tmp_path / "o")}))
    out = capsys.readouterr().out
    assert out.count("(+1 unpriced)") == 5 and "FLOPs unknown: /tmp/cvo/k1: no store there" in out
    # the tiny study's stores are named after their encoders; max_steps bounds its runs without samples
    print(estimate_command(study=Path("tiny"), gpu="h100", timings=None, overrides={"study.out": str(tmp_path / "t")}))
    out = capsys.readouterr().out
    assert "optim.max_steps 60 priced as an upper bound" in out and "| 240 |" in out and "unpriced" not in out


def _timings(*, packed: list) -> str:
    """A bench gpu line with packed rows (runs, samples/s per GPU); None stands for a failed round."""
    rows = [{"runs": n, "error": "timed out"} if rate is None else
            {"runs": n, "samples_per_s_per_gpu": rate, "gain_over_one": rate / packed[0][1]} for n, rate in packed]
    return json.dumps({"preset": "paper", "batch_size": 32, "steps_per_s": 9.0, "machine": "H100 test",
                       "packed": rows}) + "\n"


def test_packed_runs_are_priced_serially_until_a_packed_rate_is_measured(tmp_path, splits_dir, monkeypatch):
    spec = _fresh("table4", tmp_path, splits_dir, monkeypatch)
    runs = expand_runs(spec, check_caches=False)
    alone = estimate_study(runs=runs, gpu="h100")
    packed = estimate_study(runs=runs, gpu="h100", runs_per_gpu=2)
    assert packed["gpu_hours"] == pytest.approx(alone["gpu_hours"]) and alone["packing"] == ""
    assert "priced as one run at a time" in packed["packing"] and "packed rate is unmeasured" in packed["packing"]
    timings = tmp_path / "gpu.json"
    timings.write_text(_timings(packed=[(1, 300.0), (2, 450.0), (4, 600.0)]))
    measured = estimate_study(runs=runs, gpu="h100", timings_file=timings, runs_per_gpu=2)
    serial = estimate_study(runs=runs, gpu="h100", timings_file=timings)
    assert measured["gpu_hours"] == pytest.approx(serial["gpu_hours"] / 1.5)
    assert "1.50x the samples/s of one run (450 per GPU)" in measured["packing"] and "H100 test" in measured["packing"]
    # Asked for 4, the full model fits 2 on an h100 and is priced at the measured rate of 2; the rows without
    # the decoder or the fusion fit 3 and the parameter-free row 4, rates unmeasured here: one run at a time.
    timings.write_text(_timings(packed=[(1, 300.0), (2, 450.0), (4, None)]))  # the round of 4 failed
    four = estimate_study(runs=runs, gpu="h100", timings_file=timings, runs_per_gpu=4)
    fits = {label.split(" | ")[1]: row["fit"] for label, row in four["rows"].items()}
    assert fits == {"full": 2, "no-decoder": 3, "no-fusion": 3, "neither": 4} and "unmeasured" in four["packing"]
    for label, row in four["rows"].items():
        speedup = 1.5 if row["fit"] == 2 else 1.0  # 4 at once: unmeasured, priced one at a time
        assert row["seconds"] == pytest.approx(serial["rows"][label]["seconds"] / speedup)
    timings.write_text(_timings(packed=[(1, 300.0), (4, 600.0)]))
    unmeasured = estimate_study(runs=runs, gpu="h100", timings_file=timings, runs_per_gpu=2)
    assert unmeasured["gpu_hours"] == pytest.approx(serial["gpu_hours"]) and "unmeasured" in unmeasured["packing"]
    text = estimate_command(study=spec.path, gpu="h100", timings=None, runs_per_gpu=2,
                            overrides={"data.train_lists": str(splits_dir), "study.eval.splits_dir": str(splits_dir)})
    assert "packing: 2 runs per GPU: priced as one run at a time" in text and "peak GiB (runs per GPU) |" in text


def test_table7_rows_pack_as_many_runs_as_their_peak_memory_allows(tmp_path, splits_dir, monkeypatch):
    """Each row's peak from its config: the widest row fits one run on an h100, the narrowest four; a measured
    packed rate divides a row's GPU-hours by the speed-up of as many runs as it fits."""
    runs = expand_runs(_fresh("table7", tmp_path, splits_dir, monkeypatch), check_caches=False)
    timings = tmp_path / "gpu.json"
    timings.write_text(_timings(packed=[(1, 300.0), (2, 450.0), (4, 600.0)]))
    serial = estimate_study(runs=runs, gpu="h100", timings_file=timings)["rows"]
    packed = estimate_study(runs=runs, gpu="h100", timings_file=timings, runs_per_gpu=4)["rows"]
    row = {label.split(" | ")[1]: label for label in packed}
    wide, narrow = row["heads 16 / width 1024"], row["heads 1 / width 64"]
    paper = row["layers 12 = heads 8 / width 512"]
    assert packed[narrow]["peak_mib"] < packed[paper]["peak_mib"] < packed[wide]["peak_mib"] < 79 * 1024
    assert (packed[wide]["fit"], packed[narrow]["fit"], packed[paper]["fit"]) == (1, 4, 2)
    assert packed[wide]["seconds"] == pytest.approx(serial[wide]["seconds"])
    assert packed[paper]["seconds"] == pytest.approx(serial[paper]["seconds"] / 1.5)
    assert packed[narrow]["seconds"] == pytest.approx(serial[narrow]["seconds"] / 2.0)
