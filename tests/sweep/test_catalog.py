"""Shipped studies are found by name from any folder, and listed."""

from __future__ import annotations

import pytest

from cli import main
from pipeline.errors import UserError
from pipeline.sweep.catalog import find_study, shipped_studies


def test_shipped_studies_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here
    assert {"table1", "table2", "table3", "table4", "table7", "tiny"} <= set(shipped_studies())
    assert find_study("table2") == shipped_studies()["table2"]
    assert find_study("table2.yaml") == shipped_studies()["table2"]
    assert find_study("pipeline/studies/table4.yaml") == shipped_studies()["table4"]  # the old spelling
    own = tmp_path / "table2.yaml"
    own.write_text("name: mine\n")
    assert find_study("table2.yaml").resolve() == own  # a file of your own wins over a shipped name
    with pytest.raises(UserError, match=r"study file not found: tabel2 \(shipped studies: (\S+, )*table1, table2"):
        find_study("tabel2")


def test_sweep_list_shows_every_shipped_study(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--list"]) == 0
    out = capsys.readouterr().out
    for name in shipped_studies():
        assert f"\n{name} " in f"\n{out}"
    assert "Paper Table 2" in out
    assert main(["sweep"]) == 2  # no study named: the list, and a usage exit code


def test_sweep_list_gives_whole_sentences_and_aligned_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split(" ")[0] in shipped_studies()]
    assert len(lines) == len(shipped_studies())
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(starts) == 1  # every description starts in one column, "cache-vs-online" included
    assert all(line.rstrip()[-1] in ".?!" for line in lines)  # never cut mid-sentence
    assert any("a couple of minutes on a laptop CPU." in line for line in lines if line.startswith("tiny "))


def test_the_tiny_study_uses_relative_store_paths_that_set_redirects(tmp_path, monkeypatch):
    from pipeline.sweep.command import run_study

    monkeypatch.chdir(tmp_path)
    planned = run_study(study="tiny", dry_run=True)
    assert str(tmp_path / "cache" / "tiny" / "clip-b") in planned.plan and "/tmp/sw" not in planned.plan
    # the MiniLM store is filled by a text-only extraction of the data's class list, never by the vision one
    text_hint = planned.caches.split(f"{tmp_path / 'cache' / 'tiny' / 'minilm'} text")[1].splitlines()[1]
    assert "fusioner extract --backbone minilm --text-only --dataset folder --data-root" in text_hint
    moved = run_study(study="tiny", dry_run=True,
                      overrides={"study.pairs": [{"label": "m", "vision": "/data/v/clip-b", "text": "/data/t/minilm"}]})
    assert "/data/v/clip-b folder/train" in moved.plan and str(tmp_path / "cache") not in moved.plan


@pytest.mark.processes
def test_a_dry_run_piped_into_head_exits_0(tmp_path):
    """The reader closes the pipe after one line, while the plan (about 90 kB, more than a pipe holds) is still
    being written."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "sweep", "table1",
               "--dry-run", "--set", "study.grid.seeds=[" + ",".join(map(str, range(5))) + "]"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, stderr
    assert first.startswith(b"480 runs") and "Traceback" not in stderr and "BrokenPipe" not in stderr
