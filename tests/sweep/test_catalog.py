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
