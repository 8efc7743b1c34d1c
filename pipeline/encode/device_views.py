"""Training views augmented on the encoder's device (``augment.backend == "gpu"``).

The render step (a thread or the render processes) only decodes: each image of
a shard once, with the (image, view) numbers of the rows that use it
(:class:`DecodedViews`). :func:`finish_on_device` then draws and renders the
shard's views in batches on the device the encoder runs on
(:mod:`pipeline.data.augment_gpu`), so the views never leave it before the
forward pass; only the masks come back, for the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.augment import AugmentConfig
from pipeline.data.labels import IGNORE

DEVICE_BATCH = 256  # views rendered at once: bounds the device memory of a large shard (~0.6 GB float at 224 px)


def renders_on_device(meta: dict, kind: str) -> bool:
    """Whether a split's training views are augmented on the device (its plan recorded the gpu backend)."""
    return kind == "views" and (meta.get("augment") or {}).get("backend") == "gpu"


@dataclass
class DecodedViews:
    """A shard's decoded images and, per row, which one it shows and its (image, view) seed numbers."""

    count: int
    images: list = field(default_factory=list)  # [H, W, 3] uint8, one per distinct image
    masks: list = field(default_factory=list)  # [H, W] uint8 or None
    slot: np.ndarray | None = None  # [S] index into images, -1 for a row left out (unreadable image)
    image_index: np.ndarray | None = None  # [S]
    view_index: np.ndarray | None = None  # [S]

    def __post_init__(self) -> None:
        if self.slot is None:
            self.slot = np.full(self.count, -1, np.int64)
            self.image_index = np.zeros(self.count, np.int64)
            self.view_index = np.zeros(self.count, np.int64)

    def add_image(self, record) -> int:
        self.images.append(record.image)
        self.masks.append(record.mask)
        return len(self.images) - 1

    def add_row(self, row: int, *, slot: int, image_index: int, view_index: int) -> None:
        self.slot[row], self.image_index[row], self.view_index[row] = slot, image_index, view_index

    def as_dict(self) -> dict:
        """For a render process to return: the decoded pixels as tensors, which cross to the parent in shared
        memory (numpy arrays would be pickled through a pipe)."""
        def shared(array):
            return None if array is None else torch.from_numpy(np.require(array, requirements="CW"))

        return {"count": self.count, "images": [shared(a) for a in self.images],
                "masks": [shared(m) for m in self.masks], "slot": self.slot, "image_index": self.image_index,
                "view_index": self.view_index}

    @classmethod
    def from_dict(cls, found: dict) -> DecodedViews:
        """The inverse of :meth:`as_dict`: numpy views of the tensors, no copy."""
        def array(value):
            return value.numpy() if isinstance(value, torch.Tensor) else value

        return cls(**{**found, "images": [array(a) for a in found["images"]],
                      "masks": [array(m) for m in found["masks"]]})


def finish_on_device(rendered, *, meta: dict, size: int, device: torch.device | str):
    """``rendered`` (a shard whose views were only decoded) with its views rendered on ``device``.

    Its images become a [S, size, size, 3] uint8 tensor on the device, its masks a [S, size, size] uint8 array
    (ignore for rows left out). A shard rendered on the host is returned as it is.
    """
    from pipeline.data.augment_gpu import augment_batch

    decoded = rendered.decoded
    if decoded is None:
        return rendered
    device = torch.device(device)
    config = AugmentConfig(**meta["augment"])
    images = torch.zeros((decoded.count, size, size, 3), dtype=torch.uint8, device=device)
    masks = np.full((decoded.count, size, size), IGNORE, np.uint8)
    rows = np.flatnonzero(decoded.slot >= 0)
    for begin in range(0, rows.size, DEVICE_BATCH):
        chunk = rows[begin:begin + DEVICE_BATCH]
        views, labels = augment_batch(images=decoded.images, masks=decoded.masks, source=decoded.slot[chunk],
                                      config=config, size=size, seed=int(meta["seed"]),
                                      image_index=decoded.image_index[chunk], view_index=decoded.view_index[chunk],
                                      device=device)
        images[torch.as_tensor(chunk, device=device)] = views
        masks[chunk] = labels.cpu().numpy()
    rendered.images, rendered.masks, rendered.decoded = images, masks, None
    return rendered
