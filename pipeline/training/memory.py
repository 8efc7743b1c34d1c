"""Peak device memory of one training run, counted from its model config before it starts.

A sweep that packs several runs onto one GPU must know, before starting a run, whether it
fits beside the others. The count, in bytes, for a model of P trainable parameters trained
on batches of B samples (``grid`` patch tokens, ``classes`` names each, ``out_size``² pixels):

    peak = context + margin x (weights + gradients + AdamW + autocast copies
                               + activations(B) + inputs(B) + transient(B))

- weights 4P, gradients 4P, AdamW's two moments 8P (fp32, the loop's optimiser); under
  bf16 autocast a bf16 copy of every weight, 2P, lives for the step. P is exact: the
  model is built on the meta device (no memory, no compute).
- activations(B): every tensor autograd saves for the backward pass, counted by running
  the forward and the loss on the meta device at batch B under ``saved_tensors_hooks``.
  Each saved tensor is counted at 4 bytes per element, and once per op that saves it.
- inputs(B): the batch on the device (features fp32, text rows, text mask, uint8 targets).
- transient(B): the backward's gradient of the largest saved tensor plus the tensor
  itself (the widest moment of the backward pass), 2 x the largest saved tensor.
- margin :data:`MARGIN` (1.25) for the caching allocator's fragmentation and small
  temporaries; context :data:`CUDA_CONTEXT` (1 GiB) on CUDA for the CUDA context, cuBLAS
  and cuDNN workspaces (about 0.5 GiB on recent cards), 0 on CPU.

How conservative: it counts the attention probabilities in the math form (T² per head;
fused kernels on GPU keep none), every saved tensor at fp32 (bf16 autocast saves the
matmul inputs at half that) and a tensor two ops save twice; so on CUDA it sits above the
real peak, on a small model mostly by the fixed context. Not counted: ``torch.compile``'s
own buffers and the online mode's frozen encoder (a sweep gives an online run a whole
device). ``tests/training/test_memory.py`` holds the activation count to the bytes a real
CPU forward saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.model import ModelConfig, build_model

MARGIN = 1.25
CUDA_CONTEXT = 1 << 30
FP32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of a run's peak device memory, in bytes; ``total`` is what a scheduler reserves."""

    parameters: int  # P, a count, not bytes
    weights: int
    gradients: int
    optimizer: int
    autocast: int
    activations: int
    inputs: int
    transient: int
    context: int
    total: int

    def as_dict(self) -> dict:
        return asdict(self)


def saved_bytes(model: torch.nn.Module, *, grid: tuple[int, int], classes: int, batch: int,
                size: int) -> tuple[int, int]:
    """(sum, largest) bytes of the tensors one forward + loss of ``model`` saves for backward, at fp32.

    On the meta device the inputs cost nothing and no arithmetic runs; on a real device this is
    the same count of a real forward (used by the tests).
    """
    from pipeline.training.losses import binary_segmentation_loss

    config: ModelConfig = model.config
    device = model.anchor.device
    visual = torch.zeros(batch, grid[0] * grid[1], config.vision_dim, device=device)
    text = torch.zeros(batch, classes, config.text_dim, device=device)
    mask = torch.ones(batch, classes, dtype=torch.bool, device=device)
    targets = torch.zeros(batch, classes, size, size, dtype=torch.uint8, device=device)
    counted = {"sum": 0, "largest": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * FP32
        counted["sum"] += nbytes
        counted["largest"] = max(counted["largest"], nbytes)
        return tensor

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(visual, text, grid=grid, text_mask=mask)
        if logits.requires_grad:
            binary_segmentation_loss(logits.float(), targets, text_mask=mask)
    return counted["sum"], counted["largest"]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_memory(model: ModelConfig, *, grid: tuple[int, int], classes: int, batch_size: int,
                    device_type: str = "cuda", bf16: bool | None = None) -> MemoryEstimate:
    """Peak device memory of training ``model`` at ``batch_size`` (see the module docstring for the count)."""
    if classes < 1 or batch_size < 1:
        raise ValueError(f"classes and batch_size must be >= 1, got {classes} and {batch_size}")
    bf16 = device_type == "cuda" if bf16 is None else bf16
    with torch.device("meta"):
        network = build_model(model)
    params = _trainable(network)
    size = model.decoder.out_size
    if params:
        activations, largest = saved_bytes(network, grid=grid, classes=classes, batch=batch_size, size=size)
    else:  # the parameter-free variant trains no step
        activations, largest = 0, 0
    tokens = grid[0] * grid[1]
    inputs = batch_size * (tokens * model.vision_dim * FP32 + classes * (model.text_dim * FP32 + 1)
                           + classes * size * size)
    parts = {"weights": FP32 * params, "gradients": FP32 * params, "optimizer": 2 * FP32 * params,
             "autocast": 2 * params if bf16 else 0, "activations": activations, "inputs": inputs,
             "transient": 2 * largest}
    context = CUDA_CONTEXT if device_type == "cuda" else 0
    total = context + int(MARGIN * sum(parts.values()))
    return MemoryEstimate(parameters=params, context=context, total=total, **parts)
