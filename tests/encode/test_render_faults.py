"""A render process killed mid-extraction is one line, and the same command resumes to the same store."""

from __future__ import annotations

from dataclasses import replace

import pytest
from synthetic_data import assert_same_store, render_then_die, tiny_extract_config, write_folder_dataset

import pipeline.encode.shards
from pipeline.encode.extract import extract
from pipeline.errors import run_entry

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


@pytest.mark.reliability
def test_a_killed_render_process_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    data = write_folder_dataset(tmp_path / "data")
    straight = tiny_extract_config(data, tmp_path / "straight")
    extract(config=straight, quiet=True)
    config = replace(tiny_extract_config(data, tmp_path / "store"), render_workers=1)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.encode.shards, "render_shard", render_then_die)  # dies on shard 1, in the worker
        code = run_entry(lambda: extract(config=config, quiet=True))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "a render process died" in err and "run the same command to resume" in err, err
    extract(config=config, quiet=True)
    assert_same_store(tmp_path / "straight", tmp_path / "store")
