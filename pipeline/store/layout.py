"""The feature store: a plain Zarr v3 hierarchy that describes itself.

Layout (``docs/store.md`` walks through it)::

    <store>/                       attrs["fusioner"]: format, encoder, weights, sizes, versions
      text/                        prompt-averaged class embeddings (if the encoder has text)
        embeddings-<v> [C, Dt] f32 attrs: names, table (the array's name), templates, encoder
      <dataset>/<split>/           one group per dataset split; attrs: plan, dataset, image ids
        features    [N, h*w, D] f16   chunk = 1 view, shard = S views
        masks       [N, S_in, S_in] u8 label mask of each view (0 bg, k class, 255 ignore)
        view_image  [N] i32           image index of each view
        view_box    [N, 4] i32        (x0, y0, x1, y1) of the view in the original image
        view_flip   [N] bool
        view_jitter [N, 4] f32        brightness, contrast, saturation, hue
        view_classes[N, K] bool       classes present in each view's mask
        source_classes[N, K] bool     classes present in the whole image each view was rendered from
        view_valid  [N] bool          False for views of images skipped as bad
        image_hw    [M, 2] i32
        shard_done  [n_shards] u8     1 once a shard's data is completely written
        class_name  [K] str           coordinates: the names of view_classes' columns
        image_id    [M] str           coordinates: the ids of image_hw's rows

Every array chunk carries a CRC32C checksum, so a damaged chunk fails to
decode instead of being read as numbers. Data of a shard is read as valid only
once ``shard_done`` says so: a run killed while writing a shard leaves it
marked 0 and the next run writes it again. Each writer owns whole shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import ZarrUserWarning

from pipeline.errors import UserError
from pipeline.runtime import now_iso, package_versions

FORMAT_VERSION = 1
ATTR_KEY = "fusioner"


# --------------------------------------------------------------------------- #
# Root
# --------------------------------------------------------------------------- #


def store_identity(*, encoder: str, weights: dict, input_size: int, grid: tuple[int, int] | None,
                   vision_dim: int | None, text_dim: int | None, mean, std, activation: str | None = None) -> dict:
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
        "activation": activation,  # CLIP towers: quick_gelu for OpenAI weights; a store never mixes the two
    }


_IDENTITY_KEYS = ("format_version", "encoder", "weights", "input_size", "grid", "vision_dim", "text_dim",
                  "activation")


def _bare_group(path: Path) -> bool:
    """A root ``zarr.json`` without Fusioner attributes and nothing else: a creation killed half-way."""
    if {p.name for p in path.iterdir()} - {"zarr.json", LOCK_NAME}:
        return False
    try:
        return ATTR_KEY not in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return True


_VISION_ONLY_KEYS = ("input_size", "grid")  # what a run that writes only class names need not share


def open_or_create_store(path: str | Path, *, identity: dict, overwrite: bool = False,
                         vision: bool = True) -> zarr.Group:
    """Open ``path`` for appending, refusing a store made differently, or create it
    (``vision`` False: this run writes class names only, so the vision tower's sizes are not compared).

    The root's metadata and attributes are one file written atomically, so a kill leaves
    no store or a complete (empty) one; a bare root left by older versions is started over.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"`out` {path} is a file, not a folder for a feature store")
    if overwrite and path.exists():
        for child in path.iterdir():  # all but the writer lock, which this run holds
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if path.exists() and any(path.iterdir()) and not _bare_group(path):
        root = open_store(path, mode="r+")
        existing = root.attrs[ATTR_KEY]
        for key in _IDENTITY_KEYS:
            if not vision and key in _VISION_ONLY_KEYS:
                continue
            if existing.get(key) != identity.get(key):
                raise UserError(
                    f"{path} was made with {key}={existing.get(key)!r}, this run has "
                    f"{identity.get(key)!r}; use another `out` or `overwrite` to start over"
                )
        return root
    path.mkdir(parents=True, exist_ok=True)
    (path / "zarr.json").unlink(missing_ok=True)  # a bare root: started over
    attributes = {ATTR_KEY: {**identity, "created": now_iso(), "versions": package_versions()}}
    # Mode "a", not "w": "w" empties the folder, writer lock included, and a second writer could then lock
    # a new file beside the first; the folder holds at most the lock here, so there is nothing else to clear.
    return zarr.open_group(str(path), mode="a", zarr_format=3, attributes=attributes)


LOCK_NAME = ".writer.lock"
# Zarr lists every entry of a group's folder and warns about what is not a node: not this file.
warnings.filterwarnings("ignore", message=r"Object at \.writer\.lock is not recognized")


@contextmanager
def writer_lock(path: str | Path):
    """Hold the store's writer lock while extracting into it; a second writer is refused in one line.

    The lock is ``flock`` on ``<store>/.writer.lock`` (the OS drops it when its holder dies);
    the file names the holder and is removed when the writer finishes, so a finished store
    holds Zarr nodes only (plain zarr warns about any other file in a group's folder). The workers of one extraction write disjoint shards under the
    lock their coordinator holds and take none themselves.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"`out` {path} is a file, not a folder for a feature store")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(path / LOCK_NAME) as handle:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
            handle.flush()
            try:
                yield
            finally:  # removed while still held, so that a finished store holds nothing but Zarr nodes
                (path / LOCK_NAME).unlink(missing_ok=True)
    except BaseException:
        # Refused before writing anything (a bad option, a missing dataset): leave no folder behind.
        if created and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(path, ignore_errors=True)
        raise


@contextmanager
def _locked(lock: Path):
    """flock on ``lock``; retried when the holder removed the file between our open and our lock."""
    while True:
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(f"{lock.parent} is being written by {holder}; wait for it to finish or use another "
                                "`out`") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield handle
                return


def open_store(path: str | Path, *, mode: str = "r") -> zarr.Group:
    """Open an existing Fusioner store, with a one-line error if it is not one."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"no feature store at {path} (run `fusioner extract ... --out {path}` first)")
    try:
        # Never the consolidated copy: after a kill it may lag behind (see ``consolidate``).
        root = zarr.open_group(str(path), mode=mode, use_consolidated=False)
    except (ValueError, TypeError, KeyError) as err:  # a truncated or garbled zarr.json (JSONDecodeError is one)
        raise UserError(f"{path}/zarr.json is damaged ({type(err).__name__}); extract again with `overwrite`") \
            from None
    attrs = root.attrs.asdict()
    if ATTR_KEY not in attrs:
        raise UserError(f"{path} is a Zarr group but not a Fusioner store")
    version = attrs[ATTR_KEY].get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has store format {version}, this Fusioner reads format {FORMAT_VERSION}")
    return root


def consolidate(root: zarr.Group, *, splits: tuple[str, ...] | list[str] = ()) -> None:
    """Consolidated metadata, for readers that look for it (xarray opens a store without a warning).

    Each split named gets its own (what ``xarray.open_zarr("<store>/<split>")`` reads), then the
    root gets one of the whole tree (``open_zarr(store, group=...)``). Every copy is one
    ``zarr.json`` rewritten whole by temp file and rename (zarr's local store), never half-written.
    Call it after each change of the tree. A kill before it leaves an older copy behind, which
    is why Fusioner never reads the root's copy (``open_store``) and a split gets its copy only
    once complete (its arrays never change after that); the next extraction rewrites them.
    """
    with warnings.catch_warnings():  # "not part of the Zarr v3 specification yet": known, and wanted here
        warnings.simplefilter("ignore", ZarrUserWarning)
        for split in splits:
            zarr.consolidate_metadata(root.store, path=split, zarr_format=3)
        zarr.consolidate_metadata(root.store, zarr_format=3)


def store_attrs(root: zarr.Group) -> dict:
    return dict(root.attrs[ATTR_KEY])


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


def has_text(root: zarr.Group) -> bool:
    """True once the store holds a complete class-name table (a text group alone is not one)."""
    return "text" in root and "names" in root["text"].attrs


def text_class_words(root: zarr.Group) -> str:
    """raw or natural: the words the store's class embeddings were made from (older stores: natural)."""
    return str(root["text"].attrs.get("class_words", "natural")) if "text" in root else ""


def check_text_words(root: zarr.Group, *, class_words: str) -> None:
    """Part of the text store's identity: one store never mixes raw names and natural words."""
    existing = text_class_words(root)
    if existing and existing != class_words:
        raise UserError(f"{root.store}: its class embeddings were made from {existing} names, this run asks for "
                        f"{class_words}; use another `out` (or `class_words` {existing})")


def write_text(root: zarr.Group, *, names: list[str], embeddings: np.ndarray, meta: dict,
               fresh: bool = False) -> None:
    """Store (or extend) the class-name embeddings; existing names keep their rows (``fresh``: the
    old table is replaced, not read, as when it is damaged).

    The new table is written whole into an array beside the old one, then the group's
    attributes (one atomic file) switch ``names`` and ``table`` to it, then the old array goes.
    A kill at any point leaves the old table or the new one, never neither, never zeros.
    """
    old_names, old_emb = read_text(root) if has_text(root) and not fresh else ([], None)
    keep = [i for i, n in enumerate(names) if n not in set(old_names)]
    all_names = old_names + [names[i] for i in keep]
    new = embeddings[keep].astype(np.float32)
    table = new if old_emb is None else np.concatenate([old_emb, new])
    group = root.require_group("text")
    current = group.attrs.get("table", "embeddings") if has_text(root) else None
    for leftover in [k for k in group.array_keys() if k != current]:  # of an update killed before its switch
        del group[leftover]
    version = int(group.attrs.get("table_version", 0)) + 1
    name = f"embeddings-{version}"
    arr = group.create_array(name, shape=table.shape, dtype="float32", chunks=table.shape,
                             compressors=[Crc32cCodec()], dimension_names=("class", "channel"))
    arr[:] = table
    group.attrs.update({**meta, "names": all_names, "table": name, "table_version": version, "updated": now_iso()})
    if current is not None:
        del group[current]
    consolidate(root)


def read_text(root: zarr.Group) -> tuple[list[str], np.ndarray]:
    if not has_text(root):
        raise UserError(f"store {root.store} holds no text embeddings (extract with a text encoder)")
    group = root["text"]
    try:
        table = np.asarray(group[group.attrs.get("table", "embeddings")][:], dtype=np.float32)
    except (ValueError, OSError) as err:
        reason = "checksum mismatch" if "checksum" in str(err).lower() else type(err).__name__
        raise TextTableDamaged(f"{root.store}: the class-name embeddings are damaged ({reason}); re-run the same "
                               f"`fusioner extract` with --verify to write them again") from None
    return list(group.attrs["names"]), table


class TextTableDamaged(UserError):
    """The text table fails its checksum (``extract --verify`` writes it again)."""
