"""A render process killed mid-extraction is one line, and the same command resumes to the same store."""

from __future__ import annotations

from dataclasses import replace

import pytest
from synthetic_data import assert_same_store, render_then_die, tiny_extract_config, write_folder_dataset

import pipeline.encode.shards
from pipeline.encode.extract import extract
from pipeline.errors import run_entry

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


@pytest.mark.processes
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


class _LoaderThatLosesItsWorker:
    """Stands in for the DataLoader at the moment a render process dies while handing over its block: the
    parent's read fails with ``error`` before torch has noticed the death (seen in CI: an ``EOFError``)."""

    def __init__(self, *args, error: BaseException, log: list, **kwargs):
        self.error, self.log = error, log

    def __iter__(self):
        return self

    def __next__(self):
        raise self.error

    def _shutdown_workers(self):
        self.log.append("shutdown")


@pytest.mark.reliability
@pytest.mark.parametrize("error", [EOFError(), ConnectionResetError(104, "Connection reset by peer"),
                                   RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed.")])
def test_a_render_process_lost_mid_transfer_is_one_line_and_its_processes_are_shut_down(monkeypatch, error):
    """Also: the loader is shut down before the error leaves, so torch's SIGCHLD handler has no dead
    pid left to raise about later (it raised in the shard writers' join, a traceback instead of one line)."""
    import torch.utils.data

    from pipeline.encode.config import ExtractConfig
    from pipeline.encode.render_pool import rendered_shards
    from pipeline.errors import UserError

    log = []
    monkeypatch.setattr(torch.utils.data, "DataLoader",
                        lambda *a, **k: _LoaderThatLosesItsWorker(error=error, log=log))
    items = rendered_shards(render=None, config=ExtractConfig(backbone="test-vit", out="unused"), group_path="folder/train", shards=[0],
                            input_size=32, workers=1, pin=False)
    with pytest.raises(UserError, match="a render process died") as caught:
        next(items)
    assert "\n" not in str(caught.value) and log == ["shutdown"]


def test_an_error_raised_inside_a_render_process_is_not_taken_for_its_death():
    from pipeline.encode.render_pool import render_process_died

    reraised = ConnectionResetError("Caught ConnectionResetError in DataLoader worker process 0.\nOriginal ...")
    assert not render_process_died(reraised) and not render_process_died(RuntimeError("shapes differ"))
    assert render_process_died(EOFError()) and render_process_died(ConnectionRefusedError())
