"""Forward FLOPs of a vision tower per view, counted on the meta device (no weights, no memory)."""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.encode.compat import ensure_torchvision
from pipeline.encode.registry import get_spec


def vision_flops_per_view(backbone: str, input_size: int | None = None) -> int:
    """FLOPs of one ``input_size`` view through ``backbone``'s vision tower (its registry architecture)."""
    return _counted(backbone, input_size or get_spec(backbone).input_size)


@lru_cache(maxsize=32)
def _counted(backbone: str, size: int) -> int:
    spec = get_spec(backbone)
    ensure_torchvision()
    if spec.family == "open_clip":
        import open_clip

        kwargs = {"force_image_size": size} if size != spec.input_size else {}
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "no pretrained weights loaded": none are wanted here
        try:
            with torch.device("meta"):  # built without memory or initialisation, and left there
                tower = open_clip.create_model(spec.arch, pretrained=None, device="meta", **kwargs).visual
        finally:
            root.setLevel(level)
    elif spec.family == "timm":
        import timm

        with torch.device("meta"):
            tower = timm.create_model(spec.arch, pretrained=False, img_size=size)
    else:
        raise ValueError(f"{backbone} has no vision tower")
    with FlopCounterMode(display=False) as counter:
        tower(torch.empty(1, 3, size, size, device="meta"))
    return int(counter.get_total_flops())
