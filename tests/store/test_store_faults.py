"""Store faults: a text-table update killed at each step (issue 14 item 2)."""

from __future__ import annotations

import os
import re
from dataclasses import replace

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


def _kill_before_consolidation(monkeypatch):
    monkeypatch.setattr(layout, "consolidate", lambda *a, **k: (_ for _ in ()).throw(Killed()))


@pytest.mark.parametrize("kill", [_kill_after_create, _kill_before_switch, _kill_before_delete,
                                  _kill_before_consolidation])
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


def test_a_stale_consolidated_copy_left_by_a_kill_never_reaches_fusioner(tmp_path, monkeypatch):
    """The root's consolidated metadata lags behind after a kill; Fusioner reads the real metadata."""
    _store(tmp_path / "s")
    with monkeypatch.context() as patch:
        _kill_before_consolidation(patch)
        with pytest.raises(Killed):
            write_text(open_store(tmp_path / "s", mode="r+"), names=["bus"], embeddings=np.ones((1, 4), np.float32),
                       meta={})
    stale = zarr.open_consolidated(str(tmp_path / "s"), mode="r")["text"].attrs["names"]
    assert stale == ["cat", "dog"]  # what a reader of the consolidated copy sees until the next write
    assert read_text(open_store(tmp_path / "s"))[0] == ["cat", "dog", "bus"]
    write_text(open_store(tmp_path / "s", mode="r+"), names=["car"], embeddings=np.ones((1, 4), np.float32), meta={})
    assert zarr.open_consolidated(str(tmp_path / "s"), mode="r")["text"].attrs["names"] == ["cat", "dog", "bus", "car"]


def test_a_text_group_without_a_table_reads_as_no_text(tmp_path):
    root = _store(tmp_path / "s")
    del root["text"]
    root.require_group("text")  # killed right after creating the group, before the first table
    assert not layout.has_text(open_store(tmp_path / "s"))
    write_text(open_store(tmp_path / "s", mode="r+"), names=["cat"], embeddings=np.ones((1, 4), np.float32), meta={})
    assert read_text(open_store(tmp_path / "s"))[0] == ["cat"]


# --------------------------------------------------------------------------- #
# Extraction into a store: lost shard files, a bare root, two writers (items 3, 8, 9)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, one_thread, reuse_encoders):
    """One finished extraction of the tiny folder dataset; each test damages its own copy."""
    from synthetic_data import tiny_extract_config, write_folder_dataset

    from pipeline.encode.extract import extract

    base = tmp_path_factory.mktemp("pristine")
    config = tiny_extract_config(write_folder_dataset(base / "data"), base / "store")
    extract(config=config, quiet=True)
    return base


@pytest.fixture()
def extracted(pristine, tmp_path):
    """A copy of the finished store (the dataset is shared, read-only) and the config that made it."""
    import shutil

    from synthetic_data import tiny_extract_config

    store = shutil.copytree(pristine / "store", tmp_path / "store", symlinks=True)
    return store, tiny_extract_config(pristine / "data", store)


def test_a_done_shard_whose_files_vanished_is_refused_on_open_and_rewritten_by_extract(extracted):
    from synthetic_data import store_arrays

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.reader import open_split

    path, config = extracted
    before = store_arrays(path)
    (path / "folder/train/features/c/1/0/0").unlink()  # shard 1's features file, shard marked done
    (path / "folder/train/masks/c/1/0/0").unlink()
    with pytest.raises(UserError, match=r"files of 1 written shard\(s\) are missing or empty \(first: shard 1\).*extract"):
        open_split(store=path, split="folder/train")
    report = extract(config=config, quiet=True)
    assert report.shards_run == 1
    after = store_arrays(path)
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    open_split(store=path, split="folder/train")


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["delete", "empty"])
@pytest.mark.parametrize("direct", [True, False])
def test_a_done_shard_file_lost_after_opening_is_one_line_on_every_read_path(extracted, how, direct):
    """Deleted or emptied after the split was opened: the direct reader and zarr both refuse, naming the shard."""
    from pipeline.errors import UserError
    from pipeline.store.reader import open_split

    path, _ = extracted
    split = open_split(store=path, split="folder/train")
    shard = path / "folder/train/features/c/1/0/0"
    shard.unlink() if how == "delete" else shard.write_bytes(b"")
    problem = "missing" if how == "delete" else r"empty \(0 bytes\)"
    with pytest.raises(UserError, match=rf"features file of shard 1 is {problem}.*fusioner extract"):
        split.read("features", slice(0, 8), direct=direct)  # shards 0 and 1
    with pytest.raises(UserError, match=rf"features file of shard 1 is {problem}"):
        split.features([0, 5])
    assert split.read("features", slice(0, 4), direct=direct).shape[0] == 4  # shard 0 still reads


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.reliability
@pytest.mark.parametrize("array", ["view_classes", "view_valid"])
def test_a_damaged_small_array_is_one_line_in_info_and_training_and_extract_verify_rewrites_it(extracted, array):
    from synthetic_data import store_arrays

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.info import describe_store
    from pipeline.store.reader import open_split

    path, config = extracted
    before = store_arrays(path)
    _flip_a_byte(path / "folder/train" / array / ("c/1/0" if array == "view_classes" else "c/1"))  # shard 1
    reads = [lambda: open_split(store=path, split="folder/train")]
    if array == "view_valid":  # what `fusioner info` reads of a split
        reads.append(lambda: describe_store(path))
    for read in reads:
        with pytest.raises(UserError, match=rf"folder/train: {array} is damaged \(checksum mismatch\).*--verify") as err:
            read()
        assert "\n" not in str(err.value)
    assert extract(config=replace(config, verify=True), quiet=True).shards_run == 1
    after = store_arrays(path)
    for name in before:
        assert np.array_equal(before[name].view(np.uint8), after[name].view(np.uint8)), name
    open_split(store=path, split="folder/train")


@pytest.mark.reliability
def test_a_damaged_text_table_is_one_line_and_extract_verify_writes_it_again(extracted):
    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.info import describe_store

    path, config = extracted
    names, table = read_text(open_store(path))
    current = open_store(path)["text"].attrs["table"]
    _flip_a_byte(next((path / "text" / current).rglob("c/*/*")))
    for read in (lambda: read_text(open_store(path)), lambda: describe_store(path)):
        with pytest.raises(UserError, match=r"class-name embeddings are damaged \(checksum mismatch\).*--verify"):
            read()
    extract(config=replace(config, verify=True), quiet=True)
    again, rewritten = read_text(open_store(path))
    assert again == names
    np.testing.assert_allclose(rewritten, table, rtol=0, atol=1e-5)


@pytest.mark.reliability
def test_text_only_names_append_to_a_store_of_the_same_encoder(extracted):
    from pipeline.encode.extract import extract

    path, config = extracted
    report = extract(config=replace(config, text_only=True, dataset=None, data_root=None, input_size=None,
                                    extra_names=["zebra", "hot air balloon"]), quiet=True)
    assert report.text_classes >= 2
    names, table = read_text(open_store(path))
    assert {"zebra", "hot air balloon", "cat"} <= set(names) and table.shape[0] == len(names)


def test_a_truncated_done_shard_is_written_again_by_extract(extracted):
    from synthetic_data import store_arrays

    from pipeline.encode.extract import extract

    path, config = extracted
    before = store_arrays(path)
    shard = path / "folder/train/features/c/0/0/0"
    shard.write_bytes(shard.read_bytes()[:-200])  # its index, written last, is cut off
    assert extract(config=config, quiet=True).shards_run == 1
    assert np.array_equal(store_arrays(path)["features"].view(np.uint16), before["features"].view(np.uint16))


def test_a_store_killed_right_after_its_root_was_created_resumes(extracted, tmp_path):
    from pipeline.encode.extract import extract

    _, config = extracted
    bare = tmp_path / "bare"
    zarr.open_group(str(bare), mode="w", zarr_format=3)  # what older versions left when killed here
    report = extract(config=replace(config, out=str(bare)), quiet=True)
    assert report.shards_skipped == 0 and open_store(bare)


def test_a_second_writer_is_refused_naming_the_holder(extracted):
    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.layout import writer_lock

    path, config = extracted
    with writer_lock(path):
        with pytest.raises(UserError, match=r"is being written by pid \d+ on .* since .*another `out`") as err:
            extract(config=config, quiet=True)
    assert "\n" not in str(err.value)
    assert extract(config=config, quiet=True).shards_run == 0  # free again once the holder is gone


def test_out_pointing_at_a_file_is_a_one_line_error(extracted, tmp_path):
    from pipeline.encode.extract import extract
    from pipeline.errors import UserError

    _, config = extracted
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        extract(config=replace(config, out=str(tmp_path / "a-file")), quiet=True)


@pytest.mark.parametrize("option", ["batch_size", "shard_size", "stride", "input_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_extraction_counts_below_one_are_refused(tmp_path, option, value):
    from synthetic_data import tiny_extract_config

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError

    config = tiny_extract_config(tmp_path / "data", tmp_path / "store", **{option: value})
    with pytest.raises(UserError, match=f"`{option}` must be at least 1, got {value}"):
        extract(config=config, quiet=True)


@pytest.mark.reliability
@pytest.mark.parametrize(("changes", "message"), [
    ({"input_size": 0}, "`input_size` must be at least 1, got 0"),
    ({"split": "val", "layout": "shuffled"}, "`layout` shuffled orders training views; split 'val' is stored as "
                                              "evaluation windows"),
    ({"split": "val", "eval_resize": True, "layout": "shuffled"}, "stored as evaluation resize"),
    ({"split": "val", "episode_folds": [1]}, "`episode_folds` picks the folds of `episodes`"),
])
def test_extract_options_that_would_be_ignored_are_refused_and_nothing_is_written(tmp_path, changes, message):
    from synthetic_data import tiny_extract_config, write_folder_dataset

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError

    config = tiny_extract_config(write_folder_dataset(tmp_path / "data"), tmp_path / "store", **changes)
    with pytest.raises(UserError, match=message) as err:
        extract(config=config, quiet=True)
    assert "\n" not in str(err.value) and not (tmp_path / "store" / "zarr.json").exists()


def test_a_truncated_root_metadata_file_is_a_one_line_error(tmp_path):
    from pipeline.errors import UserError

    _store(tmp_path / "s")
    meta = tmp_path / "s" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(UserError, match=r"zarr.json is damaged \(JSONDecodeError\); extract again") as err:
        open_store(tmp_path / "s")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- #
# A damaged chunk inside a done shard, damaged array metadata (item 10)
# --------------------------------------------------------------------------- #


def _flip_byte_of_first_chunk(path, array: str, shard: int) -> None:
    target = path / "folder/train" / array / "c" / str(shard) / "0" / "0"
    raw = bytearray(target.read_bytes())
    raw[5] ^= 0xFF  # inside the shard's first chunk: the index and the last view stay readable
    target.write_bytes(bytes(raw))


def test_a_damaged_chunk_inside_a_done_shard_is_one_line_and_extract_verify_rewrites_it(extracted):
    from synthetic_data import store_arrays

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.reader import load_into_memory, open_split

    path, config = extracted
    before = store_arrays(path)
    _flip_byte_of_first_chunk(path, "features", 1)
    split = open_split(store=path, split="folder/train")  # the files are there: opening is cheap and passes
    expected = (r"folder/train: features of shard 1 is damaged \(checksum mismatch\); re-run the same "
                r"`fusioner extract` with --verify")
    for read in (lambda: load_into_memory(split),  # training in memory, evaluation
                 lambda: split.read("features", slice(0, 12), direct=True),  # training's streamed reads
                 lambda: split.features(np.array([7, 4, 0]))):  # batches of scattered views
        with pytest.raises(UserError, match=expected) as err:
            read()
        assert "\n" not in str(err.value)
    assert extract(config=config, quiet=True).shards_run == 0  # a plain resume only checks each shard's last view
    assert extract(config=replace(config, verify=True), quiet=True).shards_run == 1
    after = store_arrays(path)
    for name in before:
        assert np.array_equal(before[name].view(np.uint8), after[name].view(np.uint8)), name
    load_into_memory(open_split(store=path, split="folder/train"))


@pytest.mark.parametrize("junk", ["garbage{{", '{"zarr_format": 3, "node_type": "array"}', "null"])
@pytest.mark.parametrize("array", ["features", "masks"])
def test_damaged_array_metadata_is_one_line_naming_the_file_and_extract_rewrites_it(extracted, junk, array):
    from synthetic_data import store_arrays

    from pipeline.encode.extract import extract
    from pipeline.errors import UserError
    from pipeline.store.info import describe_store
    from pipeline.store.reader import open_split

    path, config = extracted
    before = store_arrays(path)
    meta = path / "folder/train" / array / "zarr.json"
    meta.write_text(junk)
    for command in (lambda: describe_store(path), lambda: open_split(store=path, split="folder/train")):
        with pytest.raises(UserError, match=rf"{meta} is damaged \(\w+\); re-run the same `fusioner extract` for "
                                            rf"folder/train") as err:
            command()
        assert "\n" not in str(err.value)
    report = extract(config=config, quiet=True)
    assert report.shards_skipped == 0 and report.shards_run == 5  # the split planned and written again
    after = store_arrays(path)
    for name in before:
        assert np.array_equal(before[name].view(np.uint8), after[name].view(np.uint8)), name
    assert "folder/train" in describe_store(path)["splits"]


# --------------------------------------------------------------------------- #
# A read-only --out, a full disk (item 10)
# --------------------------------------------------------------------------- #


def _failing_writes(monkeypatch, error: OSError, when=lambda path: True) -> None:
    """Every write of a chunk or metadata file for which ``when(path)`` holds raises ``error``, as the OS would."""
    from zarr.storage import _local

    put = _local._put

    def refuse(path, value, exclusive=False):
        if when(str(path)):
            raise type(error)(error.errno, error.strerror, str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(_local, "_put", refuse)


@pytest.mark.parametrize(("error", "when", "message"), [
    (PermissionError(13, "Permission denied"), lambda path: True, r"permission denied: .*zarr.json \(Permission denied\)"),
    (OSError(28, "No space left on device"), lambda path: "/features/c/2/" in path,
     r"no space left on the device writing .*features/c/2/0/0; free some space and run the same command again"),
])
def test_a_read_only_out_or_a_full_disk_is_one_line_and_the_rerun_gives_the_same_store(
        extracted, tmp_path, monkeypatch, capsys, error, when, message):
    from synthetic_data import assert_same_store

    from pipeline.encode.extract import extract
    from pipeline.errors import run_entry

    reference, config = extracted
    config = replace(config, out=str(tmp_path / "again"))
    with monkeypatch.context() as patch:
        _failing_writes(patch, error, when)
        code = run_entry(lambda: extract(config=config, quiet=True))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.match(rf"error: {message}", err), err
    report = extract(config=config, quiet=True)  # the cause fixed, the same command
    assert report.shards_run + report.shards_skipped == 5
    assert_same_store(reference, tmp_path / "again")


@pytest.mark.reliability
def test_a_file_size_limit_during_extraction_is_one_line_and_the_rerun_gives_the_same_store(
        extracted, tmp_path, capsys):
    """A real EFBIG from the OS (``ulimit -f``), raised by a soft limit held while the store is written."""
    import resource

    from synthetic_data import assert_same_store

    from pipeline.encode.extract import extract
    from pipeline.errors import run_entry

    reference, config = extracted
    config = replace(config, out=str(tmp_path / "again"))
    feature_shard = (reference / "folder/train/features/c/0/0/0").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (feature_shard // 2, hard))  # the soft limit only: raised back below
    try:
        code = run_entry(lambda: extract(config=config, quiet=True))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.match(r"error: file too large writing .*ulimit -f.*run the same command again", err), err
    extract(config=config, quiet=True)  # the limit raised, the same command
    assert_same_store(reference, tmp_path / "again")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_really_read_only_out_is_one_line(extracted, tmp_path, capsys):
    from pipeline.encode.extract import extract
    from pipeline.errors import run_entry

    _, config = extracted
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    try:
        code = run_entry(lambda: extract(config=replace(config, out=str(folder / "store")), quiet=True))
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: permission denied") and len(err.strip().splitlines()) == 1, err


def test_a_finished_store_holds_zarr_nodes_only_and_plain_zarr_lists_it_without_warnings(extracted):
    import subprocess
    import sys

    from pipeline.encode.extract import extract

    path, config = extracted
    extract(config=config, quiet=True)  # a second writer into the finished store (all shards done)
    assert not (path / ".writer.lock").exists()
    script = ("import sys, warnings, zarr; warnings.simplefilter('error'); "
              "print(len(list(zarr.open_group(sys.argv[1], mode='r').members(max_depth=None))))")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_creating_a_store_keeps_its_writer_lock(tmp_path):
    from pipeline.errors import UserError
    from pipeline.store.layout import open_or_create_store, store_identity, writer_lock

    path = tmp_path / "store"
    identity = store_identity(encoder="clip-b", weights={}, input_size=32, grid=(2, 2), vision_dim=8,
                              text_dim=None, mean=(0, 0, 0), std=(1, 1, 1))
    with writer_lock(path):
        open_or_create_store(path, identity=identity)
        with pytest.raises(UserError, match="is being written by pid"):
            with writer_lock(path):
                pass
    assert sorted(p.name for p in path.iterdir()) == ["zarr.json"]


def test_a_split_made_before_source_classes_opens_verifies_and_falls_back_to_the_views_classes(extracted):
    import shutil

    from pipeline.encode.extract import extract
    from pipeline.store.layout import consolidate, open_store
    from pipeline.store.reader import open_split
    from pipeline.training.batches import image_pairs

    path, config = extracted
    shutil.rmtree(path / "folder/train/source_classes")  # what a store of format 1.0 looks like
    consolidate(open_store(path, mode="r+"), splits=["folder/train"])
    split = open_split(store=path, split="folder/train")
    assert split.source_classes is None
    seen = tuple(range(1, len(split.class_names) + 1))
    assert image_pairs(split=split, seen=seen, classes_per_sample="1")  # the union over the views
    assert extract(config=replace(config, verify=True), quiet=True).shards_run == 0  # nothing taken for lost
