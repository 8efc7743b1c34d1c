"""Dataset readers, looked up by name, all yielding one mask convention.

Every reader turns its native annotation into one uint8 mask so nothing
downstream branches on the dataset: 0 background, k = class k (entry k-1 of
``class_names``), 255 ignore. Readers index files when created (a wrong root
fails at once) and decode only in ``load``/``read_mask``, which raise
:class:`BadRecordError` naming the file; callers that tolerate bad records pass
it to :meth:`SegDataset.record_bad` (appends to ``skipped`` under ``skip_bad``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.errors import UserError

IGNORE = 255
MAX_CLASSES = 254  # values 1..254 fit a uint8 mask beside 0 and the 255 ignore label

# Same names and order as splits/pascal/classes.txt (mask value = position + 1).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# Same names and order as splits/coco/classes.txt: the COCO category order with
# spaces removed and four VOC-style names (see _COCO_ALIASES).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "trafficlight", "firehydrant", "stopsign", "parkingmeter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sportsball", "kite",
    "baseballbat", "baseballglove", "skateboard", "surfboard", "tennisracket", "bottle",
    "wineglass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hotdog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cellphone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddybear", "hairdrier", "toothbrush",
)
# Official COCO category names whose split-file name is not simply the name without spaces.
_COCO_ALIASES = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor"}
# Split files fuse words ("diningtable"); text encoders were trained on natural words.
_PROMPT_NAMES = {
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
    "trafficlight": "traffic light", "firehydrant": "fire hydrant", "stopsign": "stop sign",
    "parkingmeter": "parking meter", "sportsball": "sports ball", "baseballbat": "baseball bat",
    "baseballglove": "baseball glove", "tennisracket": "tennis racket", "wineglass": "wine glass",
    "hotdog": "hot dog", "cellphone": "cell phone", "teddybear": "teddy bear",
    "hairdrier": "hair drier",
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def prompt_name(name: str) -> str:
    """The words a text encoder should see for a split-file class name."""
    return _PROMPT_NAMES.get(name, name.replace("_", " "))


def coco_class_name(category: str) -> str:
    """Split-file name of an official COCO category name ("dining table" -> "diningtable")."""
    return _COCO_ALIASES.get(category, category.replace(" ", ""))


class BadRecordError(UserError):
    """One image or mask is unusable; the rest of the dataset may still be fine."""


@dataclass(frozen=True)
class Record:
    """One decoded sample in the shared mask convention."""

    image_id: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    mask: np.ndarray  # [H, W] uint8: 0 background, k class k, 255 ignore


def read_lines(path: Path, *, what: str) -> list[str]:
    """Non-empty stripped lines of a list file; a missing file is the user's to fix."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _open(path: Path, what: str, convert):
    """Open an image file with PIL and convert it, turning every decoding failure into a BadRecordError."""
    if not path.is_file():
        raise BadRecordError(f"{path}: {what} file is missing")
    try:
        with Image.open(path) as image:
            return convert(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecordError(f"{path}: unreadable {what} ({error})") from None


def _index_mask(path: Path) -> np.ndarray:
    """A class-index mask; colour or 16-bit PNGs are rejected, not guessed at."""
    array = _open(path, "mask", np.asarray)  # palette PNGs give their indices
    if array.ndim != 2 or array.dtype != np.uint8:
        raise BadRecordError(f"{path}: mask must be a single-channel 8-bit PNG (L or P), got {array.dtype} {array.shape}")
    return array


class SegDataset(ABC):
    """Common behaviour of every reader: validation, size probing, class statistics."""

    name = ""
    layout = ""  # the folder layout this reader expects, shown by `fusioner datasets`
    options: tuple[str, ...] = ()  # keyword options accepted by create_dataset

    def __init__(self, *, root: Path, split: str, class_names: list[str], ids: list[str],
                 lists: list[Path], skip_bad: bool) -> None:
        if len(class_names) > MAX_CLASSES:
            raise UserError(f"{root}: {len(class_names)} classes do not fit a uint8 mask (at most {MAX_CLASSES})")
        self.root = root
        self.split = split
        self.class_names = list(class_names)
        self.ids = list(ids)
        self.lists = [str(p) for p in lists]
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def image_path(self, index: int) -> Path:
        """Where the image of record ``index`` lives."""

    @abstractmethod
    def mask_path(self, index: int) -> Path:
        """The file an error about record ``index``'s mask should name."""

    @abstractmethod
    def _mask(self, index: int) -> np.ndarray:
        """The record's mask in the shared convention, not yet value-checked."""

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) from the image header only, for planning batches without decoding."""
        return _open(self.image_path(index), "image", lambda image: (image.height, image.width))

    def read_mask(self, index: int) -> np.ndarray:
        """The mask alone (cheaper than ``load``), with every value checked against the class list."""
        mask = self._mask(index)
        n = len(self.class_names)
        bad = np.unique(mask[(mask > n) & (mask != IGNORE)])
        if bad.size:
            raise BadRecordError(f"{self.mask_path(index)}: class value {int(bad[0])} outside 1..{n} (255 = ignore)")
        return mask

    def load(self, index: int) -> Record:
        image = _open(self.image_path(index), "image", lambda im: np.asarray(im.convert("RGB")))
        mask = self.read_mask(index)
        if mask.shape != image.shape[:2]:
            raise BadRecordError(
                f"{self.mask_path(index)}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                f"image {self.image_path(index)} {image.shape[1]}x{image.shape[0]}")
        return Record(image_id=self.ids[index], image=image, mask=mask)

    def class_pixels(self, index: int) -> dict[int, int]:
        """Pixel count per 1-based class value present (background and ignore left out)."""
        counts = np.bincount(self.read_mask(index).ravel(), minlength=256)
        return {v: int(counts[v]) for v in range(1, len(self.class_names) + 1) if counts[v]}

    def classes_present(self, index: int) -> list[int]:
        return sorted(self.class_pixels(index))

    def record_bad(self, index: int, error: BadRecordError) -> None:
        """Note a bad record and carry on under ``skip_bad``; otherwise stop with the error."""
        if not self.skip_bad:
            raise error
        self.skipped.append((self.ids[index], str(error)))

    def describe(self) -> dict:
        return {"reader": self.name, "root": str(self.root), "split": self.split, "images": len(self),
                "classes": len(self.class_names), "class_names": self.class_names, "lists": self.lists,
                "skipped": len(self.skipped)}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: expected {what} folder is missing")
    return path


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}


class _PairedDataset(SegDataset):
    """Readers whose masks are index PNGs in one folder, named like the images of another."""

    def _pair(self, images: Path, masks: Path, list_path: Path | None) -> list[str]:
        """Index both folders; the ids are the list's, or else every image that has a mask."""
        self._image_dir, self._images, self._masks = images, _images_by_stem(images), masks
        if list_path:
            return read_lines(list_path, what="image list")
        return sorted(s for s in self._images if (masks / f"{s}.png").is_file())

    def image_path(self, index: int) -> Path:
        image_id = self.ids[index]
        return self._images.get(image_id, self._image_dir / f"{image_id}.jpg")

    def mask_path(self, index: int) -> Path:
        return self._masks / f"{self.ids[index]}.png"

    def _mask(self, index: int) -> np.ndarray:
        return _index_mask(self.mask_path(index))


class FolderDataset(_PairedDataset):
    """The plain layout every other tool can write: images/, masks/, classes.txt."""

    name = "folder"
    layout = "images/<id>.jpg, masks/<id>.png (uint8, k = line k of classes.txt, 0 bg, 255 ignore), classes.txt"
    options = ("list_file",)

    def __init__(self, *, root: Path, split: str, skip_bad: bool, list_file: str | Path | None = None) -> None:
        list_path = Path(list_file) if list_file else None
        ids = self._pair(_require_dir(root / "images", "images/"), _require_dir(root / "masks", "masks/"), list_path)
        super().__init__(root=root, split=split, class_names=read_lines(root / "classes.txt", what="class list"),
                         ids=ids, lists=[list_path] if list_path else [], skip_bad=skip_bad)


class Mosaic4Dataset(FolderDataset):
    """What `fusioner make-mosaic` writes: the folder layout plus mosaic4.json."""

    name = "mosaic4"
    layout = "a `fusioner make-mosaic` output: folder layout + mosaic4.json (4 source tiles per image)"

    def __init__(self, *, root: Path, split: str, skip_bad: bool, list_file: str | Path | None = None) -> None:
        if not (root / "mosaic4.json").is_file():
            raise UserError(f"{root / 'mosaic4.json'}: not found; is this a `fusioner make-mosaic` output?")
        super().__init__(root=root, split=split, skip_bad=skip_bad, list_file=list_file)
        self.lists.append(str(root / "mosaic4.json"))


_VOC_LISTS = {
    "train": ("ImageSets/SegmentationAug/train_aug.txt", "ImageSets/Segmentation/train_aug.txt",
              "ImageSets/Segmentation/train.txt"),
    "val": ("ImageSets/SegmentationAug/val.txt", "ImageSets/Segmentation/val.txt"),
}


class VocDataset(_PairedDataset):
    """PASCAL VOC 2012 images with the SBD-augmented palette masks (palette indices are the classes)."""

    name = "voc"
    layout = ("JPEGImages/*.jpg + SegmentationClassAug/*.png (palette: 0 bg, 1..20, 255 ignore), directly "
              "under root or under VOCdevkit/VOC2012; split lists from ImageSets/ when present")
    options = ("list_file",)

    def __init__(self, *, root: Path, split: str, skip_bad: bool, list_file: str | Path | None = None) -> None:
        base = root if (root / "JPEGImages").is_dir() else root / "VOCdevkit" / "VOC2012"
        masks = next((d for d in (base / "SegmentationClassAug", root / "SegmentationClassAug") if d.is_dir()),
                     root / "SegmentationClassAug")
        list_path = Path(list_file) if list_file else self._split_list(base, split)
        # Without a list (none shipped), every image that has a mask is used, whatever the split.
        ids = self._pair(_require_dir(base / "JPEGImages", "JPEGImages/"),
                         _require_dir(masks, "SegmentationClassAug/"), list_path)
        super().__init__(root=root, split=split, class_names=list(VOC_CLASSES), ids=ids,
                         lists=[list_path] if list_path else [], skip_bad=skip_bad)

    @staticmethod
    def _split_list(base: Path, split: str) -> Path | None:
        if split not in _VOC_LISTS:
            raise UserError(f"{base}: voc split must be one of {sorted(_VOC_LISTS)} (or pass list_file), got {split!r}")
        return next((base / rel for rel in _VOC_LISTS[split] if (base / rel).is_file()), None)


class FssDataset(SegDataset):
    """FSS-1000: one folder per class; each image's mask is binary, so its value is the folder's class."""

    name = "fss"
    layout = ("<class>/<N>.jpg + <class>/<N>.png (binary 0/255, grey or RGB, thresholded at 128); "
              "classes from classes_file or splits_dir/fss/{trn,val,test}.txt")
    options = ("classes_file", "splits_dir")

    def __init__(self, *, root: Path, split: str, skip_bad: bool, classes_file: str | Path | None = None,
                 splits_dir: str | Path | None = None) -> None:
        lists = [Path(classes_file)] if classes_file else []
        if splits_dir and not classes_file:
            if split not in ("trn", "val", "test"):
                raise UserError(f"{splits_dir}: fss split must be trn, val or test, got {split!r}")
            lists = [Path(splits_dir) / "fss" / f"{split}.txt"]
        class_names = (read_lines(lists[0], what="fss class list") if lists
                       else sorted(p.name for p in root.iterdir() if p.is_dir()))
        ids, self._class_of = [], []
        for value, name in enumerate(class_names, start=1):
            _require_dir(root / name, f"fss class {name!r}")
            stems = sorted((p.stem for p in (root / name).glob("*.jpg")), key=lambda s: (not s.isdigit(), s.zfill(12)))
            ids += [f"{name}/{stem}" for stem in stems]
            self._class_of += [value] * len(stems)
        super().__init__(root=root, split=split, class_names=class_names, ids=ids, lists=lists, skip_bad=skip_bad)

    def image_class(self, index: int) -> int:
        """The class value of an image, known from its folder without decoding."""
        return self._class_of[index]

    def image_path(self, index: int) -> Path:
        return self.root / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.root / f"{self.ids[index]}.png"

    def _mask(self, index: int) -> np.ndarray:
        array = _open(self.mask_path(index), "mask", np.asarray)
        if array.ndim == 3:
            array = array[..., :3].max(axis=2)
        return np.where(array >= 128, self._class_of[index], 0).astype(np.uint8)


@dataclass(frozen=True)
class _CocoImage:
    file_name: str
    height: int
    width: int
    annotations: list  # (area, iscrowd, segmentation, class value)


class CocoDataset(_PairedDataset):
    """MS-COCO: semantic masks rendered from instance polygons/RLEs, or read from pre-rendered PNGs.

    Rendering paints instances larger-first, so a small object on top of a large
    one stays visible. Crowd regions become 255 (ignore) only where no instance
    was painted: their pixels are real objects, but unlabelled per instance, so
    they should neither count as background nor as foreground.
    """

    name = "coco"
    layout = ("{train,val}2014/*.jpg + annotations/instances_{train,val}2014.json (rendered larger-first, "
              "crowd -> 255), or mask_dir/<stem>.png pre-rendered (k = COCO-20i class k)")
    options = ("mask_dir",)

    def __init__(self, *, root: Path, split: str, skip_bad: bool, mask_dir: str | Path | None = None) -> None:
        if split not in ("train", "val"):
            raise UserError(f"{root}: coco split must be train or val, got {split!r}")
        folder = _require_dir(root / f"{split}2014", f"{split}2014/")
        self._json = root / "annotations" / f"instances_{split}2014.json"
        if mask_dir:
            self._index: dict[str, _CocoImage] = {}
            ids, lists = self._pair(folder, _require_dir(Path(mask_dir), "mask_dir"), None), [Path(mask_dir)]
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
            if iscrowd:
                crowd |= region
            else:
                mask[region] = value
        mask[crowd & (mask == 0)] = IGNORE
        return mask

    def _decode(self, segmentation, entry: _CocoImage) -> np.ndarray:
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
