"""How big a study's data is before any extraction: training samples per run, images per split.

With the run's store present the counts are the ones training will see (the store's
views, restricted to the standard lists when the run names them). Without it they
follow from the standard lists (``data.train_lists``: PASCAL ``trn/fold*.txt``, COCO
``trn/fold*.json``) or, for a split to extract, from the image counts of the public
releases the readers read. Every count says where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.errors import UserError

# Images in the public releases the readers read (split -> images, typical width x height).
RELEASE_IMAGES = {
    "voc/train": (10_582, (500, 375), "SBD train_aug list"),
    "voc/val": (1_449, (500, 375), "VOC 2012 val"),
    "coco/train": (82_783, (640, 480), "COCO 2014 train"),
    "coco/val": (40_504, (640, 480), "COCO 2014 val"),
}
MOSAIC_DEFAULT_COUNT = 600  # make-mosaic's default number of composites


@dataclass(frozen=True)
class SampleCount:
    samples: int | None  # training samples per epoch; None when nothing tells
    classes: float  # mean class names per sample (|W|)
    source: str
    most: int = 0  # the most class names one sample has (a batch's padded |W|); 0 when only the mean is known


def _from_store(data: dict) -> SampleCount:
    from pipeline.config import from_dict
    from pipeline.store.reader import open_split
    from pipeline.training.batches import image_pairs
    from pipeline.data.protocols import resolve_fold
    from pipeline.training.config import DataConfig
    from pipeline.training.lists import listed_samples
    from pipeline.training.loop import training_split_name

    config = from_dict(DataConfig, data)
    split = open_split(store=config.cache, split=training_split_name(config.cache, config.split))
    fold = resolve_fold(protocol=config.protocol, fold=config.fold, novel=config.novel,
                        class_names=split.class_names)
    if config.train_lists:
        samples = listed_samples(split=split, protocol=config.protocol, fold=config.fold,
                                 splits_dir=config.train_lists, classes_per_sample=config.classes_per_sample)
    else:
        samples = image_pairs(split=split, seen=fold.seen, classes_per_sample=config.classes_per_sample)
    classes = sum(len(c) for _, c in samples) / max(1, len(samples))
    most = max((len(c) for _, c in samples), default=1)
    return SampleCount(len(samples), classes, f"store {config.cache}", most=most)


@lru_cache(maxsize=64)
def _listed_pairs(protocol: str, fold: int, splits_dir: str) -> tuple[int, int]:
    """(distinct (image, class) pairs, distinct images) of a protocol fold's standard training lists."""
    from pipeline.data.protocols import load_training_pairs

    pairs = {(p.image_id, int(p.class_value)) for p in load_training_pairs(protocol=protocol, fold=fold,
                                                                            splits_dir=Path(splits_dir))}
    return len(pairs), len({image for image, _ in pairs})  # a pair listed twice trains once


def _from_lists(data: dict) -> SampleCount:
    from pipeline.data.protocols import protocol_entry

    trained_on = protocol_entry(data["protocol"]).train_protocol or data["protocol"]
    pairs, images = _listed_pairs(trained_on, int(data["fold"]), str(data["train_lists"]))
    source = f"{trained_on} lists in {data['train_lists']}"
    if data["classes_per_sample"] == "all":
        return SampleCount(images, pairs / max(1, images), source)
    return SampleCount(pairs, 1.0, source)


def training_samples(data: dict, *, memo: dict) -> SampleCount:
    """Samples per epoch of a run's data config: from its store, else its lists, else the release sizes."""
    from pipeline.store.layout import open_store

    key = tuple(str(data.get(k)) for k in ("cache", "split", "protocol", "fold", "novel", "classes_per_sample",
                                           "train_lists"))
    if key in memo:
        return memo[key]
    try:
        open_store(data["cache"])
        present = True
    except UserError:
        present = False
    if present:
        count = _from_store(data)
    elif data.get("train_lists"):
        count = _from_lists(data)
    elif data["protocol"] == "mosaic4":
        count = SampleCount(MOSAIC_DEFAULT_COUNT * (4 if data["classes_per_sample"] != "all" else 1),
                            4.0 if data["classes_per_sample"] == "all" else 1.0,
                            f"make-mosaic's default {MOSAIC_DEFAULT_COUNT} composites (no store)")
    else:
        count = SampleCount(None, 1.0, f"unknown: no store at {data['cache']} and no data.train_lists")
    memo[key] = count
    return count


@lru_cache(maxsize=64)
def split_images(split: str, *, splits_dir: str | None = None) -> tuple[int | None, tuple[int, int] | None, str]:
    """(images, typical (width, height), source) of a split to extract, before any extraction.

    ``coco/val`` extracted with ``--episodes`` holds only the images the standard episodes score.
    """
    if split == "coco/val" and splits_dir:
        from pipeline.data.protocols import load_episodes

        images = {e.image_id for fold in range(4)
                  for e in load_episodes(protocol="coco20i", fold=fold, splits_dir=Path(splits_dir))}
        return len(images), RELEASE_IMAGES[split][1], f"images of the first 1000 episodes of 4 folds ({splits_dir})"
    if split in RELEASE_IMAGES:
        count, size, name = RELEASE_IMAGES[split]
        return count, size, name
    if split.startswith("mosaic4/"):
        return MOSAIC_DEFAULT_COUNT, (448, 448), f"make-mosaic's default {MOSAIC_DEFAULT_COUNT} composites"
    return None, None, "unknown size"
