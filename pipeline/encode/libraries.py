"""Encoders named by their library: ``open_clip:ARCH[/TAG]``, ``timm:NAME[.TAG]``, ``hf:REPO``.

Each name is turned into the fields of a registry entry from the library's own configuration
(open_clip's model and pretrained configs, timm's pretrained config and the model it builds,
a transformers ``config.json``): patch size, grid, input size, widths, normalisation; the
activation of open_clip towers follows the tag as for the registry's CLIP entries. Nothing is
downloaded to work out an entry; only a Hugging Face repository's ``config.json`` must be in
the hub cache (or the name be a local folder).
"""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.encode.compat import ensure_torchvision
from pipeline.errors import UserError

PREFIXES = ("open_clip:", "timm:", "hf:")
FORMS = (
    ("open_clip:ARCH[/TAG]", "an open_clip model (`open_clip.list_models()`), its pretrained tag "
                             "(`open_clip.list_pretrained_tags_by_model(ARCH)`); vision + text",
     "open_clip:ViT-SO400M-14-SigLIP/webli"),
    ("timm:NAME[.TAG]", "a timm ViT (`timm.list_models()`), with its pretrained tag; vision",
     "timm:vit_large_patch14_dinov2.lvd142m"),
    ("hf:REPO", "a transformers text model (hub repository or local folder); mean-pooled token states; text",
     "hf:sentence-transformers/all-mpnet-base-v2"),
)


def is_library_name(name: str) -> bool:
    return name.startswith(PREFIXES)


@functools.lru_cache(maxsize=None)
def library_fields(name: str) -> dict:
    """The fields of an ``EncoderSpec`` for a library name (``UserError`` for an unknown one)."""
    library, _, rest = name.partition(":")
    if not rest:
        raise UserError(f"encoder '{name}': name the model after '{library}:' (e.g. {_example(library)})")
    ensure_torchvision()
    fields = {"open_clip": _open_clip_fields, "timm": _timm_fields, "hf": _hf_fields}[library](rest)
    return {"name": name, **fields}


def _example(library: str) -> str:
    return next(example for form, _, example in FORMS if form.startswith(library))


def _open_clip_fields(rest: str) -> dict:
    import open_clip

    arch, _, tag = rest.partition("/")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise UserError(f"open_clip has no model '{arch}' (see open_clip.list_models())")
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"open_clip has no pretrained tag '{tag}' for {arch} (its tags: {known})")
    vision = config["vision_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)):
        raise UserError(f"open_clip:{arch} is a ResNet; by name only ViT towers are supported (clip-rn101 is)")
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if vision.get("timm_model_name"):  # a timm trunk inside open_clip (SigLIP, EVA): its own patch and width
        patch, width = _timm_geometry(vision["timm_model_name"], size)
        vision_dim = width
    else:
        patch, vision_dim = vision["patch_size"], config["embed_dim"]
    pretrained = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    mean = pretrained.get("mean") or vision.get("image_mean")
    std = pretrained.get("std") or vision.get("image_std")
    return {
        "family": "open_clip", "arch": arch, "towers": ("vision", "text"),
        "weights_tag": tag or "local-file",
        "weights_hint": f"open_clip '{arch}'" + (f" / '{tag}' (hub)" if tag else "") + ", or --weights FILE",
        "input_size": int(size), "patch_size": int(patch), "vision_dim": int(vision_dim),
        "text_dim": int(config["embed_dim"]), **_stats(mean, std),
    }


def _timm_geometry(model_name: str, size: int) -> tuple[int, int]:
    """(patch size, width) of a timm ViT, read from the model built on the meta device (no memory, no weights)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=size)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"timm:{model_name} cannot be built as a ViT with patch tokens "
                        f"({str(err).splitlines()[0][:120]})") from None
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"timm:{model_name} has no patch tokens (by name only ViT-like towers are supported)")
    patch = embed.patch_size[0] if isinstance(embed.patch_size, (list, tuple)) else embed.patch_size
    return int(patch), int(model.num_features)


def _timm_fields(rest: str) -> dict:
    import timm

    arch, _, tag = rest.partition(".")
    if not timm.is_model(arch):
        raise UserError(f"timm has no model '{arch}' (see timm.list_models())")
    try:
        config = timm.get_pretrained_cfg(rest)
    except (RuntimeError, ValueError):
        config = None
    if config is None or (tag and getattr(config, "tag", tag) != tag):
        known = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")) or "none"
        raise UserError(f"timm has no pretrained tag '{tag}' for {arch} (its tags: {known})")
    size = int(config.input_size[-1])
    patch, width = _timm_geometry(arch, size)
    hub = bool(config.hf_hub_id or config.url)
    full = f"{arch}.{config.tag}" if getattr(config, "tag", None) else arch
    return {
        "family": "timm", "arch": arch, "towers": ("vision",), "hub_name": full,
        "weights_tag": config.tag if hub else "local-file",
        "weights_hint": f"timm '{full}'" + (" (hub)" if hub else "") + ", or --weights FILE",
        "input_size": size, "patch_size": patch, "vision_dim": width, **_stats(config.mean, config.std),
    }


def _hf_fields(repo: str) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo)
    except (OSError, ValueError) as err:
        raise UserError(f"hf:{repo}: no config.json in the hub cache or at that path ({str(err).splitlines()[0][:100]}); "
                        f"fill the cache once on a machine with a network (HF_HOME), then set HF_HUB_OFFLINE=1") from None
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not width:
        raise UserError(f"hf:{repo} is a '{config.model_type}' without a hidden size; by name only text "
                        f"encoders with token states are supported")
    return {
        "family": "hf_text", "arch": repo, "towers": ("text",), "weights_tag": repo,
        "weights_hint": f"Hugging Face '{repo}'" + (" (this folder)" if Path(repo).is_dir() else " (hub)")
                        + ", or --weights DIR",
        "text_dim": int(width), "text_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "text_heads": int(getattr(config, "num_attention_heads", 0) or 0),
    }


def _stats(mean, std) -> dict:
    """Normalisation fields, only where the library names them (the entry's defaults otherwise)."""
    if not mean or not std:
        return {}
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
