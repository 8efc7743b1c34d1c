"""The device augmentation (kornia) renders the same distribution of views as the albumentations path.

Views of both backends are summarised per view (where the crop, flip and rotation put a planted grid of
labels; the colour, noise and border fill; a real photo's brightness and contrast) and each summary is
compared with a two-sample test. Everything is seeded, so the p-values are fixed numbers: the test cannot
flake, and a deliberately wrong device config (a step dropped, a probability changed) must fail it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.augment import AugmentConfig, augment_view, resolve_augment
from pipeline.data.labels import COCO_CLASSES, IGNORE, VOC_CLASSES

pytest.importorskip("kornia")
stats = pytest.importorskip("scipy.stats")

from pipeline.data.augment_gpu import affine_matrix, augment_batch, draw_views  # noqa: E402

SIZE = 64
VIEWS = 300
GRID = 15  # the planted mask: a GRID x GRID board of labels 1..225, so a view's labels say where it came from
P_FLOOR = 1e-3  # a summary "differs" below this two-sample p-value

# Small tensors on a shared machine: torch's thread pool costs more than it brings (8x here).
pytestmark = pytest.mark.usefixtures("one_thread")


def _planted() -> tuple[np.ndarray, np.ndarray]:
    """A flat colour (so colour, noise and fill are measurable) over a board of labels (so geometry is)."""
    height, width = 200, 260
    rows = np.arange(height)[:, None] * GRID // height
    cols = np.arange(width)[None, :] * GRID // width
    mask = (1 + GRID * rows + cols).astype(np.uint8)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (180, 90, 60)
    return image, mask


def _config(**changes) -> AugmentConfig:
    """The recipe, its elastic affine part scaled to the small view (20 px at 224 -> 6 px at 64), so that the
    rotation of shift-scale-rotate stands out of its shears."""
    return resolve_augment(AugmentConfig(**{"border": "ignore", "alpha_affine": 6.0, **changes}),
                           class_names=VOC_CLASSES)


def _cpu_views(image, mask, config, count=VIEWS, seed=5):
    pairs = [augment_view(image=image, mask=mask, config=config, size=SIZE, seed=seed, image_index=0,
                          view_index=k) for k in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _gpu_views(image, mask, config, count=VIEWS, seed=7):
    views, masks = augment_batch(images=[image], masks=[mask], source=np.zeros(count, int), config=config, size=SIZE,
                                 seed=seed, image_index=np.zeros(count, int), view_index=np.arange(count), device="cpu")
    return views.numpy(), masks.numpy()


def _summaries(views: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per view: rotation, flip and kept width from a plane fitted to the board's column index; fill, colour, noise."""
    names = ("angle", "rotated", "flipped", "kept", "outside", "red", "green", "noise")
    out: dict[str, list[float]] = {k: [] for k in names}
    v, u = np.mgrid[0:SIZE, 0:SIZE]
    for view, mask in zip(views, masks):
        inside = mask != IGNORE
        out["outside"].append(1 - inside.mean())
        if inside.sum() < 50:
            continue
        column = (mask[inside].astype(int) - 1) % GRID
        design = np.c_[u[inside], v[inside], np.ones(inside.sum())]
        a, b, _ = np.linalg.lstsq(design, column, rcond=None)[0]
        # Read to what the board resolves (1 degree, 5 % of the width): finer, the fit sees how each backend
        # rounds label edges (OpenCV's nearest resize is not centred), not where the views come from.
        out["angle"].append(round(abs(math.degrees(math.atan2(b, abs(a))))))  # rotations are symmetric
        out["rotated"].append(float(out["angle"][-1] >= 3))
        out["flipped"].append(float(a < 0))
        out["kept"].append(round(math.log(math.hypot(a, b) * SIZE / GRID) / 0.05) * 0.05)
        out["red"].append(np.median(view[..., 0][inside]))
        out["green"].append(np.median(view[..., 1][inside]))
        both = inside[:, 1:] & inside[:, :-1]
        out["noise"].append(np.median(np.abs(np.diff(view[..., 1].astype(float), axis=1))[both]))
    return {k: np.asarray(vals) for k, vals in out.items()}


def _p_values(first: dict, second: dict) -> dict[str, float]:
    """Two-sample p-values per summary: Kolmogorov-Smirnov, and Fisher's exact test for the yes/no ones."""
    out = {}
    for key in first:
        if key in ("flipped", "rotated"):
            table = [[first[key].sum(), len(first[key]) - first[key].sum()],
                     [second[key].sum(), len(second[key]) - second[key].sum()]]
            out[key] = float(stats.fisher_exact(table).pvalue)
        else:
            out[key] = float(stats.ks_2samp(first[key], second[key]).pvalue)
    return out


@pytest.fixture(scope="module")
def planted_reference(one_thread):
    image, mask = _planted()
    return image, mask, _summaries(*_cpu_views(image, mask, _config()))


def test_the_device_path_renders_the_cpu_distribution_of_views(planted_reference):
    image, mask, cpu = planted_reference
    gpu = _summaries(*_gpu_views(image, mask, _config()))
    p = _p_values(cpu, gpu)
    assert min(p.values()) > P_FLOOR, p
    assert 0.18 < gpu["flipped"].mean() < 0.32  # block 1/2 x step 1/2
    assert 0.15 < (np.abs(gpu["angle"]) > 1.0).mean() < 0.45  # shift-scale-rotate on about a quarter of the views


def _dropping(step: str):
    """draw_views with ``step`` never run: the device recipe with one step left out."""
    from pipeline.data import augment_gpu

    real = augment_gpu.draw_views

    def draw(**kwargs):
        draws = real(**kwargs)
        draws.steps[step][:] = False
        return draws
    return draw


@pytest.mark.parametrize("change", [
    {"step_p": 0.25},  # every step at half its probability
    {"crop_scale": (0.25, 0.5)},  # the resized crop keeps too little
    "jitter", "noise", "flip", "elastic", "ssr",  # one step dropped
], ids=lambda c: c if isinstance(c, str) else next(iter(c)))
def test_a_wrong_device_recipe_fails_the_comparison(planted_reference, monkeypatch, change):
    from pipeline.data import augment_gpu

    image, mask, cpu = planted_reference
    if isinstance(change, str):
        monkeypatch.setattr(augment_gpu, "draw_views", _dropping(change))
    gpu = _summaries(*_gpu_views(image, mask, _config(**({} if isinstance(change, str) else change))))
    assert min(_p_values(cpu, gpu).values()) < P_FLOOR


def _photos(root: Path, count: int = 6):
    from PIL import Image

    names = sorted((root / "images").glob("*.jpg"))[:count]
    if len(names) < count:
        pytest.skip(f"{root} holds fewer than {count} photos")
    images = [np.asarray(Image.open(n).convert("RGB")) for n in names]
    masks = [np.asarray(Image.open(root / "masks" / f"{n.stem}.png")) for n in names]
    return images, masks


def test_real_photos_keep_their_brightness_contrast_and_label_share(coco128):
    images, masks = _photos(coco128)
    config = resolve_augment(AugmentConfig(), class_names=COCO_CLASSES)
    per_image = 32
    source = np.repeat(np.arange(len(images)), per_image)
    views = np.arange(len(source)) % per_image
    cpu = [augment_view(image=images[i], mask=masks[i], config=config, size=SIZE, seed=1, image_index=int(i),
                        view_index=int(k)) for i, k in zip(source, views)]
    gpu_views, gpu_masks = augment_batch(images=images, masks=masks, source=source, config=config, size=SIZE, seed=2,
                                         image_index=source, view_index=views, device="cpu")

    def summary(views, masks):
        views, masks = np.asarray(views, float), np.asarray(masks)
        return {"mean": views.mean(axis=(1, 2, 3)), "std": views.std(axis=(1, 2, 3)),
                "background": (masks == 0).mean(axis=(1, 2))}

    first = summary([c[0] for c in cpu], [c[1] for c in cpu])
    second = summary(gpu_views.numpy(), gpu_masks.numpy())
    p = {k: float(stats.ks_2samp(first[k], second[k]).pvalue) for k in first}
    assert min(p.values()) > P_FLOOR, p
    labels = set(np.unique(gpu_masks.numpy()).tolist())
    assert labels <= set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist()) | {0}  # nearest: no blends


def test_a_view_is_a_function_of_seed_image_and_view_whatever_its_batch():
    image, mask = _planted()
    config = _config()
    views, masks = augment_batch(images=[image, image[::-1].copy()], masks=[mask, mask], source=[0, 1, 0, 1],
                                 config=config, size=SIZE, seed=3, image_index=[4, 9, 4, 9], view_index=[0, 0, 1, 1],
                                 device="cpu")
    alone, alone_mask = augment_batch(images=[image[::-1].copy()], masks=[mask], source=[0], config=config, size=SIZE,
                                      seed=3, image_index=[9], view_index=[1], device="cpu")
    assert torch_equal(views[3], alone[0]) and torch_equal(masks[3], alone_mask[0])
    again, _ = augment_batch(images=[image, image[::-1].copy()], masks=[mask, mask], source=[0, 1, 0, 1],
                             config=config, size=SIZE, seed=3, image_index=[4, 9, 4, 9], view_index=[0, 0, 1, 1],
                             device="cpu")
    assert torch_equal(views, again)
    other, _ = augment_batch(images=[image], masks=[mask], source=[0], config=config, size=SIZE, seed=4,
                             image_index=[4], view_index=[0], device="cpu")
    assert not torch_equal(other[0], views[0])  # another seed, another view


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.parametrize("border", ["background", "ignore"])
def test_masks_keep_only_their_labels_and_move_with_the_image(border):
    """A board whose colour spells its label: after every step the view's colour still names its mask label."""
    height, width = 150, 200
    mask = np.zeros((height, width), np.uint8)
    mask[20:110, 30:120] = 1
    mask[70:140, 130:190] = 2
    mask[5:30, 150:195] = IGNORE
    palette = {0: (0, 0, 0), 1: (250, 40, 40), 2: (40, 250, 40), IGNORE: (40, 40, 250)}
    image = np.zeros((height, width, 3), np.uint8)
    for value, colour in palette.items():
        image[mask == value] = colour
    config = _config(border=border, jitter=0.0, noise_std=(0.0, 0.0))  # geometry only: colours stay put
    views, masks = augment_batch(images=[image], masks=[mask], source=np.zeros(48, int), config=config, size=SIZE,
                                 seed=1, image_index=np.zeros(48, int), view_index=np.arange(48), device="cpu")
    views, masks = views.numpy().astype(int), masks.numpy()
    assert set(np.unique(masks).tolist()) <= {0, 1, 2, IGNORE}  # nearest neighbour: no blended labels
    colours = np.array(list(palette.values()))
    nearest = np.array(list(palette))[((views[..., None, :] - colours) ** 2).sum(-1).argmin(-1)]
    if border == "ignore":  # brought in from outside: image 0, mask ignore
        nearest = np.where((nearest == 0) & (masks == IGNORE), IGNORE, nearest)
    # Away from label edges (where bilinear colours blend) the colour names the label.
    same = np.ones_like(masks, bool)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        same &= masks == np.roll(masks, (dy, dx), axis=(1, 2))
    same[:, [0, -1]] = same[:, :, [0, -1]] = False
    assert (nearest[same] == masks[same]).mean() > 0.995
    assert same.mean() > 0.5


def test_the_affine_steps_use_albumentations_convention():
    from albumentations.augmentations.geometric import functional as fgeometric

    rng = np.random.default_rng(0)
    for _ in range(5):
        translate, shear, scale = rng.uniform(-9, 9, 2), rng.uniform(-20, 20, 2), rng.uniform(0.7, 1.3, 2)
        rotate, centre = rng.uniform(-30, 30), (31.5, 31.5)
        theirs = fgeometric.create_affine_transformation_matrix(
            {"x": translate[0], "y": translate[1]}, {"x": shear[0], "y": shear[1]},
            {"x": scale[0], "y": scale[1]}, rotate, centre)
        ours = affine_matrix(translate=tuple(translate), shear=tuple(shear), scale=tuple(scale), rotate=rotate,
                             centre=centre)
        np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_every_choice_is_drawn_from_the_view_seed():
    config = _config()
    one = draw_views(config=config, size=SIZE, image_hw=[(200, 260)] * 3, seed=2, image_index=[0, 0, 1],
                     view_index=[0, 1, 0])
    two = draw_views(config=config, size=SIZE, image_hw=[(200, 260)], seed=2, image_index=[1], view_index=[0])
    np.testing.assert_array_equal(one.crop[2], two.crop[0])
    np.testing.assert_array_equal(one.device_seeds[2], two.device_seeds[0])
    assert not np.array_equal(one.device_seeds[0], one.device_seeds[1])
