"""Store faults: a text-table update killed at each step (issue 14 item 2)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.store import layout
from pipeline.store.layout import open_or_create_store, open_store, read_text, store_identity, write_text

pytestmark = pytest.mark.reliability


class Killed(BaseException):
    """Stands for SIGKILL at a chosen point: nothing after it runs, no cleanup either."""


def _store(path):
    identity = store_identity(encoder="minilm", weights={"pretrained": False, "source": "random-init"},
                              input_size=224, grid=None, vision_dim=None, text_dim=4, mean=[0, 0, 0], std=[1, 1, 1])
    root = open_or_create_store(path, identity=identity)
    write_text(root, names=["cat", "dog"], embeddings=np.arange(8, dtype=np.float32).reshape(2, 4) + 1, meta={})
    return root


def _kill_after_create(monkeypatch):
    create = zarr.Group.create_array

    def create_then_die(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(zarr.Group, "create_array", create_then_die)


def _kill_before_switch(monkeypatch):
    monkeypatch.setattr(layout, "now_iso", lambda: (_ for _ in ()).throw(Killed()))


def _kill_before_delete(monkeypatch):
    def die(self, key):
        raise Killed

    monkeypatch.setattr(zarr.Group, "__delitem__", die)


@pytest.mark.parametrize("kill", [_kill_after_create, _kill_before_switch, _kill_before_delete])
def test_a_text_update_killed_anywhere_leaves_the_old_or_the_new_table(tmp_path, monkeypatch, kill):
    _store(tmp_path / "s")
    old_names, old_table = read_text(open_store(tmp_path / "s"))
    added = np.full((1, 4), 7.0, np.float32)
    with monkeypatch.context() as patch:
        kill(patch)
        with pytest.raises(Killed):
            write_text(open_store(tmp_path / "s", mode="r+"), names=["bus"], embeddings=added, meta={})
    names, table = read_text(open_store(tmp_path / "s"))
    if names == old_names:
        assert np.array_equal(table, old_table)
    else:
        assert names == old_names + ["bus"] and np.array_equal(table, np.concatenate([old_table, added]))
    assert (table != 0).all()
    # The next update (the rerun) completes, and cleans what the killed one left.
    write_text(open_store(tmp_path / "s", mode="r+"), names=["bus", "car"], embeddings=np.ones((2, 4), np.float32),
               meta={})
    root = open_store(tmp_path / "s")
    names, table = read_text(root)
    assert names == ["cat", "dog", "bus", "car"] and np.array_equal(table[:2], old_table)
    assert len(list(root["text"].array_keys())) == 1


def test_a_text_group_without_a_table_reads_as_no_text(tmp_path):
    root = _store(tmp_path / "s")
    del root["text"]
    root.require_group("text")  # killed right after creating the group, before the first table
    assert not layout.has_text(open_store(tmp_path / "s"))
    write_text(open_store(tmp_path / "s", mode="r+"), names=["cat"], embeddings=np.ones((1, 4), np.float32), meta={})
    assert read_text(open_store(tmp_path / "s"))[0] == ["cat"]
