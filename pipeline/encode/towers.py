"""Frozen towers: uint8 images in, patch tokens out; class names in, prompt-averaged embeddings out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.encode.prompts import TEMPLATES, fill
from pipeline.encode.registry import EncoderSpec
from pipeline.runtime import progress


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; saved in every store and report."""

    pretrained: bool
    source: str  # "random-init", a hub tag, or a file path
    sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class VisionEncoder:
    """A frozen vision tower: normalised uint8 images in, patch tokens out."""

    def __init__(self, *, spec: EncoderSpec, tower: nn.Module, forward_tokens, input_size: int,
                 weights: WeightsInfo, device: torch.device):
        self.spec = spec
        self.tower = frozen(tower).to(device)
        self.forward_tokens = forward_tokens
        self.input_size = input_size
        self.grid = spec.grid(input_size)
        self.dim = spec.vision_dim
        self.weights = weights
        self.device = device
        self.use_normalization(mean=spec.mean, std=spec.std)

    def use_normalization(self, *, mean, std) -> None:
        """Normalise with these statistics instead (the released recipe's dataset statistics)."""
        self._mean = torch.tensor(list(mean), device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(list(std), device=self.device, dtype=torch.float32).view(1, 3, 1, 1)

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, S, S, 3] uint8 -> [B, 3, S, S] float, the encoder's mean/std applied."""
        batch = torch.as_tensor(images).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, S, S]
        return (batch - self._mean) / self._std

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, S, S, 3] uint8 images -> [B, h*w, D] patch tokens (``dtype``, on the encoder's device).

        On CUDA the forward pass runs under bf16 autocast (fp32 range: no overflow
        in deep towers); the store keeps float16 either way.
        """
        pixels = self.normalize(images)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            tokens = self.forward_tokens(pixels)  # [B, h*w, D]
        return tokens.to(dtype)


class TextEncoder:
    """A frozen text tower: class names in, prompt-averaged embeddings out."""

    def __init__(self, *, spec: EncoderSpec, encode_sentences, weights: WeightsInfo,
                 device: torch.device, dim: int):
        self.spec = spec
        self._encode_sentences = encode_sentences
        self.weights = weights
        self.device = device
        self.dim = dim

    @torch.inference_mode()
    def encode_names(self, names: Sequence[str], *, templates: Sequence[str] = TEMPLATES,
                     batch_size: int = 256, quiet: bool = True) -> torch.Tensor:
        """[C] names -> [C, D]: each template embedding normalised, averaged, normalised.

        ``quiet=False`` shows a progress bar over the prompts (80 names x 32 templates take
        tens of seconds on a CPU).
        """
        sentences = [s for name in names for s in fill(tuple(templates), name)]
        chunks = []
        with progress(total=len(sentences), desc=f"{self.spec.name} text", unit="prompt", quiet=quiet) as bar:
            for i in range(0, len(sentences), batch_size):
                chunks.append(self._encode_sentences(sentences[i:i + batch_size]))
                bar.update(len(chunks[-1]))
        emb = torch.cat(chunks).float()  # [C * T, D]
        emb = nn.functional.normalize(emb, dim=-1).view(len(names), len(templates), -1)
        return nn.functional.normalize(emb.mean(dim=1), dim=-1)  # [C, D]


@dataclass
class Encoders:
    spec: EncoderSpec
    vision: VisionEncoder | None
    text: TextEncoder | None

    @property
    def weights(self) -> WeightsInfo:
        return (self.vision or self.text).weights
