"""The layering rule holds: no import cycle, no import from a layer above, no private name across modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.tools.import_graph import check, find_cycle, layer_of

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_follows_the_layering_rule():
    assert check() == []


def test_layers_order_the_data_flow():
    order = ["pipeline.errors", "pipeline.data.readers", "pipeline.store.layout", "pipeline.encode.extract",
             "pipeline.model", "pipeline.training.loop", "pipeline.eval.evaluate", "pipeline.sweep.scheduler"]
    assert [layer_of(m) for m in order] == sorted(layer_of(m) for m in order)
    assert layer_of("pipeline.bench.extract") == layer_of("pipeline.sweep.worker") == layer_of("pipeline.demo")


def test_a_cycle_through_function_level_imports_is_found(tmp_path):
    package = tmp_path / "pipeline"
    (package / "training").mkdir(parents=True)
    (package / "eval").mkdir()
    for folder in (package, package / "training", package / "eval"):
        (folder / "__init__.py").write_text("")
    (package / "training" / "loop.py").write_text("def validate():\n    from pipeline.eval.evaluate import score\n")
    (package / "eval" / "evaluate.py").write_text("from pipeline.training.loop import validate\n\ndef score():\n    pass\n")
    (package / "eval" / "helpers.py").write_text("from pipeline.training.loop import _private\n")
    problems = check(package)
    assert any("layer above" in p and "pipeline.training.loop" in p for p in problems)
    assert any("imports private _private" in p for p in problems)
    assert any(p.startswith("import cycle:") for p in problems)


def test_find_cycle_returns_a_closed_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_command_exits_zero_and_says_so():
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.import_graph"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert "no cycle" in done.stdout
