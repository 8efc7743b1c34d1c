"""How runs are evaluated: split, episode lists, limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    """How every run is scored (a variant may change any of it with ``eval.<key>``)."""

    split: str = ""  # evaluation split of the vision store, e.g. "voc/val"
    splits_dir: str | None = None  # standard episode lists (../shared/splits); default: derived from masks
    mode: Literal["binary", "multiclass"] = "binary"  # multiclass = Mosaic-4, |W| = the classes of each image
    limit: int | None = None  # first N episodes (COCO-20i: 1000)
    protocol: str | None = None  # default: the run's data.protocol
