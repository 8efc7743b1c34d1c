"""The elastic step's low-rank blur: albumentations' field from the same draws, the same views, a fraction of the time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.data.augment import AugmentConfig, augment_view, build_pipeline, resolve_augment
from pipeline.data.elastic import blur_matrix, displacement_fields
from pipeline.data.labels import VOC_CLASSES
from pipeline.errors import UserError


def _albumentations_field(shape, seed: int) -> np.ndarray:
    import albumentations.augmentations.geometric.functional as fgeometric

    dx, dy = fgeometric.generate_displacement_fields(shape, 1.0, 50.0, same_dxdy=False, kernel_size=(0, 0),
                                                     random_generator=np.random.default_rng(seed),
                                                     noise_distribution="gaussian")
    return np.stack([dx, dy])


@pytest.mark.parametrize("shape", [(224, 224), (64, 96), (37, 100)])
def test_the_field_is_albumentations_field_from_the_same_draws(shape):
    for seed in range(4):
        theirs = _albumentations_field(shape, seed)
        ours = displacement_fields(shape=shape, alpha=1.0, sigma=50.0, random_generator=np.random.default_rng(seed))
        assert ours.dtype == np.float32 and ours.shape == (2, *shape)
        # to 1e-4 of the field's size: far below the 1/32 px step at which OpenCV's remap reads a map
        assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max(), (shape, seed)
        assert abs(ours.std() / theirs.std() - 1) < 1e-4


def test_the_blur_matrix_is_opencvs_blur():
    import cv2

    line = np.random.default_rng(0).standard_normal((1, 300)).astype(np.float64)
    theirs = cv2.GaussianBlur(line, (0, 0), 50.0, borderType=cv2.BORDER_REPLICATE)[0]
    assert np.allclose(blur_matrix(length=300, sigma=50.0) @ line[0], theirs, atol=1e-9)


def _photo(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour image with edges, and a mask of three regions (views of it have gradients everywhere)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:240, 0:320].astype(np.float32)
    image = np.stack([127 + 100 * np.sin(xs / (9 + 4 * c) + ys / 23 + c) for c in range(3)], axis=-1)
    image += rng.normal(0, 12, image.shape)
    mask = ((xs > 120).astype(np.uint8) + (ys > 150)).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def test_views_are_the_same_as_with_albumentations_own_blur():
    image, mask = _photo()
    fast = resolve_augment(AugmentConfig(block_p=1.0, step_p=1.0), class_names=VOC_CLASSES)
    slow = AugmentConfig(**{**fast.to_dict(), "elastic_blur": "opencv"})
    assert fast.elastic_blur == "low-rank"
    differing, pixels = 0, 0
    for view in range(40):  # every step applied, the elastic one included
        a = augment_view(image=image, mask=mask, config=fast, size=96, seed=1, image_index=0, view_index=view)
        b = augment_view(image=image, mask=mask, config=slow, size=96, seed=1, image_index=0, view_index=view)
        assert np.array_equal(a[1], b[1])  # masks: nearest neighbour never moves on a sub-pixel field
        change = np.abs(a[0].astype(int) - b[0].astype(int))
        assert change.max() <= 1
        differing += int(change.any())
        pixels += int(change.any(-1).sum())
    # A map within 1e-6 px of a 1/64 px rounding boundary can round the other way: rare, one grey level.
    assert pixels <= 40 * 96 * 96 * 1e-4 and differing <= 4


def test_the_low_rank_blur_is_several_times_faster_than_opencvs():
    import albumentations.augmentations.geometric.functional as fgeometric

    rng = np.random.default_rng(0)
    ours = theirs = 0.0
    for _ in range(6):  # interleaved, so that another process's load weighs on both alike
        start = time.thread_time()
        displacement_fields(shape=(224, 224), alpha=1.0, sigma=50.0, random_generator=rng)
        middle = time.thread_time()
        fgeometric.generate_displacement_fields((224, 224), 1.0, 50.0, same_dxdy=False, kernel_size=(0, 0),
                                                random_generator=rng, noise_distribution="gaussian")
        ours, theirs = ours + middle - start, theirs + time.thread_time() - middle
    assert ours < theirs / 3, f"low-rank {ours * 1e3 / 6:.2f} ms vs OpenCV {theirs * 1e3 / 6:.2f} ms a field"


def test_splits_planned_before_the_choice_keep_albumentations_blur():
    import albumentations as A

    from pipeline.data.elastic import ElasticTransform

    def elastic_of(config):
        block = build_pipeline(config, 64).transforms[1]
        return [t for step in block.transforms if isinstance(step, A.Sequential) for t in step.transforms
                if isinstance(t, A.ElasticTransform)][0]

    resolved = resolve_augment(AugmentConfig(), class_names=VOC_CLASSES)
    old = {k: v for k, v in resolved.to_dict().items() if k != "elastic_blur"}  # a meta.augment without the key
    assert type(elastic_of(AugmentConfig(**old))) is A.ElasticTransform
    assert type(elastic_of(resolved)) is ElasticTransform
    assert resolve_augment(AugmentConfig(elastic_blur="opencv"), class_names=VOC_CLASSES).elastic_blur == "opencv"
    with pytest.raises(UserError, match="elastic_blur"):
        AugmentConfig(elastic_blur="fast")
