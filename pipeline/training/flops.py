"""Training FLOPs per sample of the model a config builds: a closed form, checked against flop_counter.

Counted as ``torch.utils.flop_counter`` counts them (2 per multiply-add of every matmul and
convolution; norms, activations, interpolation and the loss are not counted, attention in its
math form), for one sample's forward and backward. Every trainable matmul or convolution costs
its forward three times (forward, gradient of the input, gradient of the weight): its input
always needs a gradient, even the first projection's, whose LayerNorm carries weights. The
parameter-free variant (``fusion.mode frozen``, no decoder) only runs forward. The optimiser
step (a few FLOPs per parameter) is left out. ``tests/training/test_flops.py`` holds the form
to flop_counter on real forward + backward passes of several configs.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import ModelConfig, decoder_channels


def count_step_flops(model: torch.nn.Module, *, grid: tuple[int, int], classes: int, batch: int = 1) -> int:
    """flop_counter's count of one forward + backward of ``model`` on ``batch`` random samples."""
    config: ModelConfig = model.config
    device = model.anchor.device
    visual = torch.randn(batch, grid[0] * grid[1], config.vision_dim, device=device)
    text = torch.randn(batch, classes, config.text_dim, device=device)
    # One attention form whatever the device (fused kernels are counted by other formulas): the math one.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(visual, text, grid=grid)
        if logits.requires_grad:  # the parameter-free variant trains nothing
            logits.float().sum().backward()
    return int(counter.get_total_flops())


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _fusion_forward(config: ModelConfig, *, tokens: int, classes: int) -> int:
    fusion, width = config.fusion, config.fusion.width
    hidden = int(round(width * fusion.mlp_ratio))
    flops = _linear(tokens, config.vision_dim, width) + _linear(classes, config.text_dim, width)  # unify widths
    if fusion.mode == "early":
        length = tokens + classes
        block = (_linear(length, width, 3 * width) + 2 * 2 * length * length * width  # qkv; q.k and attn.v
                 + _linear(length, width, width) + 2 * _linear(length, width, hidden))  # proj; MLP
        flops += fusion.layers * block
    elif fusion.mode == "late":
        flops += fusion.late_mlp_layers * 2 * (_linear(tokens, width, hidden) + _linear(classes, width, hidden))
    return flops + _linear(tokens, width, width) + _linear(classes, width, width)  # output projections


def _decoder_forward(config: ModelConfig, *, grid: tuple[int, int], width: int) -> tuple[int, int]:
    """Decoder FLOPs and the number of pixels it outputs."""
    flops, pixels, channels = 0, grid[0] * grid[1], width
    for index, out_channels in enumerate(decoder_channels(config)):
        pixels *= 4 if index else 1  # 2x bilinear upsampling between blocks
        flops += 2 * 9 * channels * out_channels * pixels  # 3x3 conv, no bias
        channels = out_channels
    return flops + 2 * channels * width * pixels, pixels  # 1x1 head back to the fusion width


def training_flops_per_sample(model: ModelConfig, *, grid: tuple[int, int], classes: int = 1) -> int:
    """Forward + backward FLOPs of one training sample: ``grid`` patch tokens, ``classes`` names in W."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    tokens = grid[0] * grid[1]
    frozen = model.fusion.mode == "frozen"
    width = model.vision_dim if frozen else model.fusion.width
    forward = 0 if frozen else _fusion_forward(model, tokens=tokens, classes=classes)
    pixels = model.decoder.out_size ** 2  # the released order: features resized, cosine at the output size
    if model.decoder.enabled:
        decoder, decoded = _decoder_forward(model, grid=grid, width=width)
        forward += decoder
        if model.decoder.upsample == "logits":
            pixels = decoded  # the cosine at the decoder's size, the logits resized after it
    forward += 2 * width * classes * pixels  # cosine: pixels x classes dot products
    return forward if frozen else 3 * forward
