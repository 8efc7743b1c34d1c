"""Views of an image for evaluation and prediction: sliding windows, the whole image resized, stitching back.

An evaluation view is fully described by a few numbers (its box in the original
image, a flip bit, colour-jitter factors), stored beside the features, so the
mask of every cached view is exact. Training views are rendered by the seeded
augmentation of :mod:`pipeline.data.augment` instead (their plan row is the whole image).

Box convention: ``(x0, y0, x1, y1)`` in original-image pixels, the region that
maps onto the whole S x S view. For windows on images smaller than the window
the box reaches past the image; those view pixels are filled (:func:`pad_fill`:
by default the colour that normalises to -1, as the released code pads its
normalised tensor) and their mask is the ignore label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from pipeline.data.labels import IGNORE
from pipeline.errors import UserError


IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class ViewParams:
    box: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[float, float, float, float] = IDENTITY_JITTER  # brightness, contrast, saturation, hue


LAST_WINDOW = ("pad", "slide")
WINDOW_FILLS = ("released", "black")


def pad_fill(*, fill: str, mean, std) -> tuple[int, int, int]:
    """The RGB value of padded window pixels.

    ``released``: the colour that the normalisation ``(x / 255 - mean) / std`` maps to -1, the value the
    released code pads its normalised tensor with (to within half a grey level: 86, 79, 67 under the
    PASCAL statistics); ``black``: 0, as stores extracted before this choice existed were padded.
    """
    if fill not in WINDOW_FILLS:
        raise UserError(f"window fill must be one of {', '.join(WINDOW_FILLS)}, got {fill!r}")
    if fill == "black":
        return (0, 0, 0)
    return tuple(int(np.clip(round((m - s) * 255.0), 0, 255)) for m, s in zip(mean, std))


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


def render_view(*, image: np.ndarray, mask: np.ndarray | None, params: ViewParams, size: int,
                fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``params.box``, resize to ``size`` (bilinear / nearest), flip, jitter.

    Returns the [S, S, 3] uint8 view (``fill`` outside the image) and its [S, S] uint8 mask (the ignore
    label outside the image).
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = params.box
    inside = x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
    # Only the window's pixels are handed to PIL: PIL copies whatever array it is given, and a
    # whole 8000 x 6000 photo per window made prediction on large photos crawl (issue 14).
    if inside:
        window = image[y0:y1, x0:x1]
        window_mask = mask[y0:y1, x0:x1] if mask is not None else None
    else:  # pad: only windows on images smaller than the window
        window = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        window[:] = np.asarray(fill, np.uint8)
        window_mask = np.full((y1 - y0, x1 - x0), IGNORE, np.uint8) if mask is not None else None
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        window[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        if mask is not None:
            window_mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    crop = Image.fromarray(np.ascontiguousarray(window))
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.BILINEAR)
    if params.jitter != IDENTITY_JITTER:
        crop = _jitter(crop, params.jitter)
    view = np.asarray(crop, dtype=np.uint8)
    view_mask = None
    if mask is not None:
        mcrop = Image.fromarray(np.ascontiguousarray(window_mask))
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


class Stitcher:
    """Per-view maps accumulated onto the original image as they come, averaged where views overlap.

    Adding views batch by batch holds one batch of view maps at a time, never all of them; the sums
    are made in view order, so the result does not depend on how the views were batched.
    """

    def __init__(self, *, channels: int, height: int, width: int, device: torch.device | str = "cpu",
                 mode: str = "bilinear"):
        self.height, self.width, self.mode = height, width, mode
        self.total = torch.zeros(channels, height, width, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, height, width, dtype=torch.float32, device=device)

    def add(self, values: torch.Tensor, *, boxes: np.ndarray, flips: np.ndarray) -> None:
        """Views [V, C, S, S] whose boxes and flips are ``boxes[v]``, ``flips[v]``."""
        for v in range(values.shape[0]):
            x0, y0, x1, y1 = (int(b) for b in boxes[v])
            view = values[v].float()  # [C, S, S]
            if flips[v]:
                view = view.flip(-1)
            if view.shape[-2:] != (y1 - y0, x1 - x0):
                kwargs = {"align_corners": False} if self.mode == "bilinear" else {}
                view = F.interpolate(view[None], size=(y1 - y0, x1 - x0), mode=self.mode, **kwargs)[0]
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
            self.total[:, sy0:sy1, sx0:sx1] += view[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
            self.count[:, sy0:sy1, sx0:sx1] += 1

    def result(self) -> torch.Tensor:
        """[C, H, W] the average; divides in place (no second full-size copy), so call it once."""
        return self.total.div_(self.count.clamp_min(1))


def stitch(values: torch.Tensor, *, boxes: np.ndarray, flips: np.ndarray, height: int, width: int,
           mode: str = "bilinear") -> torch.Tensor:
    """Per-view maps [V, C, S, S] -> [C, H, W] on the original image, averaged where views overlap."""
    stitcher = Stitcher(channels=values.shape[1], height=height, width=width, device=values.device, mode=mode)
    stitcher.add(values, boxes=boxes, flips=flips)
    return stitcher.result()
