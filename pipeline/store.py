"""The feature store: a plain Zarr v3 hierarchy that describes itself.

Layout (``docs/store.md`` walks through it)::

    <store>/                       attrs["fusioner"]: format, encoder, weights, sizes, versions
      text/                        prompt-averaged class embeddings (if the encoder has text)
        embeddings  [C, Dt] f32    attrs: names, templates, encoder
      <dataset>/<split>/           one group per dataset split; attrs: plan, dataset, image ids
        features    [N, h*w, D] f16   chunk = 1 view, shard = S views
        masks       [N, S_in, S_in] u8 label mask of each view (0 bg, k class, 255 ignore)
        view_image  [N] i32           image index of each view
        view_box    [N, 4] i32        (x0, y0, x1, y1) of the view in the original image
        view_flip   [N] bool
        view_jitter [N, 4] f32        brightness, contrast, saturation, hue
        view_classes[N, K] bool       classes present in each view's mask
        view_valid  [N] bool          False for views of images skipped as bad
        image_hw    [M, 2] i32
        shard_done  [n_shards] u8     1 once a shard's data is completely written

Every array chunk carries a CRC32C checksum, so a damaged chunk fails to
decode instead of being read as numbers. Data of a shard is read as valid only
once ``shard_done`` says so: a run killed while writing a shard leaves it
marked 0 and the next run writes it again. Each writer owns whole shards.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from pipeline.errors import UserError

FORMAT_VERSION = 1
ATTR_KEY = "fusioner"


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("fusioner", "torch", "open_clip_torch", "timm", "transformers", "zarr", "numpy"):
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- #
# Root
# --------------------------------------------------------------------------- #


def store_identity(*, encoder: str, weights: dict, input_size: int, grid: tuple[int, int] | None,
                   vision_dim: int | None, text_dim: int | None, mean, std) -> dict:
    """The attributes two runs must share to write into one store."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "weights": weights,
        "pretrained": bool(weights.get("pretrained")),
        "input_size": input_size,
        "grid": list(grid) if grid else None,
        "vision_dim": vision_dim,
        "text_dim": text_dim,
        "mean": list(mean),
        "std": list(std),
    }


_IDENTITY_KEYS = ("format_version", "encoder", "weights", "input_size", "grid", "vision_dim", "text_dim")


def open_or_create_store(path: str | Path, *, identity: dict, overwrite: bool = False) -> zarr.Group:
    """Open ``path`` for appending, refusing a store made differently, or create it."""
    path = Path(path)
    if overwrite and path.exists():
        shutil.rmtree(path)
    if path.exists() and any(path.iterdir()):
        root = open_store(path, mode="r+")
        existing = root.attrs[ATTR_KEY]
        for key in _IDENTITY_KEYS:
            if existing.get(key) != identity.get(key):
                raise UserError(
                    f"{path} was made with {key}={existing.get(key)!r}, this run has "
                    f"{identity.get(key)!r}; use another --out or --overwrite to start over"
                )
        return root
    path.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs[ATTR_KEY] = {**identity, "created": now_iso(), "versions": package_versions()}
    return root


def open_store(path: str | Path, *, mode: str = "r") -> zarr.Group:
    """Open an existing Fusioner store, with a one-line error if it is not one."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"no feature store at {path} (run `fusioner extract ... --out {path}` first)")
    root = zarr.open_group(str(path), mode=mode)
    attrs = root.attrs.asdict()
    if ATTR_KEY not in attrs:
        raise UserError(f"{path} is a Zarr group but not a Fusioner store")
    version = attrs[ATTR_KEY].get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has store format {version}, this Fusioner reads format {FORMAT_VERSION}")
    return root


def store_attrs(root: zarr.Group) -> dict:
    return dict(root.attrs[ATTR_KEY])


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


def write_text(root: zarr.Group, *, names: list[str], embeddings: np.ndarray, meta: dict) -> None:
    """Store (or extend) the class-name embeddings; existing names keep their rows."""
    old_names, old_emb = read_text(root) if "text" in root else ([], None)
    keep = [i for i, n in enumerate(names) if n not in set(old_names)]
    all_names = old_names + [names[i] for i in keep]
    new = embeddings[keep].astype(np.float32)
    table = new if old_emb is None else np.concatenate([old_emb, new])
    group = root.require_group("text")
    if "embeddings" in group:
        del group["embeddings"]
    arr = group.create_array("embeddings", shape=table.shape, dtype="float32", chunks=table.shape,
                             compressors=[Crc32cCodec()], dimension_names=("class", "channel"))
    arr[:] = table
    group.attrs.update({**meta, "names": all_names, "updated": now_iso()})


def read_text(root: zarr.Group) -> tuple[list[str], np.ndarray]:
    if "text" not in root:
        raise UserError(f"store {root.store} holds no text embeddings (extract with a text encoder)")
    group = root["text"]
    return list(group.attrs["names"]), np.asarray(group["embeddings"][:], dtype=np.float32)


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
        elif old != _jsonable(plan.signature()):
            raise UserError(
                f"store already holds {path} planned differently (views, seed, images or shard size "
                f"differ); use another --out or --overwrite"
            )
        else:
            return group
    group = root.require_group(path)
    n, s, k = plan.num_views, plan.shard_size, max(len(plan.class_names), 1)
    n_shards = -(-n // s)
    _array(group, "features", shape=(n, tokens, dim), dtype="float16", chunks=(1, tokens, dim),
           shards=(s, tokens, dim), dims=("view", "token", "channel"))
    _array(group, "masks", shape=(n, input_size, input_size), dtype="uint8",
           chunks=(1, input_size, input_size), shards=(s, input_size, input_size), compress=True,
           fill_value=255, dims=("view", "y", "x"))
    _array(group, "view_classes", shape=(n, k), dtype="bool", chunks=(s, k), compress=True,
           fill_value=False, dims=("view", "class"))
    _array(group, "view_valid", shape=(n,), dtype="bool", chunks=(s,), fill_value=False, dims=("view",))
    _array(group, "shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,), dims=("shard",))
    for name, data, dims in (
        ("view_image", plan.view_image.astype(np.int32), ("view",)),
        ("view_box", plan.view_box.astype(np.int32), ("view", "xyxy")),
        ("view_flip", plan.view_flip.astype(bool), ("view",)),
        ("view_jitter", plan.view_jitter.astype(np.float32), ("view", "bcsh")),
        ("image_hw", plan.image_hw.astype(np.int32), ("image", "hw")),
    ):
        arr = _array(group, name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                     compress=True, dims=dims)
        arr[...] = data
    group.attrs.update(_jsonable({
        "dataset": plan.dataset, "split": plan.split, "kind": plan.kind,
        "class_names": plan.class_names, "image_ids": plan.image_ids, "shard_size": s,
        "num_views": n, "num_images": len(plan.image_ids), "meta": plan.meta,
        "signature": plan.signature(), "created": now_iso(),
    }))
    return group


def _jsonable(obj: Any) -> Any:
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
    for name in ("features", "masks", "view_classes", "view_valid"):
        array = group[name]
        coords = (shard,) + (0,) * (array.ndim - 1)  # shards and per-shard chunks both start at view shard*S
        sync(array.store.delete(f"{array.path}/{array.metadata.encode_chunk_key(coords)}"))


def write_shard(group: zarr.Group, *, shard: int, features: np.ndarray, masks: np.ndarray,
                classes: np.ndarray, valid: np.ndarray) -> None:
    """Write one whole shard, then mark it done (the marker goes last)."""
    start, stop = shard_bounds(group, shard)
    assert features.shape[0] == stop - start, (features.shape, start, stop)
    _clear_shard(group, shard=shard)
    group["features"][start:stop] = features.astype(np.float16, copy=False)
    group["masks"][start:stop] = masks
    group["view_classes"][start:stop] = classes
    group["view_valid"][start:stop] = valid
    group["shard_done"][shard] = 1


def list_splits(root: zarr.Group) -> list[str]:
    """Group paths of every split in the store, e.g. ``["coco/train", "voc/val"]``."""
    out = []
    for name, child in root.groups():
        if name == "text":
            continue
        for sub, grand in child.groups():
            if "features" in grand:
                out.append(f"{name}/{sub}")
    return sorted(out)


def open_split(root: zarr.Group, path: str) -> zarr.Group:
    if path not in root or "features" not in root[path]:
        known = ", ".join(list_splits(root)) or "none"
        raise UserError(f"store has no split '{path}' (it has: {known})")
    return root[path]


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_store(path: str | Path) -> dict:
    """Counts, sizes and attributes for ``fusioner info``."""
    path = Path(path)
    root = open_store(path)
    attrs = store_attrs(root)
    info = {"path": str(path), **attrs, "bytes": _dir_size(path), "splits": {}}
    if "text" in root:
        names, emb = read_text(root)
        info["text"] = {"classes": len(names), "dim": int(emb.shape[1]),
                        "encoder": root["text"].attrs.get("encoder"),
                        "templates": len(root["text"].attrs.get("templates", []))}
    for split in list_splits(root):
        group = root[split]
        done = done_shards(group)
        valid = np.asarray(group["view_valid"][:])
        feats = group["features"]
        info["splits"][split] = {
            "kind": group.attrs["kind"],
            "images": int(group.attrs["num_images"]),
            "views": int(group.attrs["num_views"]),
            "shards_done": f"{int(done.sum())}/{done.size}",
            "complete": bool(done.all()),
            "skipped_views": int((~valid).sum()) if done.all() else None,
            "features": f"{list(feats.shape)} {feats.dtype}",
            "bytes": _dir_size(path / split),
            "bytes_per_view": _dir_size(path / split) // max(int(group.attrs["num_views"]), 1),
            "classes": len(group.attrs["class_names"]),
            "skipped": group.attrs.get("skipped", []),
        }
    return info
