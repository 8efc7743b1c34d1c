"""Issue 10: the encoders match the weights the paper loads (QuickGELU) and the ResNet-101 entry."""

from __future__ import annotations

import pytest
import torch

from pipeline.encode.families import create_encoder
from pipeline.encode.registry import activation, get_spec
from memory import release_memory


pytestmark = pytest.mark.fullsize  # pins the real architectures: full-size towers


def _built(name: str, size: int):
    """A fresh full-size tower pair: no test here reuses another's, so none is kept (one clip-l is 1.7 GB)."""
    return create_encoder(name, random_init=True, input_size=size)


@pytest.fixture(autouse=True)
def _trim_after_each_test():
    """What a test's towers leave behind goes back before the next one builds."""
    yield
    release_memory()


def _mlp_activations(module: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


@pytest.mark.parametrize("name,size", [("clip-b", 32), ("clip-l", 28)])
def test_openai_clip_towers_are_built_with_quick_gelu(name, size):
    """OpenAI's CLIP weights were trained with QuickGELU; plain open_clip ViT-L-14 builds nn.GELU."""
    assert activation(get_spec(name)) == "quick_gelu"
    encoders = _built(name, size)
    assert _mlp_activations(encoders.vision.tower) == {"QuickGELU"}


def test_activation_follows_open_clips_pairing_for_other_tags():
    from dataclasses import replace

    laion = replace(get_spec("clip-l"), weights_tag="laion2b_s32b_b82k")
    assert activation(laion) == "gelu"
    assert activation(get_spec("dino-b")) is None


def test_rn101_dense_features_come_through_the_attention_pools_value_and_output_projections():
    encoders = _built("clip-rn101", 64)
    spec = get_spec("clip-rn101")
    assert spec.decoder_blocks == 5 and spec.vision_dim == spec.text_dim == 512
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    tokens = encoders.vision.encode(images)
    assert tokens.shape == (2, 4, 512)  # stride 32: a 2 x 2 grid in the joint (text) space
    pool = encoders.vision.tower.attnpool
    saved = pool.c_proj.weight.detach().clone(), pool.c_proj.bias.detach().clone()
    with torch.no_grad():
        pool.c_proj.weight.zero_()
        pool.c_proj.bias.fill_(1.0)
    try:
        assert torch.allclose(encoders.vision.encode(images), torch.ones(2, 4, 512))
    finally:
        with torch.no_grad():
            pool.c_proj.weight.copy_(saved[0])
            pool.c_proj.bias.copy_(saved[1])
