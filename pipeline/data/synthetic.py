"""Generated datasets (coloured shapes on noise) shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_demo_dataset(root: Path, *, images: int = 24, size: int = 128) -> Path:
    """A folder dataset over the 20 VOC classes: two large rectangles of two classes per image."""
    from PIL import Image

    from pipeline.data.labels import VOC_CLASSES

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    colours = rng.integers(0, 256, size=(len(VOC_CLASSES) + 1, 3))
    half = size // 2
    for i in range(images):
        image = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        first, second = i % 20 + 1, (i * 7 + 3) % 20 + 1
        second = second if second != first else second % 20 + 1
        for value, x0 in ((first, 4), (second, half + 4)):
            y0 = int(rng.integers(4, size - half))
            mask[y0:y0 + half - 8, x0:x0 + half - 8] = value
            image[y0:y0 + half - 8, x0:x0 + half - 8] = colours[value]
        Image.fromarray(image).save(root / "images" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
    return root

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
NOVEL_SHAPES = ("star", "ring")


def _draw_shape(draw: ImageDraw.ImageDraw, *, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = np.pi / 2 + i * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(3, int(r * 0.35)))
    elif kind == "cross":
        t = r * 0.35
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)


def make_shapes_dataset(*, out: Path, count: int = 64, seed: int = 0, size: tuple[int, int] = (180, 240)) -> Path:
    """Photos-like noise backgrounds with 1-3 coloured shapes each, in the mask-folder layout."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    height, width = size
    for i in range(count):
        base = rng.integers(60, 200, size=3)
        noise = rng.normal(0, 18, size=(height, width, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        mask = Image.new("L", (width, height), 0)
        draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(len(SHAPES)))
            short = min(height, width)
            side = int(rng.integers(int(0.28 * short), int(0.55 * short) + 1))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            _draw_shape(draw, kind=SHAPES[k], box=(x0, y0, x0 + side, y0 + side), fill=colour)
            _draw_shape(mdraw, kind=SHAPES[k], box=(x0, y0, x0 + side, y0 + side), fill=k + 1)
        image.save(out / "images" / f"shape_{i:04d}.jpg", quality=92)
        mask.save(out / "masks" / f"shape_{i:04d}.png")
    return out


def split_lists(*, root: Path, out: Path, val_fraction: float = 0.25) -> tuple[Path, Path]:
    """Deterministic train/val id lists (the last quarter of the sorted ids is val)."""
    ids = sorted(p.stem for p in (root / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    cut = int(round(len(ids) * (1 - val_fraction)))
    train, val = out / "train.txt", out / "val.txt"
    train.write_text("\n".join(ids[:cut]) + "\n")
    val.write_text("\n".join(ids[cut:]) + "\n")
    return train, val


def make_class_scenes(*, out: Path, class_names: list[str] | tuple[str, ...], count: int, seed: int = 0,
                      size: tuple[int, int] = (96, 128), per_image: tuple[int, int] = (2, 4)) -> Path:
    """Scenes of many named classes, in the mask-folder layout: ``per_image`` shapes of random classes each.

    The pixels are flat colours on noise and carry no meaning; what matters is the masks, which
    a planted feature store (:mod:`pipeline.encode.planted`) turns into tokens class by class.
    """
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(class_names) + "\n")
    height, width = size
    short = min(height, width)
    for i in range(count):
        image = Image.fromarray(rng.integers(40, 200, size=(height, width, 3)).astype(np.uint8))
        mask = Image.new("L", (width, height), 0)
        draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
            value = int(rng.integers(len(class_names))) + 1
            kind = SHAPES[int(rng.integers(3))]  # circle, square, triangle: solid shapes
            side = int(rng.integers(int(0.3 * short), int(0.6 * short) + 1))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            _draw_shape(draw, kind=kind, box=(x0, y0, x0 + side, y0 + side), fill=colour)
            _draw_shape(mdraw, kind=kind, box=(x0, y0, x0 + side, y0 + side), fill=value)
        image.save(out / "images" / f"scene_{i:04d}.jpg", quality=90)
        mask.save(out / "masks" / f"scene_{i:04d}.png")
    return out
