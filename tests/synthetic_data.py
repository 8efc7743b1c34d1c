"""Generated data shared by the tests: small datasets in each reader's layout, a cached store, a trained run.

Everything here is made from seeded random numbers on disk under pytest's
temporary folders; nothing is downloaded. The real photos of ``../shared``
come from the fixtures in ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.data.labels import VOC_CLASSES
from pipeline.data.protocols import create_protocol
from pipeline.data.augment import AugmentConfig
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.training.config import build_config
from pipeline.training.loop import train

# Class value -> colour. 6 bus, 8 cat, 12 dog, 15 person are seen in PASCAL-5i fold 0; 1 aeroplane, 3 bird novel.
COLOURS = {6: (230, 40, 40), 8: (40, 200, 60), 12: (50, 80, 240), 15: (240, 220, 40),
           1: (220, 60, 220), 3: (40, 220, 220)}


SEEN = (6, 8, 12, 15)


NOVEL = (1, 3)


# Sizes with windows overlapping in both directions at 64 px, and one (50 x 70) shorter than a window.
SIZES = ((100, 140), (120, 90), (50, 70), (96, 96))


IMAGES = 24


INPUT = 64


VIEWS = 2


SHARD = 8


FOLD0 = create_protocol("pascal5i").fold(0)


@dataclass(frozen=True)
class Generated:
    data: Path
    vision: Path  # test-vit random-init: folder/train (2 views per image), folder/val (64 px windows),
    # folder/test (each image resized whole, --eval-resize)
    text: Path  # minilm (real weights): the 20 VOC names


def write_rectangles(root: Path, *, images: int = IMAGES, seed: int = 0) -> Path:
    """A folder dataset of two solid rectangles per image on grey noise; every third image has an ignore frame."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    values = list(COLOURS)
    for n in range(images):
        height, width = SIZES[n % len(SIZES)]
        image = rng.integers(60, 110, (height, width, 3)).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for value in rng.choice(values, size=2, replace=False):
            rh, rw = int(rng.integers(height // 4, height // 2 + 1)), int(rng.integers(width // 4, width // 2 + 1))
            y0, x0 = int(rng.integers(0, height - rh + 1)), int(rng.integers(0, width - rw + 1))
            mask[y0:y0 + rh, x0:x0 + rw] = value
            image[y0:y0 + rh, x0:x0 + rw] = COLOURS[int(value)]
        if n % 3 == 0:
            mask[:2], mask[-2:] = 255, 255
        Image.fromarray(image).save(root / "images" / f"g{n:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"g{n:03d}.png")
    return root


def generated_train_split(made: Generated) -> ExtractConfig:
    """The extraction of the generated cache's training split (the same command repairs a damaged copy)."""
    # The released crop pair without the p = 0.5 photometric/geometric block: the tiny model must learn the
    # rectangles in a few epochs for the stitching and scoring checks that use this cache.
    return ExtractConfig(out=str(made.vision), backbone="test-vit", dataset="folder", data_root=str(made.data),
                         input_size=INPUT, random_init=True, vision_only=True, device="cpu", views=VIEWS,
                         shard_size=SHARD, augment=AugmentConfig(block_p=0.0))


def generated_cache(base: Path) -> Generated:
    """Build the shared cache once per test session (modules find it on disk), ~30 s on 2 cores."""
    made = Generated(data=base / "data", vision=base / "test-vit", text=base / "minilm")
    if (base / "done").is_file():
        return made
    shutil.rmtree(base, ignore_errors=True)  # a build interrupted part-way (the sweep caches do the same)
    write_rectangles(made.data)
    common = dict(backbone="test-vit", dataset="folder", data_root=str(made.data), input_size=INPUT,
                  random_init=True, vision_only=True, device="cpu")
    extract(config=generated_train_split(made), quiet=True)
    extract(config=ExtractConfig(out=str(made.vision), split="val", **common), quiet=True)
    extract(config=ExtractConfig(out=str(made.vision), split="test", eval_resize=True, **common), quiet=True)
    extract(config=ExtractConfig(out=str(made.text), backbone="minilm", text_only=True, dataset="folder",
                                 data_root=str(made.data), device="cpu"), quiet=True)
    (base / "done").write_text("ok\n")
    return made


TINY_SIZES = ((48, 64), (64, 48), (40, 40), (70, 90), (56, 56), (33, 47))


TINY_CLASSES = ("cat", "dog", "traffic light")


def write_folder_dataset(root: Path, *, sizes=TINY_SIZES, classes=TINY_CLASSES, seed: int = 0) -> Path:
    """A folder-layout dataset of smooth random JPEGs with a box of each class and an ignore strip."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for n, (h, w) in enumerate(sizes):
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        mask = np.zeros((h, w), np.uint8)
        for value in range(1, len(classes) + 1):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[y0:y0 + h // 3, x0:x0 + w // 3] = value
        mask[:, :2] = 255
        Image.fromarray(image).save(root / "images" / f"img{n:03d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"img{n:03d}.png")
    return root


# The 80 official COCO category names, in category-id order.
COCO_OFFICIAL = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def save_rgb(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def save_mask(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8))
    if mode == "P":  # an L image given a palette keeps its values as palette indices
        image.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    image.save(path)


def make_voc(root: Path) -> Path:
    """Three VOC-layout images with palette masks and 255 borders; a val list naming two of them."""
    for n, (image_id, value) in enumerate((("2008_000001", 1), ("2008_000002", 15), ("2008_000003", 20))):
        save_rgb(root / "JPEGImages" / f"{image_id}.jpg", 12, 16, seed=n)
        mask = np.zeros((12, 16), np.uint8)
        mask[2:8, 3:10] = value
        mask[0, :] = 255
        save_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask, mode="P")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000001\n2008_000003\n")
    return root


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "kite")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for n in range(3):
        save_rgb(root / "images" / f"im{n}.jpg", 10, 10, seed=n)
        mask = np.zeros((10, 10), np.uint8)
        mask[n:n + 4, :5] = n + 1
        save_mask(root / "masks" / f"im{n}.png", mask)
    return root


def make_fss(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox", "owl", "yak"), per_class: int = 3,
             size: int = 12) -> Path:
    """An FSS-1000-like tree; every second mask is RGB (as some FSS masks are)."""
    for c, name in enumerate(classes):
        for n in range(1, per_class + 1):
            save_rgb(root / name / f"{n}.jpg", size, size, seed=10 * c + n)
            mask = np.zeros((size, size), np.uint8)
            mask[n:n + size // 2, 1:size // 2 + c % 3] = 255
            if n % 2:
                Image.fromarray(np.stack([mask] * 3, axis=2)).save(root / name / f"{n}.png")
            else:
                save_mask(root / name / f"{n}.png", mask)
    return root


def sideways_photo(path, *, height: int = 40, width: int = 64, orientation: int = 6):
    """A phone's portrait photo: pixels stored landscape (height x width), EXIF saying turn them upright."""
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    return path



def make_coco(root: Path) -> Path:
    """Two val2014 images and an instances json with official names and non-contiguous ids."""
    names = {1: "person", 5: "airplane", 67: "dining table", 72: "tv"}
    files = ["COCO_val2014_000000000007.jpg", "COCO_val2014_000000000003.jpg"]
    for n, name in enumerate(files):
        save_rgb(root / "val2014" / name, 20, 30, seed=n)
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 67, "iscrowd": 0, "area": 300.0, "segmentation": polygon(0, 0, 30, 20)},
        {"id": 2, "image_id": 7, "category_id": 72, "iscrowd": 0, "area": 16.0, "segmentation": polygon(4, 4, 8, 8)},
        {"id": 3, "image_id": 3, "category_id": 5, "iscrowd": 0, "area": 50.0, "segmentation": polygon(0, 0, 10, 5)},
        {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 1, "area": 60.0,
         "segmentation": {"size": [20, 30], "counts": [20 * 20, 20 * 10]}},  # uncompressed RLE: right third
        {"id": 5, "image_id": 3, "category_id": 72, "iscrowd": 0, "area": 16.0, "segmentation": compressed_rle()},
    ]
    data = {"images": [{"id": 7, "file_name": files[0], "height": 20, "width": 30},
                       {"id": 3, "file_name": files[1], "height": 20, "width": 30}],
            "categories": [{"id": i, "name": n} for i, n in names.items()], "annotations": annotations}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    return root


def with_bad_images(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Tiny data plus one truncated JPEG (header fine, pixels cut) and one that is not a JPEG at all."""
    data = write_folder_dataset(tmp_path / "data", sizes=TINY_SIZES[:3])
    good = (data / "images" / "img000.jpg").read_bytes()
    truncated, junk = data / "images" / "img100.jpg", data / "images" / "img101.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    for name in ("img100", "img101"):
        shutil.copy(data / "masks" / "img000.png", data / "masks" / f"{name}.png")
    return data, truncated, junk


LEARN_EPOCHS = 12  # 6 passes over both views of every image: an epoch is one pass over the (image, class) pairs


def train_overrides(gen: Generated, out: Path, *extra: str) -> list[str]:
    """The generated cache, PASCAL-5i fold 0, small batches, every step logged."""
    return [f"data.cache={gen.vision}", f"data.text_cache={gen.text}", "data.split=folder/train",
            "data.protocol=pascal5i", "data.fold=0", "optim.batch_size=8", "optim.warmup_epochs=1",
            f"out={out}", "log_every=1", *extra]


def trained_run(gen: Generated, base: Path) -> Path:
    """A run of the tiny preset on the generated data, trained once per session (test_evaluate uses it too)."""
    run = base / "learned"
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, f"optim.epochs={LEARN_EPOCHS}")),
              quiet=True)
    return run


def polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def compressed_rle() -> dict:
    """A 4x4 square at rows 12..15, cols 2..5 as a compressed (string) RLE, the form crowd json uses."""
    region = np.zeros((20, 30), np.uint8, order="F")
    region[12:16, 2:6] = 1
    rle = coco_mask.encode(region)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


TINY_VIEWS, TINY_SHARD = 3, 4  # 18 views of the 6 tiny images: shards of 4, the last one holds 2


def tiny_extract_config(data: Path, out: Path, **changes) -> ExtractConfig:
    base = dict(backbone="test-vit", out=str(out), dataset="folder", data_root=str(data), views=TINY_VIEWS,
                input_size=32, shard_size=TINY_SHARD, random_init=True, device="cpu")
    return ExtractConfig(**{**base, **changes})


def store_arrays(path: Path, split: str = "folder/train") -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")[split]
    return {name: group[name][...] for name in ("features", "masks", "view_classes", "view_valid", "shard_done")}


def assert_same_store(a: Path, b: Path, split: str = "folder/train") -> None:
    """Bit-identical data arrays (features compared as raw float16 bits)."""
    left, right = store_arrays(a, split), store_arrays(b, split)
    assert left["features"].dtype == right["features"].dtype == np.float16
    for name in left:
        x, y = left[name], right[name]
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        assert np.array_equal(x, y), name


def render_then_die(**kwargs):
    """A render function whose process is killed (as by the OOM killer) on its second shard."""
    import os
    import signal

    from pipeline.encode.shards import render_shard

    if kwargs["shard"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return render_shard(**kwargs)
