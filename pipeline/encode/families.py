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
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from pipeline.encode.compat import ensure_torchvision
from pipeline.encode.registry import EncoderSpec, activation, check_input_size, get_spec
from pipeline.encode.towers import (
    Encoders,
    TextEncoder,
    VisionEncoder,
    WeightsInfo,
    frozen,
)
from pipeline.encode.hftext import build_hf_text
from pipeline.encode.weightfiles import HUB_FILES, check_fit, read_checkpoint, seed_for, tensors_of, weights_missing
from pipeline.errors import UserError
from pipeline.runtime import refuse_code_in_weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_weights(spec: EncoderSpec, weights: str | Path | None, random_init: bool) -> WeightsInfo:
    if spec.test_only and not random_init:
        raise UserError(f"{spec.name} is a test-only encoder without weights: pass `random_init`")
    if random_init:
        if weights is not None:
            raise UserError("`weights` and `random_init` exclude each other")
        return WeightsInfo(pretrained=False, source="random-init")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise UserError(f"{spec.name}: weights file not found: {path}")
        held = [path] if path.is_file() else [path / n for n in HUB_FILES if (path / n).is_file()][:1]
        digest = _sha256(held[0]) if held else None  # a hub folder: its weight file's hash
        return WeightsInfo(pretrained=True, source=str(path), sha256=digest)
    if spec.packaged:
        return WeightsInfo(pretrained=True, source=spec.weights_tag)
    if spec.family == "hf_text" and Path(spec.weights_tag).is_dir():  # hf:FOLDER, a saved model
        return _resolve_weights(spec, spec.weights_tag, False)
    if spec.weights_tag == "local-file":
        raise UserError(f"{spec.name}: no hub weights exist; pass `weights` PATH ({spec.weights_hint}) "
                        f"or `random_init`")
    if not _hub_reachable():
        host, port = hub_probe_target()
        raise weights_missing(spec, f"the model hub ({host}:{port}) is not reachable; with a filled hub cache "
                                     f"(HF_HOME) set HF_HUB_OFFLINE=1")
    return WeightsInfo(pretrained=True, source=f"hub:{spec.weights_tag}")


def hub_probe_target(env: dict | None = None) -> tuple[str, int]:
    """(host, port) to try before a hub download: the HTTPS proxy when one is set (a direct
    connection fails behind it), else the hub endpoint (``HF_ENDPOINT``, a mirror, or huggingface.co)."""
    from urllib.parse import urlsplit

    env = os.environ if env is None else env
    proxy = env.get("HTTPS_PROXY") or env.get("https_proxy")
    endpoint = env.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(proxy if proxy else endpoint)
    if not url.hostname:  # a proxy written without a scheme: host:port
        url = urlsplit(f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers; skipped (True) when the user works from a hub cache offline.

    Without this check an offline download attempt retries for about a minute
    before failing. A mirror (``HF_ENDPOINT``) and an HTTPS proxy are respected.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    import socket

    try:
        with socket.create_connection(hub_probe_target(), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #


def _build_open_clip(spec, info, input_size, want_vision, want_text, device):
    ensure_torchvision()
    import open_clip

    from_hub = info.pretrained and info.source.startswith("hub:")
    pretrained = spec.weights_tag if from_hub else None
    kwargs = {"force_image_size": input_size} if input_size != spec.input_size else {}
    # Build the activation the weights were trained with (OpenAI tags: QuickGELU), whatever the file.
    kwargs["force_quick_gelu"] = activation(spec) == "quick_gelu"
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logger("root"):
            torch.manual_seed(seed_for(spec.name))
            model = (_open_clip_from_cfg(spec, input_size, quick_gelu=kwargs["force_quick_gelu"]) if spec.model_cfg
                     else open_clip.create_model(spec.arch, pretrained=pretrained, device="cpu", **kwargs))
    except (RuntimeError, OSError, ValueError) as err:
        if not from_hub:
            raise
        raise weights_missing(spec, str(err).splitlines()[0][:160]) from err
    if info.pretrained and not from_hub:
        _load_open_clip_file(model, Path(info.source), spec)
    vision = text = None
    if want_vision:
        visual = model.visual
        if spec.dense == "attnpool-vc":
            tokens = _dense_resnet_tokens(visual)
        else:
            tokens = _trunk_tokens(visual) if hasattr(visual, "trunk") else _vit_tokens(visual)

        vision = VisionEncoder(spec=spec, tower=visual, forward_tokens=tokens, input_size=input_size,
                               weights=info, device=device)
    if want_text:
        tokenizer = open_clip.get_tokenizer("" if spec.model_cfg else spec.arch)
        model.visual = nn.Identity() if not want_vision else model.visual
        frozen(model).to(device)

        def sentences(batch: list[str]) -> torch.Tensor:
            return _clip_text_forward(model, tokenizer(batch).to(device))

        text = TextEncoder(spec=spec, encode_sentences=sentences, weights=info, device=device,
                           dim=spec.text_dim)
    return vision, text


def _load_open_clip_file(model: nn.Module, path: Path, spec: EncoderSpec) -> None:
    """A local CLIP file into the built model: OpenAI's TorchScript archive or state dict, an open_clip
    checkpoint or hub folder, massaged as open_clip's own loader does (positional embeddings resized
    to the input size, scalar logit scales reshaped)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = tensors_of(read_checkpoint(path, owner=spec.name), keys=("state_dict",), owner=spec.name, path=path)
    if next(iter(state)).startswith("module."):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(model, key, None) is not None:
            state[key] = state[key].reshape(getattr(model, key).shape)
    for resize in (resize_pos_embed, resize_text_pos_embed):
        with contextlib.suppress(KeyError, AttributeError, AssertionError, RuntimeError):
            resize(state, model)  # a file of another size or family: check_fit names it below
    check_fit(model=model, state=state, owner=spec.name, path=path)
    model.load_state_dict(state, strict=True)


def _open_clip_from_cfg(spec: EncoderSpec, input_size: int, *, quick_gelu: bool) -> nn.Module:
    """An open_clip CLIP built from the entry's own model config (open_clip's JSON form)."""
    import open_clip

    cfg = {key: dict(value) if isinstance(value, Mapping) else value for key, value in spec.model_cfg.items()}
    cfg["vision_cfg"]["image_size"] = input_size
    return open_clip.CLIP(**cfg, quick_gelu=quick_gelu)


def _vit_tokens(visual: nn.Module):
    visual.output_tokens = True

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        _, toks = visual(pixels)  # [B, h*w, width] after ln_post
        return toks @ visual.proj  # [B, h*w, D]

    return tokens


def _trunk_tokens(visual: nn.Module):
    """A timm trunk inside open_clip (SigLIP, EVA-CLIP): its patch tokens after its final norm, before
    the pooling head (the trunk's width; the fusion module learns its own projection)."""
    trunk = visual.trunk
    prefix = getattr(trunk, "num_prefix_tokens", 0)

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        return trunk.forward_features(pixels)[:, prefix:]  # [B, h*w, width]

    return tokens


def _dense_resnet_tokens(visual: nn.Module):
    """CLIP ResNet patch features in the joint space, MaskCLIP style.

    The attention pool mixes all positions into one vector; applying only its
    value and output projections at each position of the last stage keeps the
    7x7 (at 224 px) grid and lands every position in the space the text
    embeddings live in. Query, key and the positional embedding are unused, so
    any input size that is a multiple of 32 works.
    """
    pool = visual.attnpool

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        x = visual.stem(pixels.to(pool.v_proj.weight.dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # [B, 2048, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, 2048]
        return pool.c_proj(pool.v_proj(x))  # [B, h*w, D]

    return tokens


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
    """A DINO / MoCo v3 / timm checkpoint into the built ViT; the positional embedding is resampled
    to the model's grid by timm's own checkpoint filter, as the hub path does."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = tensors_of(read_checkpoint(path, owner=spec.name), keys=("state_dict", "model", "teacher"),
                       owner=spec.name, path=path)
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "base_encoder.", "backbone."):  # DDP, MoCo v3, DINO, in this nesting
            key = key.removeprefix(prefix)
        if key.startswith("head"):
            continue
        cleaned[key] = value
    if "pos_embed" in cleaned and "patch_embed.proj.weight" in cleaned:
        cleaned = checkpoint_filter_fn(cleaned, model)
    check_fit(model=model, state=cleaned, owner=spec.name, path=path, ignore_unexpected=True)
    model.load_state_dict(cleaned, strict=False)


def _build_timm(spec, info, input_size, want_vision, want_text, device):
    ensure_torchvision()
    import timm

    from_hub = info.pretrained and info.source.startswith("hub:")
    name = (spec.hub_name or spec.arch) if from_hub else spec.arch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(spec.name))
            model = timm.create_model(name, pretrained=from_hub, num_classes=0, img_size=input_size)
    except (RuntimeError, OSError, ValueError) as err:
        if not from_hub:
            raise
        raise weights_missing(spec, str(err).splitlines()[0][:160]) from err
    if info.pretrained and not from_hub:
        _load_timm_checkpoint(model, Path(info.source), spec)
    prefix = getattr(model, "num_prefix_tokens", 1)

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_features(pixels)[:, prefix:]  # [B, h*w, D], after the final norm

    vision = VisionEncoder(spec=spec, tower=model, forward_tokens=tokens, input_size=input_size,
                           weights=info, device=device)
    return vision, None


_FAMILIES = {"open_clip": _build_open_clip, "timm": _build_timm, "hf_text": build_hf_text}


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
    check_input_size(name=name, size=size)
    info = _resolve_weights(spec, weights, random_init)
    if weights is not None:
        refuse_code_in_weights(Path(weights).expanduser(), what=f"{name} weights")
    dev = torch.device(device)
    vis, txt = _FAMILIES[spec.family](spec, info, size, want_vision, want_text, dev)
    return Encoders(spec=spec, vision=vis, text=txt)
