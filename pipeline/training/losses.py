"""Training loss: class-wise binary cross-entropy with ignored pixels and padded classes.

Fusioner scores each class of W independently (sigmoid, not softmax), so the
target of one sample is one binary map per class. Pixels labelled
``ignore_index`` (object boundaries in VOC) and padded class slots of a batch
contribute nothing. As released, each sample's loss is the mean over its own
valid pixels and the batch loss the mean over samples (``reduction="sample"``);
``"pixel"`` is the mean over every valid pixel of the batch, which weighs a
sample by how much of it is not ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.labels import IGNORE


def class_targets(mask: Tensor | np.ndarray, class_values: Sequence[int], *, ignore_index: int = IGNORE) -> Tensor:
    """Per-class binary targets from one label mask.

    ``mask`` [H, W] holds 0 for background, a class value k, or ``ignore_index``;
    the result [C, H, W] uint8 is 1 where the mask equals ``class_values[c]``,
    0 elsewhere, and keeps ``ignore_index`` on ignored pixels in every map.
    """
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W], got {tuple(mask.shape)}")
    values = torch.as_tensor(list(class_values), dtype=mask.dtype, device=mask.device)  # [C]
    targets = (mask[None] == values[:, None, None]).to(torch.uint8)  # [C, H, W]
    return targets.masked_fill(mask[None] == ignore_index, ignore_index)


def binary_segmentation_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    text_mask: Tensor | None = None,
    ignore_index: int = IGNORE,
    reduction: str = "sample",
) -> Tensor:
    """BCE-with-logits over valid pixels of real classes, reduced per sample (released) or per pixel.

    logits [B, C, H, W]; targets [B, C, H, W] in {0, 1, ignore_index};
    text_mask [B, C] bool, True = real class. ``reduction="sample"`` averages
    each sample over its own valid pixels (all its real classes together), then
    the samples that have any; ``"pixel"`` averages every valid pixel of the
    batch. Returns a scalar that is 0 (and still differentiable) when nothing is
    valid, so a fully ignored batch does not poison training with NaN.
    """
    if reduction not in ("sample", "pixel"):
        raise ValueError(f"reduction must be 'sample' or 'pixel', not {reduction!r}")
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    targets = targets.to(logits.device)
    valid = targets != ignore_index  # [B, C, H, W]
    if text_mask is not None:
        valid = valid & text_mask.to(device=logits.device, dtype=torch.bool)[:, :, None, None]
    # No boolean indexing and no branch on a value: either would make the host wait for the
    # device every step. Ignored pixels get target 0 and are then replaced (not multiplied:
    # padded logits are huge, and zero times an overflowed loss is NaN) by exact zeros.
    binary = torch.where(valid, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
    per_pixel = F.binary_cross_entropy_with_logits(logits, binary.to(logits.dtype), reduction="none")
    per_pixel = torch.where(valid, per_pixel, torch.zeros((), dtype=per_pixel.dtype, device=per_pixel.device))
    if reduction == "pixel":
        return per_pixel.sum() / valid.sum().clamp(min=1)  # 0, still differentiable, when nothing is valid
    counts = valid.flatten(1).sum(dim=1)  # [B] valid pixels of each sample
    per_sample = per_pixel.flatten(1).sum(dim=1) / counts.clamp(min=1)  # [B]
    has_pixels = (counts > 0).to(per_sample.dtype)  # a fully ignored sample is left out of the mean
    return (per_sample * has_pixels).sum() / has_pixels.sum().clamp(min=1)
