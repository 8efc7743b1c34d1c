"""The peak-memory count a packed sweep reserves: its activations hold the bytes a real forward saves."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.model import build_model, make_model_config
from pipeline.training.losses import binary_segmentation_loss
from pipeline.training.memory import CUDA_CONTEXT, MARGIN, saved_bytes, training_memory

GRID, CLASSES, BATCH, SIZE = (4, 4), 3, 2, 64
CONFIGS = [("tiny", {}), ("small", {}), ("tiny", {"fusion": {"mode": "late"}}),
           ("tiny", {"decoder": {"enabled": False}}), ("tiny", {"decoder": {"upsample": "logits"}}),
           ("small", {"fusion": {"mode": "none"}})]


def _config(preset: str, overrides: dict):
    config = make_model_config(vision_dim=48, text_dim=40, preset=preset, overrides=overrides)
    config.decoder.out_size = SIZE
    return config


def real_saved_bytes(model) -> int:
    """Bytes of the distinct storages a real CPU forward + loss keeps for backward."""
    config = model.config
    visual = torch.randn(BATCH, GRID[0] * GRID[1], config.vision_dim)
    text = torch.randn(BATCH, CLASSES, config.text_dim)
    mask = torch.ones(BATCH, CLASSES, dtype=torch.bool)
    targets = torch.zeros(BATCH, CLASSES, SIZE, SIZE, dtype=torch.uint8)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(visual, text, grid=GRID, text_mask=mask)
        binary_segmentation_loss(logits.float(), targets, text_mask=mask).backward()
    return sum(storages.values())


@pytest.mark.parametrize(("preset", "overrides"), CONFIGS)
def test_meta_count_of_saved_activations_covers_a_real_forward(preset, overrides):
    """Never below what a real forward saves (so a packed GPU is not overfilled), at most 2.5x above it."""
    config = _config(preset, overrides)
    torch.manual_seed(0)
    real = real_saved_bytes(build_model(config))
    with torch.device("meta"):
        counted, largest = saved_bytes(build_model(config), grid=GRID, classes=CLASSES, batch=BATCH, size=SIZE)
    assert real <= counted <= 2.5 * real
    assert 0 < largest < counted


def test_estimate_adds_state_activations_and_context():
    config = _config("small", {})
    params = sum(p.numel() for p in build_model(config).parameters())
    one = training_memory(config, grid=GRID, classes=CLASSES, batch_size=BATCH, device_type="cpu")
    assert one.parameters == params and one.context == 0 and one.autocast == 0
    assert (one.weights, one.gradients, one.optimizer) == (4 * params, 4 * params, 8 * params)
    parts = one.weights + one.gradients + one.optimizer + one.activations + one.inputs + one.transient
    assert one.total == int(MARGIN * parts)
    cuda = training_memory(config, grid=GRID, classes=CLASSES, batch_size=BATCH, device_type="cuda")
    assert cuda.context == CUDA_CONTEXT and cuda.autocast == 2 * params and cuda.total > one.total + CUDA_CONTEXT
    eight = training_memory(config, grid=GRID, classes=CLASSES, batch_size=4 * BATCH, device_type="cpu")
    assert 3.5 * one.activations < eight.activations <= 4 * one.activations and eight.weights == one.weights
    wider = training_memory(_config("small", {"fusion": {"width": 128}}), grid=GRID, classes=CLASSES,
                            batch_size=BATCH, device_type="cpu")
    assert wider.total > one.total and wider.activations > one.activations


def test_parameter_free_variant_holds_only_its_batch():
    config = make_model_config(vision_dim=40, text_dim=40, preset="tiny",
                               overrides={"fusion": {"mode": "frozen"}, "decoder": {"enabled": False}})
    estimate = training_memory(config, grid=GRID, classes=CLASSES, batch_size=BATCH, device_type="cpu")
    assert estimate.parameters == 0 and estimate.activations == 0 and estimate.total == int(MARGIN * estimate.inputs)
