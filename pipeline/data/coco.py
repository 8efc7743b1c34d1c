"""MS-COCO: semantic masks rendered from instance annotations, or read from pre-rendered PNGs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.labels import COCO_CLASSES, IGNORE, coco_class_name
from pipeline.data.readers import BadRecordError, PairedDataset, require_dir
from pipeline.errors import UserError


@dataclass(frozen=True)
class _CocoImage:
    file_name: str
    height: int
    width: int
    annotations: list  # (area, iscrowd, segmentation, class value)


def pycocotools_mask():
    """pycocotools' mask module: an extra of this package (``pip install 'fusioner[coco]'``)."""
    try:
        from pycocotools import mask
    except ImportError as err:
        raise UserError("reading COCO json annotations needs pycocotools: pip install 'fusioner[coco]'") from err
    return mask


class CocoDataset(PairedDataset):
    """MS-COCO: semantic masks rendered from instance polygons/RLEs, or read from pre-rendered PNGs.

    Rendering paints instances larger-first, so a small object on top of a large
    one stays visible. Crowd regions (option ``crowd``): ``class`` (default) paints
    them with their category like any instance, which is how we read the standard
    pre-rendered COCO-20i masks (one category per annotation, crowd included);
    ``ignore`` makes them 255 where no instance was painted, since their pixels are
    real objects unlabelled per instance.
    """

    name = "coco"
    layout = ("{train,val}2014/*.jpg + annotations/instances_{train,val}2014.json (rendered larger-first, "
              "crowd painted as its class, or 255 with crowd=ignore), or mask_dir/<stem>.png pre-rendered "
              "(k = COCO-20i class k)")
    options = ("mask_dir", "crowd")
    upright = False  # the json's heights and widths, and so its polygons, are in the stored pixel grid

    def __init__(self, *, root: Path, split: str, skip_bad: bool, mask_dir: str | Path | None = None,
                 crowd: str = "class") -> None:
        if crowd not in ("class", "ignore"):
            raise UserError(f"coco option crowd must be class or ignore, got {crowd!r}")
        self._crowd = crowd
        if split not in ("train", "val"):
            raise UserError(f"{root}: coco split must be train or val, got {split!r}")
        folder = require_dir(root / f"{split}2014", f"{split}2014/")
        self._json = root / "annotations" / f"instances_{split}2014.json"
        if mask_dir:
            self._index: dict[str, _CocoImage] = {}
            ids, lists = self._pair(folder, require_dir(Path(mask_dir), "mask_dir"), None), [Path(mask_dir)]
        else:
            self._index = _index_instances(self._json)
            self._image_dir, self._masks = folder, None
            self._images = {stem: folder / entry.file_name for stem, entry in self._index.items()}
            ids, lists = sorted(self._index), [self._json]
        super().__init__(root=root, split=split, class_names=list(COCO_CLASSES), ids=ids, lists=lists,
                         skip_bad=skip_bad)

    def mask_path(self, index: int) -> Path:
        return super().mask_path(index) if self._masks else self._json

    def _mask(self, index: int) -> np.ndarray:
        if self._masks:
            return super()._mask(index)
        entry = self._index[self.ids[index]]
        mask = np.zeros((entry.height, entry.width), np.uint8)
        crowd = np.zeros_like(mask, dtype=bool)
        for area, iscrowd, segmentation, value in sorted(entry.annotations, key=lambda a: -a[0]):
            region = self._decode(segmentation, entry)
            if iscrowd and self._crowd == "ignore":
                crowd |= region
            else:
                mask[region] = value
        mask[crowd & (mask == 0)] = IGNORE
        return mask

    def _decode(self, segmentation, entry: _CocoImage) -> np.ndarray:
        coco_mask = pycocotools_mask()
        try:
            if isinstance(segmentation, list):  # polygons
                rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, entry.height, entry.width))
            elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
                rle = coco_mask.frPyObjects(segmentation, entry.height, entry.width)
            else:
                rle = segmentation
            region = coco_mask.decode(rle)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            raise BadRecordError(f"{self._json}: bad segmentation for {entry.file_name} ({error})") from None
        if region.shape[:2] != (entry.height, entry.width):
            raise BadRecordError(f"{self._json}: segmentation size differs from {entry.file_name}")
        return region.any(axis=2) if region.ndim == 3 else region.astype(bool)


def _index_instances(path: Path) -> dict[str, _CocoImage]:
    """Group a COCO instances json by image stem, mapping category ids to class values by name."""
    if not path.is_file():
        raise UserError(f"{path}: COCO instances json not found (or pass mask_dir)")
    try:
        data = json.loads(path.read_text())
        values = {}
        for category in data["categories"]:
            name = coco_class_name(category["name"])
            if name not in COCO_CLASSES:
                raise UserError(f"{path}: unknown COCO category {category['name']!r}")
            values[category["id"]] = COCO_CLASSES.index(name) + 1
        images = {im["id"]: _CocoImage(im["file_name"], im["height"], im["width"], []) for im in data["images"]}
        for ann in data["annotations"]:
            images[ann["image_id"]].annotations.append(
                (ann.get("area", 0.0), ann.get("iscrowd", 0), ann["segmentation"], values[ann["category_id"]]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a COCO instances json ({type(error).__name__}: {error})") from None
    return {Path(im.file_name).stem: im for im in images.values()}
