"""Fusioner variants: shapes, padding mask, parameter count, mask rule, a tiny fit."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.config import from_dict, to_dict
from pipeline.errors import UserError
from pipeline.model import (
    PADDED_LOGIT,
    PRESETS,
    ModelConfig,
    build_model,
    count_parameters,
    make_model_config,
    predict_masks,
)
from pipeline.training.losses import binary_segmentation_loss

DV, DT = 24, 20  # small, unequal encoder widths catch swapped projections


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and spinning threads crawl on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny(mode: str = "early", decoder: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = make_model_config(vision_dim=DV, text_dim=DT, preset="tiny",
                               overrides={"fusion": {"mode": mode}, "decoder": {"enabled": decoder}})
    return build_model(config).eval()


@pytest.mark.parametrize(("mode", "decoder", "grid"), list(itertools.product(
    ["early", "late", "none"], [True, False], [(4, 4), (16, 16)])))
def test_forward_shapes_every_variant(mode, decoder, grid):
    model = _tiny(mode, decoder)
    h, w = grid
    visual = torch.randn(2, h * w, DV, dtype=torch.float16)  # the cache stores fp16
    text = torch.randn(2, 3, DT)
    text_mask = torch.tensor([[True, True, True], [True, False, False]])
    logits = model(visual, text, grid=grid, text_mask=text_mask, out_size=40)
    assert logits.shape == (2, 3, 40, 40) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.all(logits[1, 1:] == PADDED_LOGIT)
    # |cosine| <= 1, so real logits are bounded by 1 / temperature.
    assert logits[0].abs().max() <= 1 / model.config.temperature + 1e-4
    assert model(visual, text, grid=grid).shape == (2, 3, 224, 224)  # config.decoder.out_size


@pytest.mark.parametrize("mode", ["early", "late", "none"])
def test_padded_classes_do_not_change_real_logits(mode):
    model = _tiny(mode)
    visual = torch.randn(1, 16, DV)
    real = torch.randn(1, 2, DT)
    garbage = 100 * torch.randn(1, 3, DT)
    alone = model(visual, real, grid=(4, 4), out_size=32)
    padded = model(visual, torch.cat([real, garbage], 1), grid=(4, 4), out_size=32,
                   text_mask=torch.tensor([[True, True, False, False, False]]))
    torch.testing.assert_close(padded[:, :2], alone, atol=1e-4, rtol=1e-5)


def test_padded_classes_get_no_gradient():
    model = _tiny("early")
    visual = torch.randn(2, 16, DV, requires_grad=True)
    text = torch.randn(2, 4, DT, requires_grad=True)
    text_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    model(visual, text, grid=(4, 4), text_mask=text_mask, out_size=16).sum().backward()
    assert torch.all(text.grad[1, 2:] == 0)
    assert torch.all(text.grad[1, :2].abs().sum(-1) > 0)


def test_shared_text_broadcasts_to_the_batch():
    model = _tiny("early")
    visual = torch.randn(3, 16, DV)
    text = torch.randn(2, DT)
    shared = model(visual, text, grid=(4, 4), out_size=16)
    explicit = model(visual, text.expand(3, -1, -1), grid=(4, 4), out_size=16)
    torch.testing.assert_close(shared, explicit)


def test_batch_results_do_not_depend_on_batch_mates():
    model = _tiny("early")
    visual, text = torch.randn(2, 16, DV), torch.randn(2, 3, DT)
    together = model(visual, text, grid=(4, 4), out_size=16)
    single = model(visual[1:], text[1:], grid=(4, 4), out_size=16)
    torch.testing.assert_close(together[1:], single, atol=1e-4, rtol=1e-5)


def test_paper_fusion_parameter_count():
    # d = 512, Dv = Dt = 768, hidden = 4d = 2048, 12 layers.
    # visual in:  LN(768) 1536 + Linear 768*512+512 = 393,728 + LN(512) 1024   =    396,288
    # text in:    LN(768) 1536 + Linear 393,728                                =    395,264
    # class-type embedding                                                     =        512
    # per block:  LN 2d = 1024
    #             attention 4d^2 + 4d (qkv 3d^2+3d, out d^2+d)                 =  1,050,624
    #             LN 1024
    #             MLP 2*4d^2 + 4d + d = 2,097,152 + 2048 + 512                 =  2,099,712
    #             block total                                                  =  3,152,384
    # 12 blocks                                                                = 37,828,608
    # final LN                                                                 =      1,024
    # output projections 2 * (d^2 + d)                                         =    525,312
    # fusion total = 396,288 + 395,264 + 512 + 37,828,608 + 1,024 + 525,312    = 39,147,008
    # decoder: 4 bias-free 3x3 convs 4 * 512*512*9 = 9,437,184, 1x1 conv 262,656 = 9,699,840
    model = build_model(make_model_config(vision_dim=768, text_dim=768, preset="paper"))
    counts = count_parameters(model)
    assert counts == {"fusion": 39_147_008, "decoder": 9_699_840, "total": 48_846_848}
    logits = model.eval()(torch.randn(2, 16, 768), torch.randn(2, 768), grid=(4, 4))
    assert logits.shape == (2, 2, 224, 224)


def test_presets_round_trip_through_config():
    for name in PRESETS:
        config = make_model_config(vision_dim=768, text_dim=512, preset=name)
        assert from_dict(ModelConfig, to_dict(config)) == config
    small = make_model_config(vision_dim=8, text_dim=8, preset="small")
    assert small.decoder.channels == (64, 32, 32, 32) and small.fusion.width == 64


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError):
        make_model_config(vision_dim=8, text_dim=8, preset="huge")
    with pytest.raises(UserError):
        make_model_config(vision_dim=8, text_dim=8, overrides={"fusion": {"width": 30, "heads": 4}})
    with pytest.raises(UserError):
        make_model_config(vision_dim=8, text_dim=8, overrides={"fusion": {"depth": 3}})


def test_grid_mismatch_is_rejected():
    with pytest.raises(ValueError):
        _tiny()(torch.randn(1, 16, DV), torch.randn(1, DT), grid=(4, 5))


def test_predict_masks_one_class_is_sigmoid_over_threshold():
    logits = torch.tensor([-1.0, 0.0, 1e-3, 2.0]).view(1, 1, 1, 4)
    labels, probs = predict_masks(logits, threshold=0.5)
    # sigmoid(0) == 0.5 ties with the background channel, and ties go to background.
    assert labels.tolist() == [[[0, 0, 1, 1]]]
    torch.testing.assert_close(probs, logits.sigmoid())


def test_predict_masks_multiclass_argmax_with_background():
    probs = torch.tensor([[0.2, 0.7, 0.6, 0.9],    # class 0
                          [0.4, 0.8, 0.1, 0.95]])  # class 1 (padded in the second call)
    logits = torch.logit(probs).view(1, 2, 1, 4)
    labels, _ = predict_masks(logits, threshold=0.5)
    assert labels.tolist() == [[[0, 2, 1, 2]]]
    labels, probs_out = predict_masks(logits, threshold=0.5, text_mask=torch.tensor([[True, False]]))
    assert labels.tolist() == [[[0, 1, 1, 1]]]
    assert torch.all(probs_out[0, 1] == 0)
    model = _tiny()
    assert model.predict_masks(logits)[0].tolist() == [[[0, 2, 1, 2]]]


def test_tiny_model_learns_a_synthetic_task():
    """Patches carry a class direction where the class is; the model must find it."""
    torch.manual_seed(0)
    batch, grid, classes = 8, (4, 4), 2
    prototypes = torch.randn(classes, DV)
    names = prototypes[:, :DT] + 0.1 * torch.randn(classes, DT)
    fg = torch.rand(batch, classes, 16) > 0.5  # [B, C, HW] where class c is present
    visual = torch.randn(batch, 16, DV) + 2 * torch.einsum("bch,cd->bhd", fg.float(), prototypes)
    targets = fg.view(batch, classes, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).to(torch.uint8)
    targets[:, :, 0, 0] = 255
    model = _tiny("early").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(visual, names, grid=grid, out_size=16)
        loss = binary_segmentation_loss(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_decoder_resizes_features_before_the_cosine_as_released():
    # Released order: decoded features resized to the output size, then normalised, then cosine / tau.
    torch.manual_seed(0)
    config = make_model_config(vision_dim=DV, text_dim=DT, preset="tiny", overrides={"decoder": {"out_size": 40}})
    model = build_model(config).eval()
    visual, text = torch.randn(2, 16, DV), torch.randn(2, 3, DT)
    with torch.no_grad():
        logits = model(visual, text, grid=(4, 4))
        v, t = torch.nn.functional.normalize(visual, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        patches, classes = model.fusion(v, t, text_mask=None)
        pixels = model.decoder(patches.transpose(1, 2).reshape(2, -1, 4, 4))  # [B, d, 32, 32]
        pixels = torch.nn.functional.interpolate(pixels, size=(40, 40), mode="bilinear", align_corners=False)
        reference = torch.einsum("bdhw,bcd->bchw", torch.nn.functional.normalize(pixels, dim=1),
                                 torch.nn.functional.normalize(classes, dim=-1)) / config.temperature
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("classes", [3, 8, 20])  # fewer, as many and more classes than channels
def test_cosine_logits_match_normalise_then_einsum_in_value_and_gradient(classes):
    from pipeline.model import cosine_logits

    torch.manual_seed(0)
    pixels = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    text = torch.randn(2, classes, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        pixels[0, :, 0, 0] = 0.0  # a zero feature: F.normalize's epsilon, not a division by zero
    weights = torch.randn(2, classes, 5, 6, dtype=torch.float64)
    ours = cosine_logits(pixels, text, temperature=0.07)
    reference = torch.einsum("bdhw,bcd->bchw", torch.nn.functional.normalize(pixels, dim=1),
                             torch.nn.functional.normalize(text, dim=-1)) / 0.07
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((ours * weights).sum(), (pixels, text))
    expected = torch.autograd.grad((reference * weights).sum(), (pixels, text))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_logit_resizing_is_a_named_option_that_differs():
    torch.manual_seed(0)
    released = make_model_config(vision_dim=DV, text_dim=DT, preset="tiny", overrides={"decoder": {"out_size": 40}})
    cheaper = make_model_config(vision_dim=DV, text_dim=DT, preset="tiny",
                                overrides={"decoder": {"out_size": 40, "upsample": "logits"}})
    model = build_model(released).eval()
    other = build_model(cheaper).eval()
    other.load_state_dict(model.state_dict())
    visual, text = torch.randn(1, 16, DV), torch.randn(1, 2, DT)
    with torch.no_grad():
        a, b = model(visual, text, grid=(4, 4)), other(visual, text, grid=(4, 4))
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize(("width", "heads", "decoder"), [(64, 1, 151_616), (512, 8, 9_699_840),
                                                          (1024, 16, 38_798_336)])
def test_decoder_is_as_wide_as_the_fusion_module(width, heads, decoder):
    # Released Decoder(transformer_width): 4 bias-free 3x3 convs d -> d and a 1x1 conv d -> d with bias.
    assert decoder == 4 * 9 * width * width + width * width + width
    config = make_model_config(vision_dim=768, text_dim=768, overrides={"fusion": {"width": width, "heads": heads,
                                                                                    "layers": 1}})
    assert count_parameters(build_model(config))["decoder"] == decoder


def test_decoder_depth_comes_from_blocks_then_the_encoder_entry():
    from pipeline.model import decoder_channels

    config = make_model_config(vision_dim=8, text_dim=8, overrides={"fusion": {"width": 32, "heads": 4}})
    assert decoder_channels(config) == (32,) * 4
    assert decoder_channels(config, encoder_blocks=5) == (32,) * 5
    config.decoder.blocks = 3
    assert decoder_channels(config, encoder_blocks=5) == (32,) * 3
    config.decoder.channels = (16, 8)
    assert decoder_channels(config, encoder_blocks=5) == (16, 8)
