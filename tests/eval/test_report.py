"""``fusioner eval`` outputs say which weights were scored, and how the paper's figures were chosen."""

from __future__ import annotations

import json

import pytest

from cli import main as cli_main
from pipeline.eval.report import run_selection, selection_note

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_outputs_name_the_weights_and_the_papers_selection(learned, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["eval", str(learned), "--split", "folder/val", "--limit", "2", "--min-pixels", "64",
                     "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text())[0]["selection"] == "final"
    table = (out / "table.md").read_text()
    assert "Weights: final (the last step) for every run." in table
    assert "best of many test-set evaluations" in table


def test_selection_comes_from_the_summary_then_the_config(tmp_path):
    assert run_selection(tmp_path) == "final"
    (tmp_path / "config.json").write_text(json.dumps({"select": "best-val"}))
    assert run_selection(tmp_path) == "best-val"
    (tmp_path / "summary.json").write_text(json.dumps({"selection": {"rule": "final"}}))
    assert run_selection(tmp_path) == "final"
    mixed = selection_note(["final", "best-val", "final"])
    assert "final (the last step) for 2 runs" in mixed and "best-val (best validation mIoU" in mixed
