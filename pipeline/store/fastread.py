"""Contiguous rows of a sharded array, read straight from its shard files.

zarr-python decodes a shard's inner chunks one asyncio task at a time: for a
whole shard of hundreds of one-view chunks that runs at a tenth of the disk's
sequential speed (``docs/benchmarks.md``). The store's sharded arrays use one
fixed codec chain, which the Zarr v3 sharding specification lays out plainly:
the encoded inner chunks one after another, then an index of (offset, length)
per chunk as little-endian uint64 with a CRC32C of its own; each inner chunk is
the raw little-endian bytes (zstd-compressed for masks) followed by its CRC32C.

:func:`read_rows` reads that layout with one sequential read per shard and
checks every checksum. Any other array (another codec chain, another store
kind, a chunk grid it does not expect) goes through zarr-python, which stays
the reference: the tests compare both on every array the store writes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from pipeline.errors import UserError

_EMPTY = np.uint64(2**64 - 1)


class ChecksumMismatch(UserError, ValueError):
    """A chunk or shard index whose CRC32C does not match its bytes (a ValueError, as zarr raises;
    :class:`pipeline.store.reader.CachedSplit` turns either into a line naming the shard)."""


class ShardFileMissing(UserError, ValueError):
    """A shard file that is not there: read as fill values it would pass lost data as zeros."""


def _plan(array) -> tuple[ShardingCodec, bool] | None:
    """(sharding codec, compressed) when the fast path can read ``array``, else None."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not hasattr(array.store, "root"):
        return None
    shard = codecs[0]
    inner = [type(c) for c in shard.codecs]
    index = [type(c) for c in shard.index_codecs]
    if shard.index_location.value != "end" or index != [BytesCodec, Crc32cCodec]:
        return None
    if inner not in ([BytesCodec, Crc32cCodec], [BytesCodec, ZstdCodec, Crc32cCodec]):
        return None
    if shard.chunk_shape[0] != 1 or tuple(shard.chunk_shape[1:]) != tuple(array.shape[1:]):
        return None
    if np.dtype(array.dtype).byteorder == ">":
        return None
    return shard, inner[1] is ZstdCodec


def _checked(blob: memoryview, where: str) -> memoryview:
    from crc32c import crc32c

    body, (stored,) = blob[:-4], struct.unpack("<I", blob[-4:])
    if crc32c(body) != stored:
        raise ChecksumMismatch(f"{where}: checksum mismatch (damaged data)")
    return body


def _read_index(handle, per_shard: int, where: str) -> np.ndarray:
    size = os.fstat(handle.fileno()).st_size
    index_bytes = 16 * per_shard + 4
    if size < index_bytes:  # empty or cut short: never a seek before the file's start
        raise ChecksumMismatch(f"{where}: {size} bytes, shorter than its index (damaged data)")
    handle.seek(size - index_bytes)
    return np.frombuffer(_checked(memoryview(handle.read(index_bytes)), where), "<u8").reshape(-1, 2)


def _read_shard(array, shard_index: int, rows: range, compressed: bool) -> np.ndarray:
    """Rows ``rows`` (positions inside the shard) of one shard file.

    Uncompressed rows stored back to back come back as a strided view of the one
    buffer they were read into (no copy); the caller's gather makes them contiguous.
    """
    key = array.metadata.encode_chunk_key((shard_index,) + (0,) * (array.ndim - 1))
    path = Path(array.store.root) / array.path / key
    row_shape, dtype = tuple(array.shape[1:]), np.dtype(array.dtype).newbyteorder("<")
    out_shape = (len(rows), *row_shape)
    if not path.is_file():  # the store writes every shard file: a missing one was lost, never fill values
        raise ShardFileMissing(f"{path}: the shard file is missing")
    with open(path, "rb") as handle:
        wanted = _read_index(handle, int(array.shards[0]), str(path))[rows.start:rows.stop]
        present = wanted[:, 0] != _EMPTY
        if not present.any():
            return np.full(out_shape, array.metadata.fill_value, dtype)
        low = int(wanted[present, 0].min())
        buffer = np.empty(int((wanted[present, 0] + wanted[present, 1]).max()) - low, np.uint8)
        handle.seek(low)
        handle.readinto(memoryview(buffer))
    blob = memoryview(buffer)
    bodies = [None if offset == _EMPTY else
              _checked(blob[int(offset) - low:int(offset + length) - low], f"{path} chunk {rows.start + j}")
              for j, (offset, length) in enumerate(wanted)]
    row_bytes = dtype.itemsize * int(np.prod(row_shape))
    step = row_bytes + 4
    if not compressed and present.all() and (wanted[:, 1] == step).all() and \
            (wanted[:, 0] == wanted[0, 0] + step * np.arange(len(wanted), dtype=np.uint64)).all():
        strides = (step,) + tuple(np.cumprod((1,) + row_shape[::-1])[:-1][::-1] * dtype.itemsize)
        return np.ndarray(out_shape, dtype, buffer=buffer, offset=0, strides=strides)
    out = np.empty(out_shape, dtype)
    zstd = None
    if compressed:
        from numcodecs import Zstd

        zstd = Zstd()
    for j, body in enumerate(bodies):
        if body is None:
            out[j] = array.metadata.fill_value
        else:
            out[j] = np.frombuffer(zstd.decode(body) if zstd is not None else body, dtype).reshape(row_shape)
    return out


def read_rows(array, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]``: one sequential read per shard touched when the layout allows, zarr otherwise."""
    plan = _plan(array)
    if plan is None:
        return array[start:stop]
    _, compressed = plan
    per_shard = int(array.shards[0])
    parts, row = [], start
    while row < stop:
        shard_index, inside = divmod(row, per_shard)
        take = min(stop - row, per_shard - inside)
        parts.append(_read_shard(array, shard_index, range(inside, inside + take), compressed))
        row += take
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty((0, *array.shape[1:]), np.dtype(array.dtype))
