"""DINO and MoCo v3 checkpoints as their training code saves them, at the checkpoint's and at another
input size (the positional embedding resampled as timm's hub path does), and wrong ones refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from released_layouts import dino_full_checkpoint, moco_checkpoint, timm_vit_state

from pipeline.encode.compat import ensure_torchvision
from pipeline.encode.families import create_encoder
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_tiny_patch16_224"
NAME = f"timm:{ARCH}"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return timm_vit_state(ARCH, seed=3)


def _timm_reference(state: dict, size: int, tmp: Path) -> torch.nn.Module:
    """timm's own loading of the plain weights, through its pretrained path (which resamples pos_embed)."""
    ensure_torchvision()
    import timm

    plain = tmp / "plain.pth"
    torch.save(state, plain)
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, img_size=size,
                              pretrained_cfg_overlay={"file": str(plain), "num_classes": 0})
    return model.eval()


def _compare(name: str, weights: Path, state: dict, size: int, tmp: Path) -> None:
    encoders = create_encoder(name, weights=weights, input_size=size)
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ours = encoders.vision.encode(images)
    with torch.no_grad():
        ref = _timm_reference(state, size, tmp).forward_features(encoders.vision.normalize(images))[:, 1:]
    assert ours.shape == (2, (size // 16) ** 2, 192)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [224, 48])
def test_dino_full_checkpoint_with_its_argparse_options_loads(state, tmp_path, size):
    path = dino_full_checkpoint(tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth", state)
    _compare(NAME, path, state, size, tmp_path)


def test_moco_checkpoint_loads_at_another_input_size(state, tmp_path):
    path = moco_checkpoint(tmp_path / "vit-b-300ep.pth.tar", state)
    _compare(NAME, path, state, 48, tmp_path)


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return timm_vit_state("vit_base_patch16_224", seed=4)


@pytest.mark.fullsize
def test_moco_at_another_input_size_through_the_registry_entry(base_state, tmp_path):
    """moco-b given its own layout at another input size: the grid follows the size."""
    path = moco_checkpoint(tmp_path / "vit-b-300ep.pth.tar", base_state)
    encoders = create_encoder("moco-b", weights=path, input_size=64)
    assert encoders.vision.encode(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 16, 768)


@pytest.mark.fullsize
def test_dinos_full_checkpoint_through_the_registry_entry(base_state, tmp_path):
    path = dino_full_checkpoint(tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth", base_state)
    tower = create_encoder("dino-b", weights=path, input_size=32).vision.tower
    assert torch.equal(tower.state_dict()["blocks.11.mlp.fc2.weight"], base_state["blocks.11.mlp.fc2.weight"])
    assert tower.state_dict()["pos_embed"].shape == (1, 5, 768)  # resampled from 197 positions to 2 x 2 + 1


@pytest.mark.fullsize
def test_a_vit_s_checkpoint_given_to_moco_b_is_one_line(tmp_path):
    path = moco_checkpoint(tmp_path / "vit-s-300ep.pth.tar", timm_vit_state("vit_small_patch16_224", seed=5))
    with pytest.raises(UserError) as info:
        create_encoder("moco-b", weights=path, input_size=32)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "is a ViT (width 384, 12 layers, patch 16), not a ViT (width 768, 12 layers, patch 16)" in message
    assert "of another shape (first: cls_token [1, 1, 384] where [1, 1, 768] is needed)" in message


class _Code:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_allowed_classes_do_not_open_the_door_to_code(state, tmp_path):
    bad = tmp_path / "dino_full.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()},
                "args": argparse.Namespace(arch="vit_small"), "hook": _Code()}, bad)
    # refused at the common gate of every weights path, before the checkpoint reader sees it
    with pytest.raises(UserError, match=r"refusing to load this timm:vit_tiny_patch16_224 (checkpoint|weights).*"
                                        r"\(it names [\w.]*eval\)"):
        create_encoder(NAME, weights=bad)


def test_a_checkpoint_without_weights_is_one_line(tmp_path):
    empty = tmp_path / "args.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(arch="vit_small")}, empty)
    with pytest.raises(UserError, match="holds no weights"):
        create_encoder(NAME, weights=empty)
