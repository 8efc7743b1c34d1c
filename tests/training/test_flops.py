"""Training FLOPs per sample are counted from the model the config builds, on the meta device."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import build_model, make_model_config
from pipeline.training.flops import count_step_flops, training_flops_per_sample

SHAPES = dict(vision_dim=48, text_dim=48)  # equal: the frozen variant compares them directly
SMALL = {"fusion": {"width": 64, "layers": 2, "heads": 2}, "decoder": {"channels": [32, 16, 16], "out_size": 48}}


@pytest.mark.parametrize("changes", [
    {},
    {"fusion": {"mode": "late", "late_mlp_layers": 2}},
    {"fusion": {"mode": "none"}},
    {"decoder": {"enabled": False}},
    {"fusion": {"mode": "frozen"}, "decoder": {"enabled": False}},
    {"fusion": {"mlp_ratio": 2.5, "layers": 3}, "decoder": {"channels": [24]}},
])
def test_the_closed_form_is_what_flop_counter_counts_on_a_real_forward_and_backward(changes):
    from pipeline.config import deep_merge

    config = make_model_config(**SHAPES, preset="paper", overrides=deep_merge(SMALL, changes))
    torch.manual_seed(0)
    real = count_step_flops(build_model(config), grid=(6, 5), classes=3, batch=2)
    assert real > 0 and 2 * training_flops_per_sample(config, grid=(6, 5), classes=3) == real


def test_flops_follow_depth_width_decoder_tokens_and_classes():
    base = make_model_config(**SHAPES, preset="paper", overrides=SMALL)

    def flops(grid=(6, 6), classes=1, **changes):
        from pipeline.config import deep_merge

        config = make_model_config(**SHAPES, preset="paper", overrides=deep_merge(SMALL, changes))
        return training_flops_per_sample(config, grid=grid, classes=classes)

    reference = training_flops_per_sample(base, grid=(6, 6), classes=1)
    assert flops(fusion={"layers": 4}) > reference  # deeper
    assert flops(fusion={"width": 128, "heads": 2}) > reference  # wider
    assert flops(decoder={"channels": [64, 16, 16]}) > reference  # wider decoder
    # without the decoder the cosine is taken at the output size
    assert flops(decoder={"enabled": False, "out_size": 96}) > flops(decoder={"enabled": False})
    assert flops(grid=(8, 8)) > reference  # more tokens
    assert flops(classes=4) > reference  # |W| = 4
    assert flops(decoder={"enabled": False}) < reference
    # depth is linear: each block adds the same count
    assert flops(fusion={"layers": 4}) - flops(fusion={"layers": 3}) == flops(fusion={"layers": 3}) - reference


def test_the_paper_preset_on_clip_l_tokens_matches_a_meta_device_count():
    config = make_model_config(vision_dim=768, text_dim=768, preset="paper")
    with torch.device("meta"):
        model = build_model(config)
    flops = training_flops_per_sample(config, grid=(16, 16), classes=1)
    assert flops == count_step_flops(model, grid=(16, 16), classes=1)
    assert 390e9 < flops < 400e9  # ~398 GFLOP: the decoder's 512-channel convs at 128 px dominate
    frozen = make_model_config(vision_dim=768, text_dim=768, preset="paper",
                               overrides={"fusion": {"mode": "frozen"}, "decoder": {"enabled": False}})
    assert training_flops_per_sample(frozen, grid=(16, 16), classes=1) < 1e9  # nothing trains
