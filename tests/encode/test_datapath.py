"""The GPU-feeding extraction path: a pool of render processes, several writers, the shuffled layout."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from synthetic_data import assert_same_store, tiny_extract_config, write_folder_dataset

from pipeline.encode.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("datapath") / "data")


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "store"
    extract(config=tiny_extract_config(data, out, vision_only=True, writers=1), quiet=True)
    return out


@pytest.mark.processes
def test_render_processes_and_several_writers_write_the_same_bytes(data, plain, tmp_path):
    out = tmp_path / "pool"
    report = extract(config=tiny_extract_config(data, out, vision_only=True, render_workers=2, writers=3), quiet=True)
    assert report.shards_run == zarr.open_group(str(plain))["folder/train/shard_done"].shape[0]
    assert_same_store(plain, out)


def test_shuffled_layout_holds_the_same_views_in_a_recorded_order(data, plain, tmp_path):
    out = tmp_path / "shuffled"
    extract(config=tiny_extract_config(data, out, vision_only=True, layout="shuffled", shard_size=None), quiet=True)
    shuffled, image_major = zarr.open_group(str(out), mode="r")["folder/train"], \
        zarr.open_group(str(plain), mode="r")["folder/train"]
    order = shuffled["view_order"][...]
    n = image_major["features"].shape[0]
    assert sorted(order.tolist()) == list(range(n)) and not np.array_equal(order, np.arange(n))
    assert shuffled.attrs["meta"]["layout"] == "shuffled" and "layout" not in image_major.attrs["meta"]
    assert int(shuffled.attrs["shard_size"]) == n  # 128 MiB shards hold this tiny split whole
    for name in ("view_image", "view_box", "view_flip", "masks", "view_classes"):
        assert np.array_equal(shuffled[name][...], image_major[name][...][order]), name
    assert np.array_equal(shuffled["features"][...].view(np.uint16),
                          image_major["features"][...][order].view(np.uint16))
    again = extract(config=tiny_extract_config(data, out, vision_only=True, layout="shuffled", shard_size=None),
                    quiet=True)
    assert again.shards_run == 0  # the shuffled plan is stable: a re-run resumes it


def test_shuffled_store_reads_with_plain_dask(data, tmp_path):
    da = pytest.importorskip("dask.array")
    out = tmp_path / "x"
    extract(config=tiny_extract_config(data, out, vision_only=True, layout="shuffled"), quiet=True)
    group = zarr.open_group(str(out), mode="r")["folder/train"]
    order = da.from_zarr(str(out), component="folder/train/view_order").compute()
    feats = da.from_zarr(str(out), component="folder/train/features")
    assert np.array_equal(order, group["view_order"][...])
    assert np.array_equal(feats[:5].compute().view(np.uint16), group["features"][:5].view(np.uint16))
