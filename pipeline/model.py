"""The Fusioner model: fuse frozen visual and text tokens, decode, score by cosine.

Y = DEC(FUSE(F_V, F_W)). The frozen encoders run once, at extraction time; this
module sees only their cached tokens, so everything here is trainable. Fusion
modes cover the paper's comparisons: ``early`` (the cross-modal transformer of
section 3), ``late`` (LSeg-style: one MLP stack per modality, fused only at the
similarity), ``none`` (Table 4 "without fusion": the width-unifying projections
only, no mixer) and ``frozen`` (Table 4 "neither", with the decoder off: no
parameter at all, the cosine of the frozen upsampled patch features against the
frozen text embeddings, which needs equal widths). The decoder can be switched
off (Table 4 "without decoder").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import deep_merge, from_dict, to_dict
from pipeline.errors import require

# Logit given to padded classes: sigmoid() of it is exactly 0, and it stays
# finite in fp16/bf16 so nothing downstream turns into inf or NaN.
PADDED_LOGIT = -1.0e4


@dataclass
class FusionConfig:
    """Width, depth and kind of the fusion module (paper: 12 layers, 8 heads, 512)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mode: Literal["early", "late", "none", "frozen"] = "early"
    late_mlp_layers: int = 6
    # "product": class-type embedding N(0, 0.02^2) without weight decay, output projections with torch's default
    # Linear init; "released": the embedding N(0, 1) and weight-decayed, the projections N(0, 1/width).
    init: Literal["product", "released"] = "product"


@dataclass
class DecoderConfig:
    """Conv decoder: one block per entry of ``channels``, 2x upsampling between blocks.

    ``channels`` empty (the default) is the released ``Decoder(transformer_width)``:
    ``blocks`` blocks as wide as the fusion module, ``blocks`` 0 meaning the vision
    encoder's registry entry (4 for ViTs, 5 for ResNets; 4 when no encoder is known).
    ``upsample`` says what is resized to ``out_size``: the decoded features before the
    cosine (``features``, released) or the logits after it (``logits``, cheaper).
    """

    enabled: bool = True
    channels: tuple[int, ...] = ()
    blocks: int = 0
    out_size: int = 224
    upsample: Literal["features", "logits"] = "features"


@dataclass
class ModelConfig:
    """Everything needed to rebuild a Fusioner; saved whole into each checkpoint."""

    vision_dim: int
    text_dim: int
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    temperature: float = 0.07
    threshold: float = 0.5
    normalize_inputs: bool = True


# Presets are override dicts on top of ModelConfig's defaults, so they stay data.
PRESETS: dict[str, dict] = {
    "paper": {},
    "small": {
        "fusion": {"width": 64, "layers": 2, "heads": 2},
        "decoder": {"channels": [64, 32, 32, 32]},
    },
    "tiny": {
        "fusion": {"width": 32, "layers": 1, "heads": 2},
        "decoder": {"channels": [16, 16, 16, 16]},
    },
}


def preset_settings(name: str) -> dict:
    """The model settings of preset ``name`` (nested, as in a config file), refusing an unknown name."""
    require(name in PRESETS, f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def make_model_config(
    *, vision_dim: int, text_dim: int, preset: str = "paper", overrides: dict | None = None
) -> ModelConfig:
    """A checked ModelConfig from a preset name plus nested overrides (dims come from the stores)."""
    data = to_dict(ModelConfig(vision_dim=vision_dim, text_dim=text_dim))
    data = deep_merge(deep_merge(data, preset_settings(preset)), overrides or {})
    config = from_dict(ModelConfig, data)
    check_config(config)
    return config


def check_config(config: ModelConfig) -> None:
    """Reject settings that would only fail deep inside a forward pass."""
    fusion, decoder = config.fusion, config.decoder
    require(config.vision_dim > 0 and config.text_dim > 0, "vision_dim and text_dim must be positive")
    require(fusion.width > 0 and fusion.heads > 0, "fusion.width and fusion.heads must be positive")
    require(fusion.width % fusion.heads == 0,
            f"fusion.width {fusion.width} is not divisible by fusion.heads {fusion.heads}")
    require(fusion.layers >= 0 and fusion.late_mlp_layers >= 0, "fusion layer counts must be >= 0")
    require(fusion.mlp_ratio > 0, "fusion.mlp_ratio must be positive")
    require(0.0 <= fusion.dropout < 1.0, "fusion.dropout must be in [0, 1)")
    require(fusion.init in ("product", "released"), "fusion.init must be 'product' or 'released'")
    require(all(c > 0 for c in decoder.channels), "decoder.channels must be a list of positive integers")
    require(decoder.blocks >= 0, "decoder.blocks must be >= 0 (0: the vision encoder's registry entry)")
    require(decoder.upsample in ("features", "logits"), "decoder.upsample must be 'features' or 'logits'")
    require(decoder.out_size > 0, "decoder.out_size must be positive")
    require(config.temperature > 0, "temperature must be positive")
    if fusion.mode == "frozen":
        require(not decoder.enabled, "fusion.mode 'frozen' has no parameters: set decoder.enabled false too")
        require(config.vision_dim == config.text_dim,
                f"fusion.mode 'frozen' compares frozen features directly, so vision_dim ({config.vision_dim}) "
                f"must equal text_dim ({config.text_dim}); pair encoders of one joint space (e.g. CLIP + CLIP)")
    require(0.0 < config.threshold < 1.0, "threshold must be in (0, 1)")


DEFAULT_DECODER_BLOCKS = 4  # the paper's k for ViTs, used when no encoder entry is known


def decoder_channels(config: ModelConfig, *, encoder_blocks: int | None = None) -> tuple[int, ...]:
    """The decoder's block widths: ``channels`` when given, else ``blocks`` x the fusion width.

    ``blocks`` 0 takes ``encoder_blocks`` (the vision encoder's registry ``decoder_blocks``),
    else :data:`DEFAULT_DECODER_BLOCKS`.
    """
    decoder = config.decoder
    if decoder.channels:
        return tuple(int(c) for c in decoder.channels)
    blocks = decoder.blocks or encoder_blocks or DEFAULT_DECODER_BLOCKS
    return (config.fusion.width,) * blocks


def _mlp(*, width: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(round(width * mlp_ratio))
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class Block(nn.Module):
    """Pre-norm transformer block on torch's fused scaled_dot_product_attention."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _mlp(width=width, mlp_ratio=mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None) -> Tensor:
        """``attn_mask`` [B, 1, 1, L] bool, True = key may be attended to."""
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, heads, L, d / heads]
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, heads, L, d / heads]
        attended = attended.transpose(1, 2).reshape(batch, length, width)  # [B, L, d]
        x = x + self.drop(self.proj(attended))
        return x + self.drop(self.mlp(self.norm2(x)))


class CrossModalEncoder(nn.Module):
    """Early fusion: patches and classes attend to each other in one sequence."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width=config.width, heads=config.heads, mlp_ratio=config.mlp_ratio,
                  dropout=config.dropout)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width)

    def forward(self, visual: Tensor, text: Tensor, *, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        num_patches = visual.shape[1]
        tokens = torch.cat([visual, text], dim=1)  # [B, HW + C, d]
        attn_mask = None
        if text_mask is not None and text_mask.shape[1] > 1:
            # Padded classes must never be attended to, so a sample's real
            # logits do not depend on how many padded slots its batch has. Decided by the
            # shape (one class per sample has no padding), never by the values: reading
            # them would make the host wait for the device.
            keys = torch.cat([text_mask.new_ones(visual.shape[:2]), text_mask], dim=1)  # [B, HW + C]
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, HW + C]
        for block in self.blocks:
            tokens = block(tokens, attn_mask=attn_mask)
        tokens = self.norm(tokens)
        return tokens[:, :num_patches], tokens[:, num_patches:]  # [B, HW, d], [B, C, d]


class ResidualMLP(nn.Module):
    """A stack of pre-norm residual MLP blocks: per-token mixing, no attention."""

    def __init__(self, *, width: int, layers: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), _mlp(width=width, mlp_ratio=mlp_ratio), nn.Dropout(dropout))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


class LateFusion(nn.Module):
    """LSeg-style: each modality through its own MLP stack; they meet only at the cosine."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        kwargs = dict(width=config.width, layers=config.late_mlp_layers,
                      mlp_ratio=config.mlp_ratio, dropout=config.dropout)
        self.visual = ResidualMLP(**kwargs)
        self.text = ResidualMLP(**kwargs)

    def forward(self, visual: Tensor, text: Tensor, *, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.visual(visual), self.text(text)


class Fusion(nn.Module):
    """FUSE: unify widths, mix (early / late / none), project patches and classes apart."""

    def __init__(self, config: FusionConfig, *, vision_dim: int, text_dim: int):
        super().__init__()
        width = config.width
        self.visual_in = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, width),
                                       nn.LayerNorm(width))
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        # Tells class tokens from patch tokens inside the shared sequence.
        self.class_type = nn.Parameter(torch.randn(width) * 0.02)
        mixers = {"early": CrossModalEncoder, "late": LateFusion}
        self.mixer = mixers[config.mode](config) if config.mode in mixers else None
        self.visual_out = nn.Linear(width, width)
        self.text_out = nn.Linear(width, width)
        if config.init == "released":
            nn.init.normal_(self.class_type, std=1.0)
            for projection in (self.visual_out, self.text_out):
                nn.init.normal_(projection.weight, std=width ** -0.5)
                nn.init.zeros_(projection.bias)

    def forward(self, visual: Tensor, text: Tensor, *, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        visual = self.visual_in(visual)  # [B, HW, d]
        text = self.text_in(text) + self.class_type  # [B, C, d]
        if self.mixer is not None:
            visual, text = self.mixer(visual, text, text_mask=text_mask)
        return self.visual_out(visual), self.text_out(text)


class ConvDecoder(nn.Module):
    """DEC: 3x3 conv + InstanceNorm + ReLU blocks with 2x bilinear upsampling between them.

    The convs carry no bias: InstanceNorm (without affine) subtracts the
    per-channel mean right after, which would cancel it exactly.
    """

    def __init__(self, *, width: int, channels: tuple[int, ...]):
        super().__init__()
        blocks, in_channels = [], width
        for out_channels in channels:
            blocks.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.InstanceNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_channels, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, d, h, w] -> [B, d, h * 2**(k-1), w * 2**(k-1)] for k blocks."""
        for index, block in enumerate(self.blocks):
            if index:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(x)
        return self.head(x)


def cosine_logits(pixels: Tensor, classes: Tensor, *, temperature: float) -> Tensor:
    """Per-pixel cosine similarity to every class, sharpened by the temperature.

    pixels [B, d, H, W], classes [B, C, d] -> [B, C, H, W].

    The same value as ``einsum(normalize(pixels, dim=1), normalize(classes, dim=-1)) / temperature``
    in fewer passes over the largest tensors: one batched matmul over the pixels as they lie
    (no permuted copy), and the pixels' norms applied to whichever of the d-channel features or
    the C-channel scores is smaller. The step is memory-bound at these shapes, on a GPU too.
    """
    batch, dim, height, width = pixels.shape
    flat = pixels.reshape(batch, dim, height * width)  # [B, d, HW], a view
    # max(|x|, 1e-12) as F.normalize, clamped before the root so a zero feature gets a zero gradient, not NaN;
    # a sum over the channels is 3x faster than vector_norm's strided reduction on a CPU
    norms = flat.square().sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()  # [B, 1, HW]
    classes = F.normalize(classes, dim=-1) / temperature  # [B, C, d]
    if classes.shape[1] < dim:
        scores = torch.bmm(classes, flat) / norms  # [B, C, HW]
    else:
        scores = torch.bmm(classes, flat / norms)
    return scores.view(batch, -1, height, width)


def predict_masks(logits: Tensor, *, threshold: float, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The released mask rule: a constant ``threshold`` background channel vs sigmoid probabilities.

    logits [B, C, H, W] -> labels [B, H, W] (0 = background, c + 1 = class c)
    and probs [B, C, H, W]. With one class this is ``sigmoid > threshold``;
    ties go to background because argmax returns the first maximum.
    """
    probs = logits.sigmoid()  # [B, C, H, W]
    if text_mask is not None:
        probs = probs.masked_fill(~text_mask[:, :, None, None], 0.0)
    background = probs.new_full((probs.shape[0], 1, *probs.shape[2:]), threshold)  # [B, 1, H, W]
    labels = torch.cat([background, probs], dim=1).argmax(dim=1)  # [B, H, W]
    return labels, probs


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Fusioner(nn.Module):
    """Fusion transformer + visual decoder over cached frozen tokens; emits per-class logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        # Device and dtype of the model, also for the parameter-free variant (not saved).
        self.register_buffer("anchor", torch.zeros(()), persistent=False)
        self.fusion = None if config.fusion.mode == "frozen" else Fusion(
            config.fusion, vision_dim=config.vision_dim, text_dim=config.text_dim)
        self.decoder = (
            ConvDecoder(width=config.fusion.width, channels=decoder_channels(config))
            if config.decoder.enabled else None
        )

    def _batched_text(self, text: Tensor, text_mask: Tensor | None, *, batch: int) -> tuple[Tensor, Tensor | None]:
        """Broadcast shared class embeddings [C, Dt] (and a [C] mask) to the batch."""
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(batch, -1, -1)  # [B, C, Dt]
        if text_mask is not None and text_mask.dim() == 1:
            text_mask = text_mask.unsqueeze(0).expand(batch, -1)  # [B, C]
        if text.dim() != 3 or text.shape[0] != batch:
            raise ValueError(f"text must be [C, Dt] or [{batch}, C, Dt], got {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask {tuple(text_mask.shape)} does not match text {tuple(text.shape[:2])}")
        return text, text_mask

    def forward(
        self,
        visual: Tensor,
        text: Tensor,
        *,
        grid: tuple[int, int],
        text_mask: Tensor | None = None,
        out_size: int | tuple[int, int] | None = None,
    ) -> Tensor:
        """visual [B, HW, Dv], text [B, C, Dt] or [C, Dt] -> logits [B, C, H', W'].

        Padded classes (``text_mask`` False) get :data:`PADDED_LOGIT`, and
        cannot influence the real classes' logits.
        """
        reference = self.anchor
        visual = visual.to(device=reference.device, dtype=reference.dtype)
        text = text.to(device=reference.device, dtype=reference.dtype)
        if text_mask is not None:
            text_mask = text_mask.to(device=reference.device, dtype=torch.bool)
        height, width = grid
        batch, num_patches, _ = visual.shape
        if height * width != num_patches:
            raise ValueError(f"grid {height}x{width} does not match {num_patches} patch tokens")
        text, text_mask = self._batched_text(text, text_mask, batch=batch)
        if self.config.normalize_inputs:
            # The paper's features are unit vectors; the cache keeps them raw.
            visual, text = F.normalize(visual, dim=-1), F.normalize(text, dim=-1)

        patches, classes = (visual, text) if self.fusion is None else self.fusion(
            visual, text, text_mask=text_mask)  # [B, HW, d], [B, C, d]
        pixels = patches.transpose(1, 2).reshape(batch, -1, height, width)  # [B, d, h, w]
        size = _size_pair(out_size if out_size is not None else self.config.decoder.out_size)
        temperature = self.config.temperature
        if self.decoder is not None and self.config.decoder.upsample == "logits":
            pixels = self.decoder(pixels)  # [B, d, 8h, 8w] for k = 4
            logits = cosine_logits(pixels, classes, temperature=temperature)  # [B, C, 8h, 8w]
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # [B, C, H', W']
        else:  # released order: resize the d-channel features, then normalise and take the cosine
            if self.decoder is not None:
                pixels = self.decoder(pixels)  # [B, d, 8h, 8w] for k = 4
            if tuple(pixels.shape[-2:]) != size:  # at its own size the resize is the identity: skip the pass
                pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)  # [B, d, H', W']
            logits = cosine_logits(pixels, classes, temperature=temperature)  # [B, C, H', W']
        if text_mask is not None:
            logits = logits.masked_fill(~text_mask[:, :, None, None], PADDED_LOGIT)
        return logits

    def predict_masks(self, logits: Tensor, *, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Label map and probabilities under this model's threshold (see :func:`predict_masks`)."""
        return predict_masks(logits, threshold=self.config.threshold, text_mask=text_mask)


def build_model(config: ModelConfig) -> Fusioner:
    """The model for ``config`` (checked first, so bad settings fail in one line)."""
    return Fusioner(config)


def count_parameters(model: Fusioner) -> dict[str, int]:
    """Parameter counts of the fusion module (projections included), the decoder and the whole."""
    fusion = sum(p.numel() for p in model.fusion.parameters()) if model.fusion is not None else 0
    decoder = sum(p.numel() for p in model.decoder.parameters()) if model.decoder is not None else 0
    total = sum(p.numel() for p in model.parameters())
    return {"fusion": fusion, "decoder": decoder, "total": total}
