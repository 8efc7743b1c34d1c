"""Reading one split of a store: plan arrays in memory, features and masks on demand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.store.fastread import read_rows
from pipeline.store.layout import open_store, store_attrs
from pipeline.store.splits import (
    done_shards,
    list_splits,
    lost_shards,
    read_whole,
    resolve_split,
    shard_arrays,
    shard_file_problem,
)


@dataclass
class CachedSplit:
    """One split of a vision store, its plan arrays in memory, features on demand."""

    path: Path
    split: str
    group: object
    class_names: list[str]
    grid: tuple[int, int]
    input_size: int
    view_image: np.ndarray
    view_box: np.ndarray
    view_flip: np.ndarray
    view_classes: np.ndarray  # [N, K] bool
    view_valid: np.ndarray
    image_ids: list[str]
    image_hw: np.ndarray
    kind: str
    pretrained: bool
    source_classes: np.ndarray | None = None  # [N, K] bool: classes of each view's whole image (None: older store)
    encoder: str = ""  # the store's encoder name (registry key)

    @property
    def num_views(self) -> int:
        return int(self.view_image.shape[0])

    def features(self, index: np.ndarray | slice) -> np.ndarray:
        return self.read("features", index)

    def masks(self, index: np.ndarray | slice) -> np.ndarray:
        return self.read("masks", index)

    def read(self, name: str, index: np.ndarray | slice, *, direct: bool = False) -> np.ndarray:
        """Rows ``index`` of array ``name`` (``direct``: a slice, read straight from the shard files).

        A shard file that is missing or empty, or a chunk failing its checksum, is one line naming
        the split, the array and the shard, and the command that writes it again, never zeros and
        never a traceback from inside zarr. The files are looked at on every read, as they can
        vanish while a run reads them.
        """
        array = self.group[name]
        self.check_files(name, index, array=array)
        try:
            if direct:
                return read_rows(array, *index.indices(self.num_views)[:2])
            return _take(array, index)
        except (ValueError, OSError) as err:  # zarr's checksum failure, fastread's ChecksumMismatch, a lost file
            self.check_files(name, index, array=array)
            raise self.damaged(name, index, err) from err

    def shards_of(self, index: np.ndarray | slice) -> list[int]:
        rows = np.arange(self.num_views)[index] if isinstance(index, slice) else np.asarray(index)
        return sorted({int(r) // int(self.group.attrs["shard_size"]) for r in np.atleast_1d(rows)})

    def check_files(self, name: str, index: np.ndarray | slice, *, array=None) -> None:
        """Raise the one-line error when a file of the shards holding ``index`` is missing or empty
        (``array``: ``name`` already opened, so a read opens its array's metadata once)."""
        array = self.group[name] if array is None else array
        for shard in self.shards_of(index):
            problem = shard_file_problem(array, shard)
            if problem:
                raise UserError(f"{self.path} {self.split}: the {name} file of shard {shard} is {problem}; re-run "
                                f"the same `fusioner extract` to write it again (then `fusioner train --resume`)")

    def damaged(self, name: str, index: np.ndarray | slice, err: Exception) -> UserError:
        """The error for a failed read of ``index``: the first shard among those rows that fails alone."""
        size = int(self.group.attrs["shard_size"])
        shards = self.shards_of(index)
        bad = next((k for k in shards if not _reads(self.group[name], k * size, min((k + 1) * size, self.num_views))),
                   shards[0] if shards else 0)
        reason = "checksum mismatch" if "checksum" in str(err).lower() else type(err).__name__
        return UserError(f"{self.path} {self.split}: {name} of shard {bad} is damaged ({reason}); re-run the same "
                         f"`fusioner extract` with --verify to find damaged shards and write them again")


def _reads(array, start: int, stop: int) -> bool:
    try:
        array[start:stop]
    except ValueError:
        return False
    return True


def _take(array, index):
    """Rows ``index`` of a zarr array, in order.

    A contiguous run is one slice; otherwise one read per row, which zarr serves
    from the shard index far faster than an orthogonal selection over a shard.
    """
    if isinstance(index, slice):
        return array[index]
    index = np.asarray(index)
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return array[int(index[0]):int(index[0]) + index.size]
    return np.stack([array[int(i)] for i in index]) if index.size else array[0:0]


def open_split(*, store: str | Path, split: str | None = None, require_complete: bool = True) -> CachedSplit:
    """Open ``store``'s split (the only one when ``split`` is None)."""
    root = open_store(store)
    attrs = store_attrs(root)
    splits = list_splits(root)
    if split is None:
        if len(splits) != 1:
            raise UserError(f"{store} holds splits {', '.join(splits) or 'none'}: name one with `split`")
        split = splits[0]
    split = resolve_split(root, split, names=splits)
    group = root[split]
    done = done_shards(group)
    if require_complete and not done.all():
        raise UserError(f"{store} {split}: {int((~done).sum())} of {done.size} shards not written yet; "
                        f"re-run the same `fusioner extract` to finish it")
    lost = lost_shards(group)
    if lost:
        raise UserError(f"{store} {split}: the files of {len(lost)} written shard(s) are missing or empty (first: shard "
                        f"{lost[0]}); re-run the same `fusioner extract` to write them again")
    return CachedSplit(
        path=Path(store), split=split, group=group, class_names=list(group.attrs["class_names"]),
        grid=tuple(attrs["grid"]), input_size=int(attrs["input_size"]),
        view_image=read_whole(group, "view_image"), view_box=read_whole(group, "view_box"),
        view_flip=read_whole(group, "view_flip"), view_classes=read_whole(group, "view_classes"),
        view_valid=read_whole(group, "view_valid"), image_ids=list(group.attrs["image_ids"]),
        image_hw=read_whole(group, "image_hw"), kind=str(group.attrs["kind"]),
        pretrained=bool(attrs["pretrained"]),
        source_classes=read_whole(group, "source_classes") if "source_classes" in shard_arrays(group) else None,
        encoder=str(attrs.get("encoder", "")),
    )


def load_into_memory(split: CachedSplit) -> dict:
    """Features and masks of the whole split, read shard by shard (contiguous)."""
    return {"features": split.features(slice(None)), "masks": split.masks(slice(None))}
