"""Dataset readers by name (and the aliases people use for them)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.coco import CocoDataset
from pipeline.data.readers import (
    FolderDataset,
    FssDataset,
    Mosaic4Dataset,
    SegDataset,
    VocDataset,
)
from pipeline.errors import UserError

_READERS: dict[str, type[SegDataset]] = {
    "voc": VocDataset, "coco": CocoDataset, "fss": FssDataset, "folder": FolderDataset, "mosaic4": Mosaic4Dataset,
}


# Names people use for the same reader (the paper says "PASCAL").
_ALIASES = {"pascal": "voc", "pascal-voc": "voc", "coco2014": "coco", "fss1000": "fss"}


def list_datasets() -> list[str]:
    return sorted(_READERS)


def reader_layouts() -> dict[str, str]:
    """Reader name -> the layout it expects, for `fusioner datasets`."""
    return {name: _READERS[name].layout for name in list_datasets()}


def create_dataset(name: str, *, root: str | Path, split: str = "train", skip_bad: bool = False,
                   **options) -> SegDataset:
    """Open a reader by name; every user mistake (name, root, option, list) is a UserError here."""
    name = _ALIASES.get(name, name)
    if name not in _READERS:
        raise UserError(f"unknown dataset reader {name!r}; known: {', '.join(list_datasets())}")
    reader = _READERS[name]
    unknown = sorted(set(options) - set(reader.options))
    if unknown:
        raise UserError(f"reader {name!r} has no option {unknown[0]!r}; options: {', '.join(reader.options) or 'none'}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found")
    return reader(root=root, split=split, skip_bad=skip_bad, **options)
