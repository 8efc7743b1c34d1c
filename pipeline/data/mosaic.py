"""Mosaic-4: 2x2 composites of FSS-1000 test images of four different classes (paper Table 3).

Each composite asks the model to separate four classes at once (|W| = 4),
where FSS-1000 alone only ever shows one. The output is an ordinary
folder-layout dataset (images/, masks/, classes.txt) plus ``mosaic4.json``
recording the four source images and classes of every composite, so the
benchmark can be rebuilt and audited.

Sampling: with a fixed seed, each round lays out every usable source image
once, class by class in a shuffled class order, and cuts that sequence into
four equal columns; composite k takes position k of every column. Classes are
contiguous runs no longer than a column, so the four tiles of a composite
always come from four different classes, and no source image is used twice
within a round. A new round (fresh shuffle) starts only when ``count`` asks
for more composites than one round holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.registry import create_dataset
from pipeline.errors import UserError

INDEX_FILE = "mosaic4.json"
INDEX_FORMAT = "fusioner-mosaic4/1"


def _round(by_class: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """One round of groups of 4 source indices from 4 different classes, in random order."""
    sizes = [len(images) for images in by_class]
    while max(sizes) > sum(sizes) // 4:  # a class longer than a column could meet itself
        column = sum(sizes) // 4
        sizes = [min(size, column) for size in sizes]
    sequence = []
    for c in rng.permutation(len(by_class)):
        sequence += [by_class[c][i] for i in rng.permutation(len(by_class[c]))[: sizes[c]]]
    column = len(sequence) // 4
    groups = [[sequence[k + j * column] for j in range(4)] for k in range(column)]
    return [[groups[g][t] for t in rng.permutation(4)] for g in rng.permutation(column)]


def plan_mosaic(*, image_classes: list[int], count: int, seed: int) -> list[list[int]]:
    """``count`` groups of 4 source indices with 4 distinct classes each, deterministic in ``seed``."""
    by_class: dict[int, list[int]] = {}
    for index, value in enumerate(image_classes):
        by_class.setdefault(value, []).append(index)
    if len(by_class) < 4:
        raise UserError(f"Mosaic-4 needs images of at least 4 classes, found {len(by_class)}")
    rng = np.random.default_rng(seed)
    ordered = [by_class[value] for value in sorted(by_class)]
    groups: list[list[int]] = []
    while len(groups) < count:
        groups += _round(ordered, rng)
    return groups[:count]


def _compose(tiles: list[tuple[np.ndarray, np.ndarray]], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize each (image, mask) to tile x tile and place them row-major in a 2x2 grid."""
    image = np.zeros((2 * tile, 2 * tile, 3), np.uint8)  # [2T, 2T, 3]
    mask = np.zeros((2 * tile, 2 * tile), np.uint8)  # [2T, 2T]
    for position, (source_image, source_mask) in enumerate(tiles):
        rows = slice((position // 2) * tile, (position // 2 + 1) * tile)
        cols = slice((position % 2) * tile, (position % 2 + 1) * tile)
        image[rows, cols] = np.asarray(Image.fromarray(source_image).resize((tile, tile), Image.BILINEAR))
        mask[rows, cols] = np.asarray(Image.fromarray(source_mask).resize((tile, tile), Image.NEAREST))
    return image, mask


def make_mosaic(*, fss_root: str | Path, out: str | Path, classes_file: str | Path, count: int = 600,
                seed: int = 0, tile: int = 224, progress: bool = True) -> Path:
    """Write ``count`` Mosaic-4 composites of (2*tile)^2 pixels into ``out``; returns ``out``.

    Mask values are positions in ``classes_file`` (1-based), the same list the
    output's classes.txt holds, so every tile keeps its class value.
    """
    if count < 1 or tile < 1:
        raise UserError(f"make-mosaic: count and tile must be positive, got count={count}, tile={tile}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output folder is not empty; choose a new one")
    source = create_dataset("fss", root=fss_root, split="test", classes_file=classes_file)
    groups = plan_mosaic(image_classes=[source.image_class(i) for i in range(len(source))], count=count, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    composites = []
    for number, group in enumerate(tqdm(groups, desc="mosaic4", disable=not progress)):
        records = [source.load(i) for i in group]
        image, mask = _compose([(r.image, r.mask) for r in records], tile)
        image_id = f"mosaic_{number:04d}"
        Image.fromarray(image).save(out / "images" / f"{image_id}.jpg", quality=95)
        Image.fromarray(mask).save(out / "masks" / f"{image_id}.png")
        composites.append({"image_id": image_id, "tiles": [
            {"source": r.image_id, "class": source.class_names[source.image_class(i) - 1],
             "value": source.image_class(i), "row": p // 2, "col": p % 2}
            for p, (i, r) in enumerate(zip(group, records))]})
    (out / "classes.txt").write_text("\n".join(source.class_names) + "\n")
    index = {"format": INDEX_FORMAT, "fss_root": str(fss_root), "classes_file": str(classes_file), "count": count,
             "seed": seed, "tile": tile, "composites": composites}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return out


def read_mosaic_index(path: str | Path) -> list[dict]:
    """The composites listed in a mosaic4.json, checked enough to fail with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Mosaic-4 index not found (written by `fusioner make-mosaic`)")
    try:
        index = json.loads(path.read_text())
        composites = index["composites"]
        if index.get("format") != INDEX_FORMAT or any(len(c["tiles"]) != 4 for c in composites):
            raise ValueError("not a Mosaic-4 index")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: unreadable Mosaic-4 index ({error})") from None
    return composites
