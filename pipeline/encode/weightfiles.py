"""Reading the weight files users hold, and saying in one line what a file is when it does not fit.

Forms read here: plain state dicts and training checkpoints saved by ``torch.save`` (loaded
``weights_only``; the few plain classes such checkpoints carry, such as ``argparse.Namespace``,
are allowed by name), safetensors files, hub folders (open_clip's and timm's single weight file),
and TorchScript archives (OpenAI's released CLIP files), read with ``torch.jit.load`` on the CPU
for their ``state_dict()`` only. A TorchScript archive whose code defines ``__setstate__`` (the
one hook that runs while an archive loads) is refused unread, and so is any pickle that needs a
class or function beyond torch's allow-list and the names below.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.runtime import load_torch_file

def seed_for(name: str) -> int:
    """Random-init weights are a function of the encoder name, in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def weights_missing(spec, detail: str) -> UserError:
    """The one line for weights that could not be had, naming where to get them."""
    return UserError(
        f"{spec.name}: pretrained weights could not be loaded ({detail}); "
        f"get them from {spec.weights_hint}, or pass --random-init for a pipeline check"
    )


# Entries of an OpenAI TorchScript CLIP's state_dict that are sizes, not weights.
OPENAI_JIT_SIZES = ("input_resolution", "context_length", "vocab_size")
# The weight file inside a hub folder, in the order the libraries look for them.
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def weight_file(path: Path, *, owner: str) -> Path:
    """The one file holding the weights: ``path`` itself, or the hub file inside a hub folder."""
    if not path.is_dir():
        return path
    for name in HUB_FILES:
        if (path / name).is_file():
            return path / name
    raise UserError(f"{owner}: folder {path} holds none of {', '.join(HUB_FILES)}; pass the weight file itself")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with ``constants.pkl`` and a ``code/`` folder (``torch.save`` zips have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torchscript_hooks(path: Path) -> list[str]:
    """Files of the archive's code that define a load-time hook (``__setstate__``)."""
    hooks = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in name and name.endswith(".py"):
                if re.search(rb"def\s+__setstate__\s*\(", archive.read(name)):
                    hooks.append(name)
    return hooks


def torchscript_state(path: Path, *, owner: str) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (``torch.jit.load`` on the CPU, then ``state_dict()``)."""
    hooks = _torchscript_hooks(path)
    if hooks:
        raise UserError(f"{owner}: refusing TorchScript archive {path}: its code runs on load "
                        f"(__setstate__ in {hooks[0].split('/code/', 1)[-1]}); pass a plain state dict")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{owner}: cannot read TorchScript archive {path}: {first}") from None
    return {k: v.detach() for k, v in module.state_dict().items()}


def read_checkpoint(path: Path, *, owner: str):
    """What a weight file holds (a dict, usually), read without running any of its code."""
    path = weight_file(path, owner=owner)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise UserError(f"{owner}: cannot read safetensors file {path}: {first}") from None
    if is_torchscript(path):
        return torchscript_state(path, owner=owner)
    return load_torch_file(path, what=f"{owner} checkpoint")  # plain classes (DINO's options) allowed there


def tensors_of(checkpoint, *, keys: tuple[str, ...], owner: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (under the first of ``keys`` present), float tensors as float32,
    the sizes a TorchScript CLIP's state_dict carries dropped."""
    state = checkpoint
    for key in keys:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{owner}: {path} holds no weights (a {type(state).__name__} "
                        f"without tensors at its top level or under {', '.join(keys)})")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()
            if isinstance(v, torch.Tensor) and k not in OPENAI_JIT_SIZES}


def describe_state(state: dict[str, torch.Tensor]) -> str:
    """What a state dict is, from its keys and shapes: the family, width, depth and patch size."""
    if "visual.conv1.weight" in state and "visual.transformer.resblocks.0.attn.in_proj_weight" in state:
        conv = state["visual.conv1.weight"]
        layers = sum(1 for k in state if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight"))
        return f"a CLIP ViT (width {conv.shape[0]}, {layers} layers, patch {conv.shape[-1]})"
    if "visual.layer1.0.conv1.weight" in state:
        blocks = [sum(1 for k in state if re.fullmatch(rf"visual\.layer{i}\.\d+\.conv1\.weight", k)) for i in range(1, 5)]
        return f"a CLIP ResNet ({'-'.join(map(str, blocks))} blocks, width {state['visual.conv1.weight'].shape[0]})"
    if "patch_embed.proj.weight" in state:
        conv = state["patch_embed.proj.weight"]
        layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"a ViT (width {conv.shape[0]}, {layers} layers, patch {conv.shape[-1]})"
    first = next(iter(state), "")
    return f"a state dict of {len(state)} tensors (first: {first})"


def check_fit(*, model: torch.nn.Module, state: dict[str, torch.Tensor], owner: str, path: Path,
              ignore_unexpected: bool = False) -> None:
    """One line when ``state`` does not fit ``model``: what the file is, what was expected, the first
    missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [] if ignore_unexpected else [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shaped):
        return
    parts = []
    if shaped:
        key = shaped[0]
        parts.append(f"{len(shaped)} of another shape (first: {key} {list(state[key].shape)} "
                     f"where {list(own[key].shape)} is needed)")
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    raise UserError(f"{owner}: {path} is {describe_state(state)}, not {describe_state(own)} as {owner} needs: "
                    f"{'; '.join(parts)}")
