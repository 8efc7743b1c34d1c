"""Dataset readers, looked up by name, all yielding one mask convention.

Every reader turns its native annotation into one uint8 mask so nothing
downstream branches on the dataset: 0 background, k = class k (entry k-1 of
``class_names``), 255 ignore. Readers index files when created (a wrong root
fails at once) and decode only in ``load``/``read_mask``, which raise
:class:`BadRecordError` naming the file; callers that tolerate bad records pass
it to :meth:`SegDataset.record_bad` (appends to ``skipped`` under ``skip_bad``).
"""

from __future__ import annotations

import sys

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.labels import IGNORE, MAX_CLASSES, VOC_CLASSES
from pipeline.errors import UserError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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


MAX_PIXELS_VARIABLE = "FUSIONER_MAX_IMAGE_PIXELS"


def open_image(path: Path):
    """``Image.open`` under Pillow's decompression-bomb limit, which ``FUSIONER_MAX_IMAGE_PIXELS`` raises."""
    import os

    allowed = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if allowed:
        if not allowed.isdigit():
            raise UserError(f"{MAX_PIXELS_VARIABLE} must be a whole number of pixels, got {allowed!r}")
        Image.MAX_IMAGE_PIXELS = int(allowed)
    return Image.open(path)


def too_many_pixels(path: Path, error: Exception) -> str:
    """The line for an image over the limit: its size, and how to allow it."""
    return (f"{path}: {str(error).rstrip('.')}, Pillow's guard against crafted files; if you trust it, "
            f"set {MAX_PIXELS_VARIABLE} to its pixel count or more and run again, or make the image smaller")


def open_image_file(path: Path, what: str, convert):
    """Open an image file with PIL and convert it, turning every decoding failure into a BadRecordError."""
    if not path.is_file():
        raise BadRecordError(f"{path}: {what} file is missing")
    try:
        with open_image(path) as image:
            return convert(image)
    except Image.DecompressionBombError as error:
        raise BadRecordError(too_many_pixels(path, error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRecordError(f"{path}: unreadable {what} ({error})") from None


_ORIENTATION = 0x0112  # the EXIF tag that says how to turn the stored pixels upright
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the picture by 90 degrees


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = stored upright; 6 = turn 90 degrees clockwise, as phones save portraits)."""
    try:
        value = int(image.getexif().get(_ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError, OSError):  # an unreadable tag shows as stored, as viewers do
        return 1
    return value if 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The picture as every viewer shows it: the EXIF orientation applied (a no-op without one)."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) as shown, from the header alone (no decoding)."""
    return (image.width, image.height) if orientation(image) in _SWAPS_SIDES else (image.height, image.width)


def rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 RGB of any PIL image; 16-bit greyscale is scaled down, not clipped.

    PIL's own conversion of a 16-bit ("I;16") image to RGB clips every value above 255,
    which turns a typical 16-bit photo almost entirely white.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def index_mask(path: Path) -> np.ndarray:
    """A class-index mask; colour or 16-bit PNGs are rejected, not guessed at."""
    array = open_image_file(path, "mask", np.asarray)  # palette PNGs give their indices
    if array.ndim != 2 or array.dtype != np.uint8:
        raise BadRecordError(f"{path}: mask must be a single-channel 8-bit PNG (L or P), got {array.dtype} {array.shape}")
    return array


class SegDataset(ABC):
    """Common behaviour of every reader: validation, size probing, class statistics.

    Images are read as shown (their EXIF orientation applied, as every viewer and annotation tool
    shows a phone's portrait photo), and masks are taken to be drawn on that displayed image.
    """

    name = ""
    upright = True  # False: annotations in the stored pixel grid (COCO json sizes), orientation ignored
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
        if not self.upright:
            return open_image_file(self.image_path(index), "image", lambda image: (image.height, image.width))
        return open_image_file(self.image_path(index), "image", displayed_size)

    def read_mask(self, index: int) -> np.ndarray:
        """The mask alone (cheaper than ``load``), with every value checked against the class list."""
        mask = self._mask(index)
        n = len(self.class_names)
        bad = np.unique(mask[(mask > n) & (mask != IGNORE)])
        if bad.size:
            raise BadRecordError(f"{self.mask_path(index)}: class value {int(bad[0])} outside 1..{n} (255 = ignore)")
        return mask

    def load(self, index: int) -> Record:
        path = self.image_path(index)
        image = open_image_file(path, "image", lambda im: rgb_array(upright(im) if self.upright else im))
        mask = self.read_mask(index)
        if mask.shape != image.shape[:2] and mask.shape == image.shape[1::-1] and self.upright and \
                open_image_file(path, "image", orientation) in _SWAPS_SIDES:
            raise BadRecordError(
                f"{self.mask_path(index)}: mask size {mask.shape[1]}x{mask.shape[0]} is the stored grid of image {path}, "
                f"which its EXIF orientation shows as {image.shape[1]}x{image.shape[0]}; masks are read on the image as "
                f"shown: turn the mask the same way, or store the image upright (e.g. `exiftran -ai`)")
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


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: expected {what} folder is missing")
    return path


def images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}


class PairedDataset(SegDataset):
    """Readers whose masks are index PNGs in one folder, named like the images of another."""

    def _pair(self, images: Path, masks: Path, list_path: Path | None) -> list[str]:
        """Index both folders; the ids are the list's, or else every image that has a mask."""
        self._image_dir, self._images, self._masks = images, images_by_stem(images), masks
        if list_path:
            return read_lines(list_path, what="image list")
        paired = sorted(s for s in self._images if (masks / f"{s}.png").is_file())
        unpaired = sorted(set(self._images) - set(paired))
        if unpaired:
            print(f"note: {len(unpaired)} image(s) in {images} have no mask in {masks} and are left out "
                  f"(first: {unpaired[0]}); a list file names the images to use", file=sys.stderr)
        return paired

    def image_path(self, index: int) -> Path:
        image_id = self.ids[index]
        return self._images.get(image_id, self._image_dir / f"{image_id}.jpg")

    def mask_path(self, index: int) -> Path:
        return self._masks / f"{self.ids[index]}.png"

    def _mask(self, index: int) -> np.ndarray:
        return index_mask(self.mask_path(index))


class FolderDataset(PairedDataset):
    """The plain layout every other tool can write: images/, masks/, classes.txt."""

    name = "folder"
    layout = "images/<id>.jpg, masks/<id>.png (uint8, k = line k of classes.txt, 0 bg, 255 ignore), classes.txt"
    options = ("list_file",)

    def __init__(self, *, root: Path, split: str, skip_bad: bool, list_file: str | Path | None = None) -> None:
        list_path = Path(list_file) if list_file else None
        ids = self._pair(require_dir(root / "images", "images/"), require_dir(root / "masks", "masks/"), list_path)
        names = read_lines(root / "classes.txt", what="class list")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # mask value k names line k: a repeated name would hold out only its first value
            raise UserError(f"{root / 'classes.txt'}: class names must be unique, repeated: {', '.join(repeated[:5])}")
        super().__init__(root=root, split=split, class_names=names,
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
    "train": ("ImageSets/SegmentationAug/train_aug.txt", "ImageSets/Segmentation/train_aug.txt"),
    "val": ("ImageSets/SegmentationAug/val.txt", "ImageSets/Segmentation/val.txt"),
}
# VOC 2012's own 1,464-image list; the paper trains on SBD's 10,582 (train_aug.txt).
_VOC_SMALL_TRAIN = "ImageSets/Segmentation/train.txt"


class VocDataset(PairedDataset):
    """PASCAL VOC 2012 images with the SBD-augmented palette masks (palette indices are the classes)."""

    name = "voc"
    layout = ("JPEGImages/*.jpg + SegmentationClassAug/*.png (palette: 0 bg, 1..20, 255 ignore), directly "
              "under root or under VOCdevkit/VOC2012; split lists from ImageSets/ when present")
    options = ("list_file", "small_train")

    def __init__(self, *, root: Path, split: str, skip_bad: bool, list_file: str | Path | None = None,
                 small_train: bool = False) -> None:
        base = root if (root / "JPEGImages").is_dir() else root / "VOCdevkit" / "VOC2012"
        masks = next((d for d in (base / "SegmentationClassAug", root / "SegmentationClassAug") if d.is_dir()),
                     root / "SegmentationClassAug")
        list_path = Path(list_file) if list_file else self._split_list(base, split, small_train=small_train)
        # Without a list (none shipped), every image that has a mask is used, whatever the split.
        ids = self._pair(require_dir(base / "JPEGImages", "JPEGImages/"),
                         require_dir(masks, "SegmentationClassAug/"), list_path)
        super().__init__(root=root, split=split, class_names=list(VOC_CLASSES), ids=ids,
                         lists=[list_path] if list_path else [], skip_bad=skip_bad)

    @staticmethod
    def _split_list(base: Path, split: str, *, small_train: bool) -> Path | None:
        if split not in _VOC_LISTS:
            raise UserError(f"{base}: voc split must be one of {sorted(_VOC_LISTS)} (or pass list_file), got {split!r}")
        found = next((base / rel for rel in _VOC_LISTS[split] if (base / rel).is_file()), None)
        if found is None and split == "train" and (base / _VOC_SMALL_TRAIN).is_file():
            if not small_train:
                raise UserError(f"{base}: no train_aug.txt (SBD's 10,582-image training list the paper uses); put it "
                                f"at ImageSets/SegmentationAug/train_aug.txt (docs/datasets.md), or pass `dataset_options` "
                                f"small_train=true to train on the 1,464 images of {_VOC_SMALL_TRAIN}")
            found = base / _VOC_SMALL_TRAIN
        return found


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
            require_dir(root / name, f"fss class {name!r}")
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
        array = open_image_file(self.mask_path(index), "mask", np.asarray)
        if array.ndim == 3:
            array = array[..., :3].max(axis=2)
        return np.where(array >= 128, self._class_of[index], 0).astype(np.uint8)
