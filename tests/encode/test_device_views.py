"""Extraction with the augmentation on the encoder's device: recorded, resumable, refused when switched."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import zarr
from synthetic_data import assert_same_store, store_arrays, tiny_extract_config, write_folder_dataset

from pipeline.data.augment import AugmentConfig
from pipeline.data.labels import IGNORE
from pipeline.encode.extract import extract
from pipeline.errors import UserError

pytest.importorskip("kornia")
pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")
GPU = AugmentConfig(backend="gpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("device-views") / "data")


@pytest.fixture(scope="module")
def on_device(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("on-device") / "store"
    extract(config=tiny_extract_config(data, out, vision_only=True, augment=GPU), quiet=True)
    return out


def test_the_store_records_the_backend_and_holds_valid_views(on_device, data, tmp_path):
    group = zarr.open_group(str(on_device), mode="r")["folder/train"]
    assert group.attrs["meta"]["augment"]["backend"] == "gpu"
    arrays = store_arrays(on_device)
    assert arrays["view_valid"].all() and arrays["shard_done"].all()
    labels = set(np.unique(arrays["masks"]).tolist())
    assert labels <= {0, 1, 2, 3, IGNORE} and len(labels - {0, IGNORE}) > 0
    counted = np.stack([np.isin(np.arange(1, arrays["view_classes"].shape[1] + 1), np.unique(m))
                        for m in arrays["masks"]])
    assert np.array_equal(arrays["view_classes"], counted)  # the writer counted the device views' classes
    cpu = tmp_path / "cpu"
    extract(config=tiny_extract_config(data, cpu, vision_only=True), quiet=True)
    assert "backend" not in zarr.open_group(str(cpu), mode="r")["folder/train"].attrs["meta"]["augment"]
    assert not np.array_equal(store_arrays(cpu)["masks"], arrays["masks"])  # another renderer, other views


def test_a_device_extraction_is_reproducible_and_resumes_only_with_the_same_backend(on_device, data, tmp_path):
    again = tmp_path / "again"
    extract(config=tiny_extract_config(data, again, vision_only=True, augment=GPU), quiet=True)
    assert_same_store(on_device, again)  # the same pixels on the same kind of device
    resumed = extract(config=tiny_extract_config(data, again, vision_only=True, augment=GPU), quiet=True)
    assert resumed.shards_run == 0
    with pytest.raises(UserError, match="planned differently"):
        extract(config=tiny_extract_config(data, again, vision_only=True), quiet=True)  # cpu views on gpu ones
    cpu = tmp_path / "cpu"
    extract(config=tiny_extract_config(data, cpu, vision_only=True), quiet=True)
    with pytest.raises(UserError, match="planned differently"):
        extract(config=tiny_extract_config(data, cpu, vision_only=True, augment=GPU), quiet=True)


@pytest.mark.processes
def test_render_processes_decode_for_the_device_with_the_same_bytes(on_device, data, tmp_path):
    out = tmp_path / "pool"
    extract(config=tiny_extract_config(data, out, vision_only=True, augment=GPU, render_workers=2), quiet=True)
    assert_same_store(on_device, out)


def test_the_switch_without_kornia_is_one_line_naming_the_extra(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    with pytest.raises(UserError, match=r"fusioner\[gpu-augment\]") as err:
        extract(config=tiny_extract_config(data, tmp_path / "x", vision_only=True, augment=GPU), quiet=True)
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


def test_the_command_line_switch(data, tmp_path):
    import cli

    common = ["extract", "--backbone", "test-vit", "--dataset", "folder", "--data-root", str(data), "--input-size",
              "32", "--random-init", "--vision-only", "--device", "cpu", "--views", "2", "--quiet"]
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--augment-backend", "tpu"]) == 2
    assert not (tmp_path / "bad").exists()
    assert cli.main([*common, "--out", str(tmp_path / "s"), "--augment-backend", "gpu"]) == 0
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["folder/train"].attrs["meta"]["augment"]["backend"] == "gpu"
