"""The released recipe's augmentation: image and mask move together, views are a function of (seed, image, view)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.data.augment import (
    RECIPE_STRENGTHS,
    RELEASED_NOISE_STD,
    AugmentConfig,
    augment_view,
    build_pipeline,
    resolve_augment,
    view_numbers,
)
from pipeline.data.labels import COCO_CLASSES, IGNORE, VOC_CLASSES
from pipeline.errors import UserError

# Class value -> colour, far apart so a bilinear blend never lands nearer another class.
PALETTE = {0: (0, 0, 0), 1: (250, 40, 40), 2: (40, 250, 40), IGNORE: (40, 40, 250)}
GEOMETRY_ONLY = AugmentConfig(jitter=0.0, noise_std=(0.0, 0.0))  # the photometric steps become identities


def _pattern() -> tuple[np.ndarray, np.ndarray]:
    """A 300 x 400 image whose colour spells its mask: two classes, an ignore patch, background."""
    mask = np.zeros((300, 400), np.uint8)
    mask[40:200, 50:220] = 1
    mask[120:280, 240:380] = 2
    mask[10:60, 300:390] = IGNORE
    colours = np.zeros((256, 3), np.uint8)
    for value, colour in PALETTE.items():
        colours[value] = colour
    return colours[mask], mask


def _colour_class(view: np.ndarray) -> np.ndarray:
    values = np.array(list(PALETTE))
    colours = np.array(list(PALETTE.values()), np.int32)
    distance = ((view[:, :, None, :].astype(np.int32) - colours[None, None]) ** 2).sum(-1)
    return values[distance.argmin(-1)]


def _interior(mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood inside the view has one mask value (the view's edge excluded)."""
    padded = np.pad(mask.astype(np.int16), radius, constant_values=-1)
    windows = sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return windows.min(axis=(-1, -2)) == windows.max(axis=(-1, -2))


@pytest.mark.parametrize("border", ["background", "ignore"])
def test_view_and_mask_agree_pixel_for_pixel_after_the_geometry(border):
    image, mask = _pattern()
    config = resolve_augment(AugmentConfig(**{**vars(GEOMETRY_ONLY), "border": border}), class_names=VOC_CLASSES)
    moved = tested = 0
    for view_index in range(40):
        view, view_mask = augment_view(image=image, mask=mask, config=config, size=64, seed=3, image_index=0,
                                       view_index=view_index)
        assert view.shape == (64, 64, 3) and view_mask.shape == (64, 64)
        assert set(np.unique(view_mask)) <= {0, 1, 2, IGNORE}  # nearest neighbour: no blended labels
        inside = _interior(view_mask)
        seen = _colour_class(view)
        if border == "ignore":  # pixels from outside the image: image 0, mask ignore
            seen = np.where((seen == 0) & (view_mask == IGNORE), IGNORE, seen)
        assert np.array_equal(seen[inside], view_mask[inside]), view_index
        tested += int(inside.sum())
        moved += not np.array_equal(view_mask, augment_view(image=image, mask=mask, config=config, size=64,
                                                            seed=3, image_index=0, view_index=view_index + 100)[1])
    assert tested > 40 * 64 * 64 * 0.4 and moved > 30  # about half the pixels checked, views really differ


def test_border_fill_is_background_by_default_and_ignore_on_request():
    image, mask = _pattern()
    image[:] = PALETTE[1]
    mask[:] = 1  # the whole image is class 1: anything else came from outside it
    fills = {}
    for border in ("background", "ignore"):
        config = resolve_augment(AugmentConfig(**{**vars(GEOMETRY_ONLY), "border": border}), class_names=VOC_CLASSES)
        values = set()
        for view_index in range(60):
            view, view_mask = augment_view(image=image, mask=mask, config=config, size=64, seed=0, image_index=1,
                                           view_index=view_index)
            outside = (view_mask != 1) & _interior(view_mask)
            assert (view[outside] == 0).all()  # the image is filled with 0 where the mask is filled
            values |= set(np.unique(view_mask[view_mask != 1]).tolist())
        fills[border] = values
    assert fills == {"background": {0}, "ignore": {IGNORE}}


def test_a_view_is_a_function_of_seed_image_and_view_only():
    image, mask = _pattern()
    config = resolve_augment(AugmentConfig(), class_names=VOC_CLASSES)

    def render(seed, image_index, view_index):
        return augment_view(image=image, mask=mask, config=config, size=48, seed=seed, image_index=image_index,
                            view_index=view_index)

    first = render(0, 5, 2)
    for _ in range(3):  # other views rendered in between leave it unchanged
        render(1, 2, 3)
        again = render(0, 5, 2)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    others = [render(1, 5, 2), render(0, 6, 2), render(0, 5, 3)]
    assert all(not np.array_equal(first[0], other[0]) for other in others)


def test_strengths_follow_the_dataset_and_the_noise_maps_the_old_defaults():
    pascal = resolve_augment(AugmentConfig(), class_names=VOC_CLASSES)
    coco = resolve_augment(AugmentConfig(), class_names=COCO_CLASSES)
    assert (pascal.jitter, pascal.rotate) == RECIPE_STRENGTHS["pascal5i"] == (0.5, 20.0)
    assert (coco.jitter, coco.rotate) == RECIPE_STRENGTHS["coco20i"] == (0.2, 10.0)
    assert resolve_augment(AugmentConfig(jitter=0.3), class_names=COCO_CLASSES).jitter == 0.3
    # albumentations 1.x GaussNoise: variance 10..50 on 0..255 pixels = std sqrt(10)..sqrt(50) of 255.
    assert np.allclose(np.array(RELEASED_NOISE_STD) * 255, [10 ** 0.5, 50 ** 0.5])
    assert AugmentConfig(**pascal.to_dict()) == pascal  # survives the store's JSON
    with pytest.raises(UserError, match="border"):
        AugmentConfig(border="reflect")
    with pytest.raises(ValueError, match="resolve"):
        build_pipeline(AugmentConfig(), 64)


def test_the_noise_of_a_view_has_the_released_spread():
    flat = np.full((64, 64, 3), 128, np.uint8)
    config = resolve_augment(AugmentConfig(jitter=0.0, block_p=1.0, step_p=1.0, alpha_affine=0.0, rotate=0.0,
                                           shift=0.0, scale=0.0), class_names=VOC_CLASSES)
    stds = [augment_view(image=flat, mask=np.zeros((64, 64), np.uint8), config=config, size=64, seed=0,
                         image_index=0, view_index=v)[0].astype(float).std() for v in range(20)]
    assert 10 ** 0.5 * 0.8 < min(stds) and max(stds) < 50 ** 0.5 * 1.2


def test_view_numbers_count_within_each_image():
    assert view_numbers(np.array([0, 0, 0, 2, 2, 5])).tolist() == [0, 1, 2, 0, 1, 0]
    assert view_numbers(np.array([], np.int32)).tolist() == []


def _fitted_linear_part(transform, size: int = 96) -> np.ndarray:
    """The 2x2 linear part of the map ``transform`` applied, fitted from a coordinate-coded image."""
    ys, xs = np.mgrid[0:size, 0:size]
    image = np.stack([xs + 16, ys + 16, np.full_like(xs, 255)], axis=-1).astype(np.uint8)
    out = transform(image=image, mask=np.zeros((size, size), np.uint8))["image"].astype(np.float64)
    inside = out[..., 2] == 255  # fully inside the source image: bilinear blends with the border are < 255
    inside[:2], inside[-2:], inside[:, :2], inside[:, -2:] = False, False, False, False
    oy, ox = np.nonzero(inside)
    source = np.stack([out[oy, ox, 0] - 16, out[oy, ox, 1] - 16], axis=1)  # where each output pixel came from
    design = np.stack([ox, oy, np.ones_like(ox)], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, source, rcond=None)
    return coefficients[:2].T  # output (x, y) -> source (x, y), linear part


def test_shift_scale_rotate_scales_both_axes_alike_as_released():
    import albumentations as A

    from pipeline.data.augment import shift_scale_rotate

    config = resolve_augment(AugmentConfig(), class_names=VOC_CLASSES)
    transform = A.Compose([shift_scale_rotate(config, p=1.0)], seed=0)
    ratios = []
    for seed in range(40):
        transform.set_random_seed(seed)
        singular = np.linalg.svd(_fitted_linear_part(transform), compute_uv=False)
        ratios.append(singular[0] / singular[1])
    # A similarity (rotation x one scale) has equal singular values; x and y drawn apart in 0.9-1.1 would
    # change the aspect by a median of about 6 %.
    assert max(ratios) < 1.01, f"aspect ratio changed by up to {max(ratios) - 1:.3f}"
    anisotropic = A.Compose([shift_scale_rotate(AugmentConfig(**{**config.to_dict(), "isotropic_scale": False}),
                                                p=1.0)], seed=0)
    spread = []
    for seed in range(40):
        anisotropic.set_random_seed(seed)
        singular = np.linalg.svd(_fitted_linear_part(anisotropic), compute_uv=False)
        spread.append(singular[0] / singular[1])
    assert np.median(spread) > 1.02  # the option really is the other behaviour


def test_the_recipe_uses_the_isotropic_shift_scale_rotate():
    import albumentations as A

    config = resolve_augment(AugmentConfig(), class_names=VOC_CLASSES)
    block = build_pipeline(config, 64).transforms[1]
    affines = [t for t in block.transforms if isinstance(t, A.Affine)]
    assert len(affines) == 1 and affines[0].keep_ratio is True


def _flipped_and_noisy(config, count: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Per view: was it flipped (a left/right label board swaps sides), did it get noise (a flat colour isn't)."""
    mask = (1 + np.arange(260)[None, :] * 10 // 260).repeat(200, axis=0).astype(np.uint8)  # labels 1..10 by column
    image = np.full((200, 260, 3), 120, np.uint8)
    flipped, noisy = [], []
    for k in range(count):
        view, labels = augment_view(image=image, mask=mask, config=config, size=48, seed=11, image_index=0,
                                    view_index=k)
        columns = np.arange(48)[None, :].repeat(48, axis=0)
        inside = (labels > 0) & (labels < IGNORE)
        flipped.append(np.corrcoef(columns[inside], labels[inside])[0, 1] < 0)
        inside = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)
        noisy.append(np.median(np.abs(np.diff(view[..., 1].astype(int), axis=1))[inside]) > 0)
    return np.array(flipped), np.array(noisy)


def test_the_block_steps_draw_independently_and_old_splits_keep_their_views():
    assert resolve_augment(AugmentConfig(), class_names=VOC_CLASSES).independent_draws is True
    # The elastic step's affine part scaled to the 48 px view (20 px at 224), so no view shrinks to a speck.
    config = resolve_augment(AugmentConfig(alpha_affine=5.0), class_names=VOC_CLASSES)
    flipped, noisy = _flipped_and_noisy(config)
    assert 0.15 < flipped.mean() < 0.35 and 0.15 < noisy.mean() < 0.35  # block 1/2 x step 1/2
    assert (flipped & noisy).mean() < 0.12  # about 1/16, not 1/4: one step does not drag the others along
    # A split planned before the field existed (no key: None) renders as it was: every transform re-seeded
    # alike, so its steps fire together.
    old = AugmentConfig(**{k: v for k, v in config.to_dict().items() if k != "independent_draws"})
    flipped, noisy = _flipped_and_noisy(old, count=80)
    assert flipped.mean() > 0.15 and (flipped == noisy).all()
