"""Direct shard-file reads give exactly what zarr-python gives, and refuse damaged bytes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.bench.datapath import feature_store, shard_data
from pipeline.errors import UserError
from pipeline.store.fastread import read_rows
from pipeline.store.splits import write_shard


@pytest.fixture()
def group(tmp_path):
    group = feature_store(work=tmp_path, views=10, shard=4)
    rng = np.random.default_rng(0)
    for shard in (0, 1, 2):
        count = 4 if shard < 2 else 2
        feats, masks, present = shard_data(rng, count, group)
        write_shard(group, shard=shard, features=feats, masks=masks, classes=present, valid=np.ones(count, bool))
    return group


@pytest.mark.parametrize(("start", "stop"), [(0, 10), (0, 4), (1, 3), (3, 9), (5, 6), (8, 10)])
def test_direct_reads_equal_zarr(group, start, stop):
    for name in ("features", "masks", "view_valid", "view_classes"):
        got, expected = read_rows(group[name], start, stop), group[name][start:stop]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), name


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_missing_or_empty_shard_file_is_an_error_never_fill_values(group, tmp_path, damage):
    path = tmp_path / "features" / "bench" / "train" / "features" / "c" / "1" / "0" / "0"
    path.unlink() if damage == "delete" else path.write_bytes(b"")
    fresh = zarr.open_group(str(tmp_path / "features"), mode="r")["bench/train"]
    with pytest.raises(UserError, match="missing" if damage == "delete" else "0 bytes, shorter than its index"):
        read_rows(fresh["features"], 2, 6)
    assert read_rows(fresh["features"], 8, 10).shape[0] == 2  # other shards still read


def test_a_flipped_byte_fails_the_checksum(group, tmp_path):
    path = tmp_path / "features" / "bench" / "train" / "features" / "c" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = zarr.open_group(str(tmp_path / "features"), mode="r")["bench/train"]
    with pytest.raises(UserError, match="checksum"):
        read_rows(fresh["features"], 0, 4)
    assert read_rows(fresh["features"], 8, 10).shape[0] == 2  # other shards still read
