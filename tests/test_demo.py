"""The demo, run as a user runs it: the installed console script, end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.bench.planted import CHECK_MARGIN, margin_over_controls
from pipeline.plots import CAVEAT_KEY, RANDOM_INIT_CAVEAT


def _console_script() -> str:
    candidate = Path(sys.executable).with_name("fusioner")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("fusioner")
    if not found:
        pytest.skip("the fusioner console script is not installed")
    return found


@pytest.mark.processes
def test_demo_writes_a_report_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the tiny test encoder at a small input size: the stages and the report are what is checked here, not
    # clip-b's size (the zero-shot check on planted features keeps its own sizes)
    done = subprocess.run([_console_script(), "demo", "--epochs", "1", "--backbone", "test-vit", "--input-size", "32",
                           "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Why the cache matters", "## Held-out classes", "## Prediction",
                    "## Zero-shot check on planted features"):
        assert heading in report
    assert "random-init" in report  # no pretrained CLIP weights offline: said plainly
    miou = re.search(r"\| mIoU \(novel\) \| ([0-9.]+) \|", report)
    assert miou is not None and 0.0 <= float(miou.group(1)) <= 100.0
    data = json.loads((out / "report.json").read_text())
    assert data["stages"]["extract"] > 0 and data["stages"]["train"] > 0
    assert data["eval"]["episodes"] > 0
    # Planted features: held-out classes found by name, beating both controls (docs/benchmarks.md).
    assert margin_over_controls(data["planted"]) > CHECK_MARGIN, data["planted"]
    assert data["online_estimate_seconds"] > data["stages"]["train"]
    for picture in ("run/curves.png", "prediction/overlay.png"):
        assert (out / picture).stat().st_size > 1000
        assert Image.open(out / picture).text[CAVEAT_KEY] == RANDOM_INIT_CAVEAT  # the report's pictures say it too
    assert len(data["predict"]["masks"]) == 4


def test_a_second_demo_in_the_same_folder_says_the_cache_was_reused(tmp_path: Path) -> None:
    """The reused cache's check time is never taken for the cost of extracting (it made '1.2x' claims)."""
    from pipeline.demo import Stage, _cache_section, extraction_seconds

    cache = tmp_path / "cache" / "clip-b"
    cache.mkdir(parents=True)
    stages = [Stage("extract", 0.4, "x"), Stage("train", 10.0, "y")]
    assert extraction_seconds(cache=cache, measured=0.4, reused=True) is None  # nothing recorded: unknown
    lines, online, _ = _cache_section(stages=stages, cache=cache, epochs=2, vision_seconds=None, reused=True,
                                      views=(30, 20))
    assert online is None and "reused" in lines[0] and "x)" not in " ".join(lines)
    assert extraction_seconds(cache=cache, measured=30.0, reused=False) == 30.0  # a real extraction is recorded
    assert extraction_seconds(cache=cache, measured=0.4, reused=True) == 30.0  # and used when the cache is reused
    lines, online, cached = _cache_section(stages=stages, cache=cache, epochs=2, vision_seconds=30.0, reused=True,
                                           views=(30, 20))
    assert "was reused" in lines[0] and "30.0 s" in lines[0] and cached == 40.0
    assert online == 10.0 + 1.0 * 20 * 2  # 1 s per view (30 s / 30 views), 20 training views, 2 epochs


@pytest.mark.parametrize(("extra", "needle"), [
    (["--novel", "star,unicorn"], "'unicorn' not among the classes of the generated shapes"),
    (["--novel", "star,ring,circle,square,triangle,cross"], "keep at least one"),
    (["--data-root", "{coco}", "--novel", "cat,unicorn"], "'unicorn' not among the classes of"),
    (["--data-root", "{coco}"], "--data-root needs --novel"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--backbone", "test-vit", "--input-size", "40"], "--input-size 40 is not a positive multiple of test-vit's"),
])
def test_demo_checks_its_inputs_before_any_work(tmp_path: Path, capsys, coco128, extra, needle) -> None:
    from cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *[e.format(coco=coco128) for e in extra]]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing generated or extracted first


@pytest.mark.slow  # two whole demos: ~2 CPU minutes (5 wall minutes on a loaded 2-core machine)
def test_a_second_demo_run_reports_the_reused_cache_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """Two whole demos in one folder at a tiny input size: the second says it extracted nothing and
    compares online and cached training with the first run's extraction time, never its own check."""
    from pipeline.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    reports = []
    for _ in range(2):
        run_demo(out=out, epochs=1, views=1, input_size=32, quiet=True)
        reports.append((json.loads((out / "report.json").read_text()), (out / "report.md").read_text()))
    (first, first_md), (second, second_md) = reports
    assert first["cache_reused"] is False and "was reused" not in first_md
    assert second["cache_reused"] is True
    assert "(cache reused: nothing extracted)" in second_md and "this run extracted nothing" in second_md
    recorded = json.loads((out / "cache" / "clip-b.timing.json").read_text())["vision_seconds"]
    assert f"({recorded:.1f} s)" in second_md  # the first run's extraction, not the reuse check
    assert second["online_estimate_seconds"] > second["stages"]["train"]
    assert second["cached_seconds"] == pytest.approx(recorded + second["stages"]["train"])


def test_the_held_out_photo_is_a_val_photo_showing_the_most_novel_pixels(tmp_path: Path) -> None:
    import numpy as np

    from pipeline.demo import held_out_photo

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for image_id, values in (("a", (1,)), ("b", (1, 2)), ("c", (2, 3)), ("d", (2,))):
        mask = np.zeros((20, 20), np.uint8)
        for k, value in enumerate(values):
            mask[:, 5 * k:5 * k + (12 if value == 2 and image_id == "d" else 4)] = value
        Image.fromarray(mask).save(root / "masks" / f"{image_id}.png")
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / f"{image_id}.jpg")
    (tmp_path / "val.txt").write_text("b\nc\n")  # d shows more of class 2 but was trained on
    photo, names = held_out_photo(root=root, val_list=tmp_path / "val.txt", names=["cat", "dog", "bus"],
                                  novel=["dog"])
    assert photo == root / "images" / "b.jpg" or photo == root / "images" / "c.jpg"
    assert names == {"b": ["cat", "dog"], "c": ["dog", "bus"]}[photo.stem]


@pytest.mark.slow  # a whole demo on a folder dataset: ~30 s on a loaded 2-core machine
def test_the_demo_on_ones_own_data_predicts_a_held_out_photo_in_its_own_names(tmp_path: Path, monkeypatch) -> None:
    """Not the bundled restaurant photo with unrelated names (an empty overlay): a val photo, never trained
    on, with the classes its mask holds; the report gives each class's episode count beside its score and
    calls the online cost an extrapolation."""
    from synthetic_data import write_folder_dataset

    from pipeline.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_folder_dataset(tmp_path / "data", sizes=((160, 160),) * 8)
    out = tmp_path / "demo"
    run_demo(out=out, data_root=data, novel=["dog"], epochs=1, views=1, input_size=32, quiet=True)
    report = json.loads((out / "report.json").read_text())
    val = (out / "val.txt").read_text().split()
    photo = Path(report["predict"]["image"])
    assert photo.stem in val and photo.stem not in (out / "train.txt").read_text().split()
    assert report["predict"]["classes"] == ["cat", "dog", "traffic light"]  # the names its mask holds
    md = (out / "report.md").read_text()
    episodes = report["eval"]["episodes_per_class"]
    assert f"| IoU dog | " in md and f"({episodes['dog']} episodes) |" in md
    assert "extrapolation" in md and "not a measurement" in md
    assert "held-out photo" in md and (out / "prediction" / "legend.png").is_file()
