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


def _console_script() -> str:
    candidate = Path(sys.executable).with_name("fusioner")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("fusioner")
    if not found:
        pytest.skip("the fusioner console script is not installed")
    return found


def test_demo_writes_a_report_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([_console_script(), "demo", "--epochs", "1", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Why the cache matters", "## Held-out classes", "## Prediction"):
        assert heading in report
    assert "random-init" in report  # no pretrained CLIP weights offline: said plainly
    miou = re.search(r"\| mIoU \(novel\) \| ([0-9.]+) \|", report)
    assert miou is not None and 0.0 <= float(miou.group(1)) <= 100.0
    data = json.loads((out / "report.json").read_text())
    assert data["stages"]["extract"] > 0 and data["stages"]["train"] > 0
    assert data["eval"]["episodes"] > 0
    assert data["online_estimate_seconds"] > data["stages"]["train"]
    for picture in ("run/curves.png", "prediction/overlay.png"):
        assert (out / picture).stat().st_size > 1000
    assert len(data["predict"]["masks"]) == 4
