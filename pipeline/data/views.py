"""Views of an image: seeded augmented crops for training, sliding windows for evaluation.

A view is fully described by a few numbers (its box in the original image, a
flip bit, colour-jitter factors), drawn from a generator seeded by
``(seed, image index, view index)``. They are stored beside the features, so
the mask of every cached view is exact, and re-running an extraction (or
resuming one) renders the very same pixels.

Box convention: ``(x0, y0, x1, y1)`` in original-image pixels, the region that
maps onto the whole S x S view. For windows on images smaller than the window
the box reaches past the image; those view pixels are zero-filled and their
mask is the ignore label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from pipeline.data.labels import IGNORE
from pipeline.errors import UserError


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of the released recipe that survives caching."""

    scale: tuple[float, float] = (0.5, 1.0)  # random resized crop, area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1


IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class ViewParams:
    box: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[float, float, float, float] = IDENTITY_JITTER  # brightness, contrast, saturation, hue


def view_rng(*, seed: int, image_index: int, view_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, image_index, view_index])


def sample_view(*, rng: np.random.Generator, height: int, width: int, aug: AugmentConfig) -> ViewParams:
    """One random-resized-crop view (torchvision's rule: 10 tries, then a centre crop)."""
    area = height * width
    box = None
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    if box is None:
        side = min(height, width)
        x0, y0 = (width - side) // 2, (height - side) // 2
        box = (x0, y0, x0 + side, y0 + side)
    flip = bool(rng.random() < aug.flip_p)
    jitter = IDENTITY_JITTER
    if rng.random() < aug.jitter_p:
        jitter = (
            float(rng.uniform(1 - aug.brightness, 1 + aug.brightness)),
            float(rng.uniform(1 - aug.contrast, 1 + aug.contrast)),
            float(rng.uniform(1 - aug.saturation, 1 + aug.saturation)),
            float(rng.uniform(-aug.hue, aug.hue)),
        )
    return ViewParams(box=box, flip=flip, jitter=jitter)


LAST_WINDOW = ("pad", "slide")


def window_boxes(*, height: int, width: int, size: int, stride: int,
                 last: str = "pad") -> list[tuple[int, int, int, int]]:
    """Sliding windows at the original resolution covering the whole image.

    Positions step by ``stride``. ``last="pad"`` (the released recipe) keeps
    stepping until the far edge is covered, so the last window reaches past the
    image and is padded (black pixels, ignore label); ``"slide"`` moves it back
    to end on the far edge instead. A side shorter than ``size`` gets one
    padded window at 0 either way.
    """
    if last not in LAST_WINDOW:
        raise UserError(f"last window must be one of {', '.join(LAST_WINDOW)}, got {last!r}")

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        positions = list(range(0, length - size, stride))
        if last == "slide":
            return positions + [length - size]
        return positions + [positions[-1] + stride]  # positions[-1] + size < length: one more, padded

    return [(x, y, x + size, y + size) for y in starts(height) for x in starts(width)]


def _jitter(image: Image.Image, factors: tuple[float, float, float, float]) -> Image.Image:
    brightness, contrast, saturation, hue = factors
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    image = ImageEnhance.Color(image).enhance(saturation)
    if hue:
        hsv = np.array(image.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(hue * 255))) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


def render_view(*, image: np.ndarray, mask: np.ndarray | None, params: ViewParams,
                size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``params.box``, resize to ``size`` (bilinear / nearest), flip, jitter.

    Returns the [S, S, 3] uint8 view and its [S, S] uint8 mask (the ignore label outside the image).
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = params.box
    inside = x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
    if not inside:  # pad: only windows on images smaller than the window
        pad_img = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        pad_mask = np.full((y1 - y0, x1 - x0), IGNORE, np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        pad_img[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        if mask is not None:
            pad_mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
        image, mask = pad_img, (pad_mask if mask is not None else None)
        x0, y0, x1, y1 = 0, 0, x1 - x0, y1 - y0
    crop = Image.fromarray(image).crop((x0, y0, x1, y1))
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.BILINEAR)
    if params.jitter != IDENTITY_JITTER:
        crop = _jitter(crop, params.jitter)
    view = np.asarray(crop, dtype=np.uint8)
    view_mask = None
    if mask is not None:
        mcrop = Image.fromarray(mask).crop((x0, y0, x1, y1))
        if mcrop.size != (size, size):
            mcrop = mcrop.resize((size, size), Image.NEAREST)
        view_mask = np.asarray(mcrop, dtype=np.uint8)
    if params.flip:
        view = view[:, ::-1]
        view_mask = view_mask[:, ::-1] if view_mask is not None else None
    return np.ascontiguousarray(view), (np.ascontiguousarray(view_mask) if view_mask is not None else None)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image squashed to [S, S, 3] (``--eval-resize`` and prediction)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def stitch(values: torch.Tensor, *, boxes: np.ndarray, flips: np.ndarray, height: int, width: int,
           mode: str = "bilinear") -> torch.Tensor:
    """Per-view maps [V, C, S, S] -> [C, H, W] on the original image, averaged where views overlap."""
    channels = values.shape[1]
    total = torch.zeros(channels, height, width, dtype=torch.float32, device=values.device)
    count = torch.zeros(1, height, width, dtype=torch.float32, device=values.device)
    for v in range(values.shape[0]):
        x0, y0, x1, y1 = (int(b) for b in boxes[v])
        view = values[v].float()  # [C, S, S]
        if flips[v]:
            view = view.flip(-1)
        if view.shape[-2:] != (y1 - y0, x1 - x0):
            kwargs = {"align_corners": False} if mode == "bilinear" else {}
            view = F.interpolate(view[None], size=(y1 - y0, x1 - x0), mode=mode, **kwargs)[0]
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        total[:, sy0:sy1, sx0:sx1] += view[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
        count[:, sy0:sy1, sx0:sx1] += 1
    return total / count.clamp_min(1)
