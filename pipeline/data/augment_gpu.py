"""The released recipe's augmentation, batched on a torch device with kornia (``AugmentConfig(backend="gpu")``).

The same recipe as :mod:`pipeline.data.augment`, split in two halves:

* :func:`draw_views` draws every random number of a view on the host from a
  generator seeded by ``(seed, image, view)`` (:func:`~pipeline.data.augment.view_seed`):
  which crop and its box, whether the block and each step run, the jitter
  factors and their order, the noise level, both affine maps, and the seeds of
  the per-view device generators that draw the Gaussian noise and the elastic
  field. A few dozen scalars a view; no pixel is touched.
* :func:`augment_views` uploads each decoded image once and renders the views
  on the device: the crop is a warp of the source image to S x S, every later
  step runs on the batch of views it applies to. Images are bilinear, masks
  nearest-neighbour (the ignore value survives); pixels from outside are 0 in
  the image and background or ignore in the mask, as ``border`` says.

A view is reproducible on the same kind of device (its noise comes from a
``torch.Generator`` of that device, seeded per view), whatever batch it is in.
It is not bit-identical to the albumentations path: the random streams differ
and intermediate steps are not rounded to uint8; the distribution of views is
the same, which ``tests/data/test_augment_gpu.py`` checks with two-sample tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.augment import ELASTIC_SIGMA, AugmentConfig, view_seed
from pipeline.data.labels import IGNORE
from pipeline.errors import UserError

EXTRA = "gpu-augment"  # the optional dependency group that installs kornia
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect range
_STEPS = ("jitter", "noise", "flip", "elastic", "ssr")


def require_kornia():
    """kornia, or a one-line error naming the extra that installs it."""
    try:
        import kornia
    except ImportError:
        raise UserError(f"augment backend 'gpu' needs kornia: pip install 'fusioner[{EXTRA}]'") from None
    return kornia


def affine_matrix(*, translate: tuple[float, float], shear: tuple[float, float], scale: tuple[float, float],
                  rotate: float, centre: tuple[float, float]) -> np.ndarray:
    """[3, 3] forward map (source pixel -> output pixel, integer pixel centres) of an affine step about ``centre``.

    Shift to the centre, scale, rotate (degrees, counter-clockwise on screen), shear (degrees), translate
    (pixels), shift back: albumentations' ``Affine`` convention, so the two backends warp alike.
    """
    a = math.radians(rotate % 360)
    to_origin = np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1.0]])
    scaling = np.diag([scale[0], scale[1], 1.0])
    rotation = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    shearing = np.array([[1, math.tan(math.radians(shear[0])), 0], [math.tan(math.radians(shear[1])), 1, 0],
                         [0, 0, 1.0]])
    back = np.array([[1, 0, centre[0] + translate[0]], [0, 1, centre[1] + translate[1]], [0, 0, 1.0]])
    return back @ shearing @ rotation @ scaling @ to_origin


def crop_box(rng: np.random.Generator, *, config: AugmentConfig, size: int, height: int,
             width: int) -> tuple[float, float, float, float]:
    """(x, y, w, h) in source pixels of the recipe's crop: a random resized crop or shortest side + random crop."""
    if rng.random() < 0.5:  # random resized crop: 10 tries of area and aspect, then the centre crop
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*config.crop_scale)
            aspect = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1)), float(w), float(h)
        ratio = width / height
        w = width if ratio <= _RATIO[1] else int(round(height * _RATIO[1]))
        h = height if ratio >= _RATIO[0] else int(round(width / _RATIO[0]))
        return float((width - w) // 2), float((height - h) // 2), float(w), float(h)
    factor = size / min(height, width)  # the shortest side to S, then an S x S crop of the resized image
    rows, cols = max(size, int(round(height * factor))), max(size, int(round(width * factor)))
    top, left = int((rows - size) * rng.random()), int((cols - size) * rng.random())
    fy, fx = height / rows, width / cols
    return left * fx, top * fy, size * fx, size * fy


def crop_matrix(box: tuple[float, float, float, float], *, size: int) -> np.ndarray:
    """[3, 3] forward map of a box resized to S x S (OpenCV's resize: pixel centres at half-integers)."""
    x, y, w, h = box
    fx, fy = w / size, h / size
    return np.array([[1 / fx, 0, (0.5 - x) / fx - 0.5], [0, 1 / fy, (0.5 - y) / fy - 0.5], [0, 0, 1.0]])


@dataclass(frozen=True)
class ViewDraws:
    """Every random choice of a batch of views, one row per view (host arrays)."""

    crop: np.ndarray  # [B, 3, 3] source -> S x S
    steps: dict  # step name -> [B] bool: it runs (the block ran and the step's own draw passed)
    colour: np.ndarray  # [B, 4] brightness, contrast, saturation factors and hue shift (fraction of the circle)
    order: np.ndarray  # [B, 4] the order the four colour operations run in
    noise_std: np.ndarray  # [B] on 0..255 pixels
    elastic_affine: np.ndarray  # [B, 3, 3]
    ssr: np.ndarray  # [B, 3, 3] shift-scale-rotate
    device_seeds: np.ndarray  # [B, 2] int64: seeds of the per-view device generators (noise, elastic field)


def draw_view(*, config: AugmentConfig, size: int, height: int, width: int, seed: int, image_index: int,
              view_index: int) -> dict:
    """One view's random choices, from its own generator: the same numbers whatever batch it is drawn in."""
    rng = np.random.default_rng(view_seed(seed=seed, image_index=image_index, view_index=view_index))
    box = crop_box(rng, config=config, size=size, height=height, width=width)
    block = rng.random() < config.block_p
    steps = {name: bool(block and rng.random() < config.step_p) for name in _STEPS}
    j = config.jitter
    low = max(0.0, 1 - j)
    colour = [rng.uniform(low, 1 + j), rng.uniform(low, 1 + j), rng.uniform(low, 1 + j),
              rng.uniform(-min(j, 0.5), min(j, 0.5))]
    centre = (size / 2 - 0.5, size / 2 - 0.5)
    # The elastic step's affine part, spread as pipeline.data.augment._affine_of_elastic maps the 1.x alpha_affine.
    spread = config.alpha_affine / (math.sqrt(2.0) * max(size // 3, 1))
    shear = math.degrees(math.atan(spread))
    shift = int(round(config.alpha_affine / math.sqrt(2.0)))
    elastic = affine_matrix(translate=tuple(float(v) for v in rng.integers(-shift, shift + 1, 2)),
                            shear=tuple(-rng.uniform(-shear, shear, 2)),
                            scale=tuple(rng.uniform(1 - spread, 1 + spread, 2)),
                            rotate=0.0, centre=centre)
    zoom = rng.uniform(1 - config.scale, 1 + config.scale)
    zoom_y = zoom if config.isotropic_scale else rng.uniform(1 - config.scale, 1 + config.scale)
    ssr = affine_matrix(translate=tuple(float(int(v * size)) for v in rng.uniform(-config.shift, config.shift, 2)),
                        shear=(0.0, 0.0), scale=(zoom, zoom_y), rotate=rng.uniform(-config.rotate, config.rotate),
                        centre=centre)
    return {"crop": crop_matrix(box, size=size), "steps": steps, "colour": colour, "order": rng.permutation(4),
            "noise_std": rng.uniform(*config.noise_std) * 255.0, "elastic_affine": elastic, "ssr": ssr,
            "device_seeds": rng.integers(0, 2**62, 2)}


def draw_views(*, config: AugmentConfig, size: int, image_hw, seed: int, image_index, view_index) -> ViewDraws:
    """The choices of views ``view_index[b]`` of images ``image_index[b]`` (of ``image_hw[b]`` = (H, W))."""
    if config.jitter is None or config.rotate is None:
        raise ValueError("resolve_augment() the config first: jitter/rotate are per dataset")
    views = [draw_view(config=config, size=size, height=int(h), width=int(w), seed=seed, image_index=int(i),
                       view_index=int(k)) for (h, w), i, k in zip(image_hw, image_index, view_index)]

    def stack(key, dtype):
        return np.array([v[key] for v in views], dtype).reshape(len(views), *np.shape(views[0][key]))

    return ViewDraws(crop=stack("crop", np.float32), colour=stack("colour", np.float32),
                     steps={name: np.array([v["steps"][name] for v in views], bool) for name in _STEPS},
                     order=stack("order", np.int64), noise_std=stack("noise_std", np.float32),
                     elastic_affine=stack("elastic_affine", np.float32), ssr=stack("ssr", np.float32),
                     device_seeds=stack("device_seeds", np.int64))


# --------------------------------------------------------------------------- #
# Rendering on the device
# --------------------------------------------------------------------------- #


def _rows(flags: np.ndarray, device: torch.device) -> torch.Tensor | None:
    rows = np.flatnonzero(flags)
    return torch.as_tensor(rows, device=device) if rows.size else None


def _warp(kornia, images: torch.Tensor, masks: torch.Tensor, matrix: torch.Tensor, *, size: int,
          mask_fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, S, S] bilinear and masks [n, 1, S, S] nearest through forward maps [n, 3, 3].

    Pixels from outside are 0 and mask pixels ``mask_fill``: the mask is warped one up, so that 0 marks only
    what came from outside.
    """
    warp = kornia.geometry.transform.warp_affine
    out = warp(images, matrix[:, :2], (size, size), mode="bilinear", padding_mode="zeros", align_corners=True)
    labels = warp(masks + 1, matrix[:, :2], (size, size), mode="nearest", padding_mode="zeros", align_corners=True)
    return out, torch.where(labels == 0, float(mask_fill), labels - 1)


def _crop(image: torch.Tensor, mask: torch.Tensor, matrix: torch.Tensor, *,
          size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [3, H, W] and mask [H, W] through forward maps [n, 3, 3] into n views [n, 3, S, S], [n, 1, S, S].

    One sampling pass reads the image for all its views (the n output grids stacked as one tall grid), so the
    source is never copied per view; the border is replicated, as OpenCV's resize reads it.
    """
    height, width = image.shape[-2:]
    inverse = torch.linalg.inv(matrix)[:, :2]  # output pixel -> source pixel, [n, 2, 3]
    axis = torch.arange(size, dtype=image.dtype, device=image.device)
    pixels = torch.stack([axis.view(1, -1).expand(size, size), axis.view(-1, 1).expand(size, size),
                          torch.ones(size, size, device=image.device)], dim=-1)  # [S, S, 3] (x, y, 1)
    points = torch.einsum("nij,yxj->nyxi", inverse, pixels)  # [n, S, S, 2] source pixel coordinates
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=image.device)
    grid = (points * scale - 1).reshape(1, -1, size, 2)  # [1, n*S, S, 2], align_corners=True coordinates
    sample = torch.nn.functional.grid_sample
    views = sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    labels = sample(mask[None, None], grid, mode="nearest", padding_mode="border", align_corners=True)
    n = matrix.shape[0]
    return (views.view(3, n, size, size).transpose(0, 1), labels.view(1, n, size, size).transpose(0, 1))


def _generators(seeds: np.ndarray, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _jitter(kornia, images: torch.Tensor, *, colour: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """Brightness, contrast, saturation and hue on 0..255 images [n, 3, S, S], each view in its own order."""
    gray = kornia.color.rgb_to_grayscale
    for position in range(4):
        for op in range(4):
            rows = np.flatnonzero(order[:, position] == op)
            if rows.size == 0:
                continue
            index = torch.as_tensor(rows, device=images.device)
            x, f = images[index], colour[index, op].view(-1, 1, 1, 1)
            if op == 0:  # brightness: a factor
                x = x * f
            elif op == 1:  # contrast: towards the mean grey level of the view
                x = x * f + gray(x).mean(dim=(1, 2, 3), keepdim=True) * (1 - f)
            elif op == 2:  # saturation: towards the view's grey image
                x = x * f + gray(x) * (1 - f)
            else:  # hue: a turn of the colour circle (kornia: radians on 0..1 images)
                x = kornia.enhance.adjust_hue(x / 255.0, colour[index, 3] * (2 * math.pi)) * 255.0
            images[index] = x.clamp_(0.0, 255.0)
    return images


def _elastic_fields(seeds: np.ndarray, *, size: int, device: torch.device) -> torch.Tensor:
    """[n, 2, S, S] displacements: normalised white noise, blurred by the elastic step's Gaussian (sigma 50 px).

    The blur is the low-rank factorisation of :mod:`pipeline.data.elastic` (OpenCV's kernel and replicated
    border), as four thin matrix products.
    """
    from pipeline.data.elastic import low_rank_blur

    noise = torch.stack([torch.randn(2, size, size, generator=g, device=device)
                         for g in _generators(seeds, device)])  # [n, 2, S, S]
    noise = noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    left_v, right_v = (torch.as_tensor(m, device=device) for m in low_rank_blur(length=2 * size, sigma=ELASTIC_SIGMA))
    left_h, right_h = (torch.as_tensor(m, device=device) for m in low_rank_blur(length=size, sigma=ELASTIC_SIGMA))
    plane = noise.reshape(-1, 2 * size, size)  # the two fields stacked as one plane, as the CPU path blurs them
    blurred = left_v @ (right_v @ (plane @ right_h.T)) @ left_h.T  # [n, 2S, S]
    return blurred.reshape(-1, 2, size, size)  # alpha = 1


def _elastic(kornia, images, masks, fields, *, mask_fill: int):
    """Remap images (bilinear) and masks (nearest) by ``fields`` [n, 2, S, S]; outside pixels as in :func:`_warp`."""
    size = images.shape[-1]
    grid = torch.arange(size, dtype=images.dtype, device=images.device)
    map_x, map_y = grid.view(1, 1, -1) + fields[:, 0], grid.view(1, -1, 1) + fields[:, 1]
    remap = kornia.geometry.transform.remap
    out = remap(images, map_x, map_y, mode="bilinear", padding_mode="zeros", align_corners=True)
    labels = remap(masks + 1, map_x, map_y, mode="nearest", padding_mode="zeros", align_corners=True)
    return out, torch.where(labels == 0, float(mask_fill), labels - 1)


def augment_views(*, images: list[np.ndarray], masks: list[np.ndarray | None], source: np.ndarray,
                  draws: ViewDraws, config: AugmentConfig, size: int,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``b`` of images ``images[source[b]]`` (H x W x 3 uint8, masks H x W uint8, None: all ignore) on ``device``.

    Returns ([B, S, S, 3] uint8, [B, S, S] uint8) tensors on the device, the layout of the CPU path's views.
    """
    kornia = require_kornia()
    device = torch.device(device)
    source = np.asarray(source)
    count = len(source)
    out = torch.zeros(count, 3, size, size, device=device)
    labels = torch.zeros(count, 1, size, size, device=device)
    if count == 0:
        return out.permute(0, 2, 3, 1).to(torch.uint8), labels[:, 0].to(torch.uint8)
    crop = torch.as_tensor(draws.crop, device=device)
    for u in np.unique(source):  # the crop: each decoded image goes up once and is sampled for all its views
        rows = np.flatnonzero(source == u)
        index = torch.as_tensor(rows, device=device)
        image = torch.as_tensor(np.require(images[u], requirements="CW"), device=device).permute(2, 0, 1).float()
        mask = masks[u]
        mask = (torch.as_tensor(np.require(mask, requirements="CW"), device=device).float() if mask is not None
                else torch.full(image.shape[1:], float(IGNORE), device=device))
        out[index], labels[index] = _crop(image, mask, crop[index], size=size)
    fill = IGNORE if config.border == "ignore" else 0
    steps = draws.steps
    if (index := _rows(steps["jitter"], device)) is not None:
        out[index] = _jitter(kornia, out[index], colour=torch.as_tensor(draws.colour, device=device)[index],
                             order=draws.order[steps["jitter"]])
    if (index := _rows(steps["noise"], device)) is not None:
        chosen = np.flatnonzero(steps["noise"])
        noise = torch.stack([torch.randn(3, size, size, generator=g, device=device)
                             for g in _generators(draws.device_seeds[chosen, 0], device)])
        std = torch.as_tensor(draws.noise_std[chosen], device=device).view(-1, 1, 1, 1)
        out[index] = (out[index] + noise * std).clamp_(0.0, 255.0)
    if (index := _rows(steps["flip"], device)) is not None:
        out[index], labels[index] = out[index].flip(-1), labels[index].flip(-1)
    if (index := _rows(steps["elastic"], device)) is not None:
        chosen = np.flatnonzero(steps["elastic"])
        moved, moved_labels = _warp(kornia, out[index], labels[index],
                                    torch.as_tensor(draws.elastic_affine[chosen], device=device), size=size,
                                    mask_fill=fill)
        fields = _elastic_fields(draws.device_seeds[chosen, 1], size=size, device=device)
        out[index], labels[index] = _elastic(kornia, moved, moved_labels, fields, mask_fill=fill)
    if (index := _rows(steps["ssr"], device)) is not None:
        out[index], labels[index] = _warp(kornia, out[index], labels[index],
                                          torch.as_tensor(draws.ssr[steps["ssr"]], device=device), size=size,
                                          mask_fill=fill)
    images_out = out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [B, S, S, 3]
    return images_out, labels[:, 0].to(torch.uint8)


def augment_batch(*, images: list[np.ndarray], masks: list[np.ndarray | None], source, config: AugmentConfig,
                  size: int, seed: int, image_index, view_index,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw and render views: view ``b`` is view ``view_index[b]`` of image ``image_index[b]``, decoded as
    ``images[source[b]]``. The device counterpart of calling :func:`~pipeline.data.augment.augment_view` per view."""
    source = np.asarray(source, np.int64)
    hw = [images[u].shape[:2] for u in source]
    draws = draw_views(config=config, size=size, image_hw=hw, seed=seed, image_index=image_index,
                       view_index=view_index) if len(source) else None
    return augment_views(images=images, masks=masks, source=source, draws=draws, config=config, size=size,
                         device=device)
