"""What the training loop trains on: one interface for every data path.

A :class:`BatchSource` yields one epoch's batches, in an order that depends only
on (seed, epoch), and starts ``skip`` batches into the epoch when a run resumes.
Each batch moves itself to the device (``to_device`` gives features, text rows,
text mask and per-class targets there), so the loop never asks which path it
has. The paths:

- :class:`MemorySource`: the split loaded once, fully random batches;
- :class:`StreamSource`: contiguous block reads into a shuffle buffer, targets
  built on the device (stores larger than memory);
- the online source (:mod:`pipeline.training.online`): fresh augmentations
  through the frozen encoder at every step.

The cached sources train on (view, classes) samples: every epoch each image
shows one of its K stored views (:func:`pipeline.training.batches.epoch_pairs`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from pipeline.store.reader import CachedSplit
from pipeline.training.batches import epoch_pairs, prefetch, training_batches
from pipeline.training.stream import stream_batches


class DeviceBatch(Protocol):
    views: np.ndarray  # [B] the rows (or samples) the batch holds

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [B, HW, Dv], text [B, W, Dt], text_mask [B, W], targets [B, W, S, S]) on ``device``."""


class BatchSource(ABC):
    """An epoch's batches; ``mode`` names the path in the run's records."""

    mode: str

    @abstractmethod
    def batches(self, *, epoch: int, skip: int = 0) -> Iterator[DeviceBatch]:
        """Epoch ``epoch``'s batches from batch ``skip`` on, in an order fixed by (seed, epoch)."""


@dataclass(frozen=True)
class Sampling:
    """How the cached sources turn samples into batches (the parts of the run's config they read)."""

    batch_size: int
    seed: int
    novel: tuple[int, ...]
    novel_pixels: str = "background"


class CachedSource(BatchSource):
    """The (image, classes) samples of a cached split and the K views each image has."""

    def __init__(self, *, split: CachedSplit, samples: list, table: np.ndarray, text: np.ndarray,
                 sampling: Sampling):
        self.split, self.samples, self.table, self.text, self.sampling = split, samples, table, text, sampling

    def epoch_samples(self, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
        """(view, classes) samples of one epoch: one of each image's K views, without replacement."""
        return epoch_pairs(pairs=self.samples, table=self.table, epoch=epoch, seed=self.sampling.seed)


class MemorySource(CachedSource):
    mode = "memory"

    def __init__(self, *, memory: dict, feature_noise: float = 0.0, pin: bool = False, **cached: Any):
        super().__init__(**cached)
        self.memory, self.feature_noise, self.pin = memory, feature_noise, pin

    def batches(self, *, epoch: int, skip: int = 0) -> Iterator[DeviceBatch]:
        s = self.sampling
        return prefetch(training_batches(
            samples=self.epoch_samples(epoch), memory=self.memory, text=self.text, batch_size=s.batch_size,
            epoch=epoch, seed=s.seed, novel=s.novel, novel_pixels=s.novel_pixels, skip_batches=skip,
            feature_noise=self.feature_noise), pin=self.pin)


class StreamSource(CachedSource):
    mode = "stream"

    def __init__(self, *, device: torch.device, readers: int = 4, **cached: Any):
        super().__init__(**cached)
        self.device, self.readers = device, readers

    def batches(self, *, epoch: int, skip: int = 0) -> Iterator[DeviceBatch]:
        s = self.sampling
        return prefetch(stream_batches(
            split=self.split, samples=self.epoch_samples(epoch), text=self.text, batch_size=s.batch_size,
            epoch=epoch, seed=s.seed, novel=s.novel, novel_pixels=s.novel_pixels, device=self.device,
            readers=self.readers, skip_batches=skip))


@dataclass(frozen=True)
class TrainingData:
    """Everything the loop needs from the data side.

    ``split`` describes what the batches look like (``grid``, ``input_size``, ``pretrained``,
    ``class_names``): the cached split, or the online source's description.
    """

    source: BatchSource
    split: Any
    samples: list
    text: np.ndarray  # [K, Dt], row k-1 = class value k
    fold: Any
    vision_dim: int

    @property
    def mode(self) -> str:
        return self.source.mode
