"""One split of a store: its planned views, its arrays, its shards and their done markers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from pipeline.data.labels import IGNORE
from pipeline.errors import UserError
from pipeline.runtime import now_iso
from pipeline.store.fastread import read_rows
from pipeline.store.layout import consolidate

# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


@dataclass
class SplitPlan:
    """Everything about a split's views that is known before any pixel is decoded."""

    dataset: str
    split: str
    kind: str  # "views" (augmented training views), "windows" (sliding), "resize"
    image_ids: list[str]
    image_hw: np.ndarray  # [M, 2]
    view_image: np.ndarray  # [N]
    view_box: np.ndarray  # [N, 4]
    view_flip: np.ndarray  # [N]
    view_jitter: np.ndarray  # [N, 4]
    class_names: list[str]
    shard_size: int
    meta: dict = field(default_factory=dict)  # dataset description, seed, views, stride, ...
    view_order: np.ndarray | None = None  # [N] image-major plan row of each view, when written shuffled

    @property
    def group_path(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def num_views(self) -> int:
        return int(self.view_image.shape[0])

    def signature(self) -> dict:
        """What must agree for a resumed run to continue this split."""
        return {"kind": self.kind, "num_views": self.num_views, "shard_size": self.shard_size,
                "image_ids_hash": _hash_list(self.image_ids), "meta": self.meta}


def _hash_list(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _array(group, name, *, shape, dtype, chunks, shards=None, compress=False, fill_value=0, dims=None):
    codecs = [ZstdCodec(level=1), Crc32cCodec()] if compress else [Crc32cCodec()]
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                              compressors=codecs, fill_value=fill_value, dimension_names=dims)


def create_split(root: zarr.Group, *, plan: SplitPlan, tokens: int, dim: int, input_size: int) -> zarr.Group:
    """Create (or reopen, when the plan matches) the arrays of one split."""
    path = plan.group_path
    if path in root:
        group = root[path]
        old = group.attrs.get("signature")
        if old is None:
            # The signature is written last: a run killed while creating the split left
            # arrays without it and no shard marked done, so nothing here is worth keeping.
            del root[path]
        elif split_metadata_error(group) is not None:
            import sys

            print(f"note: {path}: the metadata of its arrays is damaged; planning the split again", file=sys.stderr)
            del root[path]
        elif old != jsonable(plan.signature()):
            raise UserError(
                f"store already holds {path} planned differently (views, seed, images or shard size "
                f"differ); use another `out` or `overwrite`"
            )
        else:
            consolidate(root, splits=[path])  # a kill may have come before the last consolidation
            return group
    group = root.require_group(path)
    n, s, k = plan.num_views, plan.shard_size, max(len(plan.class_names), 1)
    n_shards = -(-n // s)
    _array(group, "features", shape=(n, tokens, dim), dtype="float16", chunks=(1, tokens, dim),
           shards=(s, tokens, dim), dims=("view", "token", "channel"))
    _array(group, "masks", shape=(n, input_size, input_size), dtype="uint8",
           chunks=(1, input_size, input_size), shards=(s, input_size, input_size), compress=True,
           fill_value=IGNORE, dims=("view", "y", "x"))
    _array(group, "view_classes", shape=(n, k), dtype="bool", chunks=(s, k), compress=True,
           fill_value=False, dims=("view", "class_name"))
    _array(group, "source_classes", shape=(n, k), dtype="bool", chunks=(s, k), compress=True,
           fill_value=False, dims=("view", "class_name"))
    _array(group, "view_valid", shape=(n,), dtype="bool", chunks=(s,), fill_value=False, dims=("view",))
    _array(group, "shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,), dims=("shard",))
    for name, data, dims in (
        ("view_image", plan.view_image.astype(np.int32), ("view",)),
        ("view_box", plan.view_box.astype(np.int32), ("view", "xyxy")),
        ("view_flip", plan.view_flip.astype(bool), ("view",)),
        ("view_jitter", plan.view_jitter.astype(np.float32), ("view", "bcsh")),
        ("image_hw", plan.image_hw.astype(np.int32), ("image_id", "hw")),
    ) + ((("view_order", plan.view_order.astype(np.int32), ("view",)),) if plan.view_order is not None else ()):
        arr = _array(group, name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                     compress=True, dims=dims)
        arr[...] = data
    _coordinates(group, names=plan.class_names, k=k, image_ids=plan.image_ids)
    group.attrs.update(jsonable({
        "dataset": plan.dataset, "split": plan.split, "kind": plan.kind,
        "class_names": plan.class_names, "image_ids": plan.image_ids, "shard_size": s,
        "num_views": n, "num_images": len(plan.image_ids), "meta": plan.meta,
        "signature": plan.signature(), "created": now_iso(),
    }))
    consolidate(root, splits=[path])  # only now, complete: its arrays never change after this
    return group


def _coordinates(group: zarr.Group, *, names: list[str], k: int, image_ids: list[str]) -> None:
    """Class names and image ids as arrays named after their axes: xarray's ``ds.sel(class_name="cat")``."""
    for name, values in (("class_name", (list(names) + [""] * k)[:k]), ("image_id", list(image_ids))):
        data = np.array([str(v) for v in values], dtype=object)
        arr = group.create_array(name, shape=data.shape, dtype=str, chunks=data.shape or (1,),
                                 compressors=[ZstdCodec(level=1), Crc32cCodec()], dimension_names=(name,))
        if data.size:
            arr[...] = data


def jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def shard_bounds(group: zarr.Group, shard: int) -> tuple[int, int]:
    size = int(group.attrs["shard_size"])
    n = int(group.attrs["num_views"])
    return shard * size, min((shard + 1) * size, n)


def num_shards(group: zarr.Group) -> int:
    return int(group["shard_done"].shape[0])


def done_shards(group: zarr.Group) -> np.ndarray:
    return np.asarray(group["shard_done"][:], dtype=bool)


def _clear_shard(group: zarr.Group, *, shard: int) -> None:
    """Delete what an interrupted run left of a shard that is not marked done.

    Zarr merges every write into the shard file already stored (it reads and
    decodes it first), so a truncated or damaged leftover would make the rewrite
    fail its checksum and the shard could never be resumed. Its bytes are
    worthless by definition, so the rewrite starts from nothing.
    """
    for name in shard_arrays(group):
        array = group[name]
        sync(array.store.delete(_shard_key(array, shard)))


SHARD_ARRAYS = ("features", "masks", "view_classes", "source_classes", "view_valid")


def shard_arrays(group: zarr.Group) -> tuple[str, ...]:
    """The per-shard arrays this split has (``source_classes`` came with format 1.1: older splits lack it)."""
    has_source = sync(group.store.exists(f"{group.path}/source_classes/zarr.json"))  # its file, damaged or not
    return tuple(name for name in SHARD_ARRAYS if name != "source_classes" or has_source)


def _shard_key(array, shard: int) -> str:
    coords = (shard,) + (0,) * (array.ndim - 1)  # shards and per-shard chunks both start at view shard*S
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def read_whole(group: zarr.Group, name: str) -> np.ndarray:
    """A split's small array read whole (plan arrays, ``view_classes``); a chunk failing its checksum
    or a lost file is one line naming it and the command that writes it again."""
    try:
        return np.asarray(group[name][:])
    except (ValueError, OSError) as err:
        reason = "checksum mismatch" if "checksum" in str(err).lower() else type(err).__name__
        raise UserError(f"{group.store} {group.path}: {name} is damaged ({reason}); re-run the same "
                        f"`fusioner extract` with --verify to write it again") from None


def shard_file_problem(array, shard: int) -> str | None:
    """Why ``array``'s file of a written shard cannot be read ("missing", "empty (0 bytes)"), else None.

    Zarr reads a missing shard file as its fill value and an empty one as fill or an OS error, so
    every read of a written shard asks this first: lost features never pass as zeros.
    """
    key = _shard_key(array, shard)
    root = getattr(array.store, "root", None)
    if root is None:
        return None if sync(array.store.exists(key)) else "missing"
    try:
        size = os.stat(Path(root) / key).st_size
    except FileNotFoundError:
        return "missing"
    return "empty (0 bytes)" if size == 0 else None


def write_shard(group: zarr.Group, *, shard: int, features: np.ndarray, masks: np.ndarray,
                classes: np.ndarray, valid: np.ndarray, source: np.ndarray | None = None) -> None:
    """Write one whole shard, then mark it done (the marker goes last).

    Every file of the shard is written even when it holds only the fill value (Zarr skips
    those by default), so a done shard whose file is missing is known to be lost.
    """
    start, stop = shard_bounds(group, shard)
    assert features.shape[0] == stop - start, (features.shape, start, stop)
    _clear_shard(group, shard=shard)
    with zarr.config.set({"array.write_empty_chunks": True}):
        group["features"][start:stop] = features.astype(np.float16, copy=False)
        group["masks"][start:stop] = masks
        group["view_classes"][start:stop] = classes
        group["view_valid"][start:stop] = valid
        if "source_classes" in group:
            group["source_classes"][start:stop] = source if source is not None else classes
    group["shard_done"][shard] = 1


def lost_shards(group: zarr.Group, *, deep: bool = False, full: bool = False) -> list[int]:
    """Shards marked done whose files are gone (or, with ``deep``, whose last view fails to decode;
    with ``full``, any of whose chunks fails its checksum).

    Zarr reads a missing or empty file as fill values: without this check such a shard would pass
    as zero features and all-ignore masks. ``deep`` also reads each done shard's index and last
    view, so a truncated shard file is found too (extract's resume uses it); ``full`` reads
    every byte of every done shard (``extract --verify``: as long as reading the whole split).
    """
    arrays = {name: group[name] for name in shard_arrays(group)}
    lost = []
    for shard in np.flatnonzero(done_shards(group)):
        shard = int(shard)
        start, stop = shard_bounds(group, shard)
        if any(shard_file_problem(a, shard) for a in arrays.values()):
            lost.append(shard)
            continue
        try:
            if full:
                for array in arrays.values():
                    read_rows(array, start, stop)
            elif deep:
                for name in ("features", "masks"):
                    arrays[name][stop - 1]
        except Exception:  # noqa: BLE001 - any failure to decode means the shard must be written again
            lost.append(shard)
    return lost


def list_splits(root: zarr.Group) -> list[str]:
    """Group paths of every split in the store, e.g. ``["coco/train", "voc/val"]``.

    A split whose metadata is damaged (a ``zarr.json`` overwritten with junk) is one line naming
    the file, never a traceback from inside zarr nor a split that silently vanishes.
    """
    out = []
    try:
        for name, child in root.groups():
            if name == "text":
                continue
            for sub, grand in child.groups():
                if "features" in grand:
                    out.append(f"{name}/{sub}")
        problems = [split_metadata_error(root[path]) for path in out]
    except Exception as err:  # noqa: BLE001 - zarr raises what its parsers raise (JSON, validation, Type)
        raise damaged_metadata(root, err) from None
    base = _local_root(root)
    vanished = base is not None and any("/".join(meta.parts[-4:-2]) not in out
                                        for meta in base.glob("*/*/features/zarr.json"))
    if vanished or any(problems):  # a features array zarr does not see as one, or another array that fails
        raise damaged_metadata(root, next((p for p in problems if p), None))
    return sorted(out)


def _local_root(root: zarr.Group):
    from pathlib import Path

    store_root = getattr(root.store, "root", None)
    return Path(str(store_root)) / root.path if store_root is not None else None


def _metadata_error(meta) -> Exception | None:
    """What goes wrong opening the node ``meta`` (a ``zarr.json``) describes, or None."""
    try:
        node = zarr.open(str(meta.parent), mode="r")
        if isinstance(node, zarr.Array):
            node.metadata.data_type  # noqa: B018 - parsed in full
    except Exception as err:  # noqa: BLE001
        return err
    return None


def damaged_metadata(root: zarr.Group, err: Exception | None) -> UserError:
    """The one-line error for a store whose split metadata does not parse, naming the first bad file."""
    base = _local_root(root)
    found = None
    if base is not None:
        for meta in [m for depth in ("*/*/*", "*/*", "*") for m in sorted(base.glob(f"{depth}/zarr.json"))]:
            problem = _metadata_error(meta)
            if problem is not None:
                found, err = meta, problem
                break
    where = str(found) if found is not None else f"a zarr.json under {base or root.store}"
    parts = found.relative_to(base).parts[:-1] if found is not None else ()
    split = "/".join(parts[:2]) if len(parts) >= 2 else "that split"
    return UserError(f"{where} is damaged ({type(err).__name__ if err else 'unreadable'}); re-run the same "
                     f"`fusioner extract` for {split} to write it again (or extract into another `out`)")


def split_metadata_error(group: zarr.Group) -> Exception | None:
    """Why one of a split's arrays cannot be opened from its own ``zarr.json``, or None when all open.

    Each array's own file is read, not the split's consolidated copy (which a complete split
    carries for xarray): a damaged file is damage even while that copy hides it from zarr.
    """
    for name in (*shard_arrays(group), "shard_done", "view_image", "view_box", "view_flip", "view_jitter", "image_hw"):
        try:
            zarr.open_array(store=group.store, path=f"{group.path}/{name}", mode="r").metadata.data_type  # noqa: B018
        except Exception as err:  # noqa: BLE001 - zarr raises what its parsers raise
            return err
    return None


def match_split(names: list[str], name: str) -> str | None:
    """``name`` among the split paths ``names``: exactly, or a bare ``train`` naming the one ``*/train``."""
    if name in names:
        return name
    if "/" not in name:
        endings = [n for n in names if n.split("/")[-1] == name]
        if len(endings) == 1:
            return endings[0]
    return None


def resolve_split(root: zarr.Group, name: str, *, names: list[str] | None = None) -> str:
    """The split path ``name`` stands for (``train`` is ``folder/train`` when that is the only ``train``).

    ``names``: what :func:`list_splits` gave for ``root`` just before, so its checks of every array
    are not made again.
    """
    names = list_splits(root) if names is None else names
    found = match_split(names, name)
    if found is None:
        endings = [n for n in names if n.split("/")[-1] == name]
        hint = f"'{name}' is ambiguous: " if len(endings) > 1 else ""
        raise UserError(f"store has no split '{name}' ({hint}it has: {', '.join(names) or 'none'})")
    return found


def repair_lost_shards(group: zarr.Group, *, quiet: bool = False, verify: bool = False) -> list[int]:
    """Mark lost or undecodable done shards as not done, so this extraction writes them again
    (``verify``: every chunk of every done shard is checked, see :func:`lost_shards`)."""
    import sys

    lost = lost_shards(group, deep=True, full=verify)
    for shard in lost:
        group["shard_done"][shard] = 0
    if lost and not quiet:
        print(f"note: {group.path}: {len(lost)} written shard(s) were missing or unreadable "
              f"(first: shard {lost[0]}); writing them again", file=sys.stderr)
    return lost
