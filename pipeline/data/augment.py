"""The released recipe's training augmentation, rendered by albumentations, reproducible per view.

One view of an image is a function of ``(seed, image index, view index)``: the
albumentations pipeline is re-seeded from those three numbers before every
call (one generator that its transforms draw from in turn, so each step's
draw is its own: ``independent_draws``), so a resumed extraction (or an online
epoch replayed after a resume) renders the very same pixels, whatever ran
before it and in whatever thread. :mod:`pipeline.data.augment_gpu` renders the
same recipe batched on a torch device (``backend="gpu"``).

The recipe, as released (strengths per dataset: PASCAL jitter 0.5 / rotation
20 degrees, COCO 0.2 / 10):

1. a crop, one of two with probability 1/2 each: a random resized crop to S x S
   (area scale 0.5-1), or the shortest side resized to S and a random S x S crop;
2. one block applied with probability 0.5, each step inside it with
   probability 0.5: colour jitter, Gaussian noise, horizontal flip, an elastic
   deformation with an affine part, shift-scale-rotate.

Geometry moves image and mask together (bilinear image, nearest-neighbour
mask, so the ignore value survives). Pixels brought in from outside the image
are 0 in the image and background (0) in the mask, as released, or the ignore
value with ``border="ignore"``. Where albumentations 2.x renamed or removed an
argument of the release's 1.x version, the mapping is spelled out in
``docs/training.md`` and in :func:`build_pipeline`.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from pipeline.data.labels import COCO_CLASSES, IGNORE

# (colour-jitter strength, shift-scale-rotate degrees) of the released recipe, per protocol.
RECIPE_STRENGTHS = {"pascal5i": (0.5, 20.0), "coco20i": (0.2, 10.0)}
# albumentations 1.x GaussNoise default var_limit=(10, 50) on 0..255 pixels -> a standard deviation range
# relative to 255, the unit of 2.x's std_range.
RELEASED_NOISE_STD = (math.sqrt(10.0) / 255.0, math.sqrt(50.0) / 255.0)
RELEASED_ALPHA_AFFINE = 20.0  # pixels, the 1.x ElasticTransform argument the release set
ELASTIC_BLURS = ("low-rank", "opencv")
AUGMENT_BACKENDS = ("cpu", "gpu")
ELASTIC_SIGMA = 50.0  # px, the 1.x ElasticTransform default the release kept (alpha 1)


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation of an extraction (recorded in the store) or of an online run.

    ``jitter`` and ``rotate`` left at None take the dataset's released strengths
    (:func:`resolve_augment`).
    """

    jitter: float | None = None  # brightness = contrast = saturation = hue strength
    rotate: float | None = None  # shift-scale-rotate rotation limit, degrees
    shift: float = 0.1
    scale: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    noise_std: tuple[float, float] = RELEASED_NOISE_STD
    alpha_affine: float = RELEASED_ALPHA_AFFINE
    block_p: float = 0.5  # probability of the whole photometric + geometric block
    step_p: float = 0.5  # probability of each step inside the block
    border: Literal["background", "ignore"] = "background"
    # Released ShiftScaleRotate scales x and y by one factor; False draws them independently (the aspect
    # changes), as stores extracted before this field existed were rendered.
    isotropic_scale: bool = True
    # How the elastic step blurs its noise: "low-rank" (pipeline.data.elastic: the same draws, a tenth of the
    # time) or "opencv" (albumentations' own 401-tap blur). The two agree to about 1e-5 of the field, so a view
    # differs by one grey level at about one pixel in twenty views. None, as in splits planned before this field
    # existed, means "opencv"; resolve_augment fills "low-rank" in for new plans.
    elastic_blur: Literal["low-rank", "opencv"] | None = None
    # How a view's seed reaches the transforms: True, one generator shared by all of them in turn, so the crop
    # choice, the block and each step draw independently, as released. None, as in splits planned before this
    # field existed: every transform re-seeded with the same number (albumentations' ``set_random_seed``), so
    # their first draws coincide and the five steps fire all together or not at all. resolve_augment fills True.
    independent_draws: bool | None = None
    # Where the views are rendered: "cpu" (albumentations, in the render thread or processes) or "gpu" (kornia,
    # batched on the encoder's device: pipeline.data.augment_gpu). Not recorded when "cpu", so stores planned
    # before this field existed keep their signature.
    backend: Literal["cpu", "gpu"] = "cpu"

    def __post_init__(self) -> None:  # lists from JSON / YAML back to tuples, so configs hash and compare
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "noise_std", tuple(float(v) for v in self.noise_std))
        from pipeline.errors import UserError

        if self.border not in ("background", "ignore"):
            raise UserError(f"augment border must be 'background' or 'ignore', not {self.border!r}")
        if self.elastic_blur not in (None, *ELASTIC_BLURS):
            raise UserError(f"augment elastic_blur must be one of {', '.join(ELASTIC_BLURS)}, not {self.elastic_blur!r}")
        if self.backend not in AUGMENT_BACKENDS:
            raise UserError(f"augment backend must be one of {', '.join(AUGMENT_BACKENDS)}, not {self.backend!r}")

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if out["backend"] == "cpu":
            del out["backend"]
        return out


def recipe_protocol(class_names) -> str:
    """The protocol whose released strengths a dataset gets: COCO's class list -> coco20i, else pascal5i."""
    return "coco20i" if tuple(class_names) == COCO_CLASSES else "pascal5i"


def resolve_augment(config: AugmentConfig, *, class_names) -> AugmentConfig:
    """``config`` with the dataset's strengths filled in where it left them open, the fast elastic blur and
    independent draws."""
    jitter, rotate = RECIPE_STRENGTHS[recipe_protocol(class_names)]
    return AugmentConfig(**{**asdict(config), "jitter": jitter if config.jitter is None else config.jitter,
                            "rotate": rotate if config.rotate is None else config.rotate,
                            "elastic_blur": config.elastic_blur or "low-rank",
                            "independent_draws": True if config.independent_draws is None
                            else config.independent_draws})


def _affine_of_elastic(config: AugmentConfig, size: int):
    """The 1.x ``alpha_affine`` step as a 2.x ``Affine`` with the same spread.

    1.x moved three control points (at +-size//3 around the centre) by uniform
    offsets of up to ``alpha_affine`` pixels and warped by the affine map through
    them. Its linear part is then I + D, each entry of D spread like a difference
    of two such offsets over 2 * size//3 (standard deviation a*sqrt(2/3)/(2s)),
    and its shift (at the centre) like a mean of two offsets (a/sqrt(6)). Uniform
    draws of x/y scale, x/y shear and x/y translation with those standard
    deviations have half-ranges a/(sqrt(2)s), atan of it in degrees, and a/sqrt(2) px.
    """
    import albumentations as A
    import cv2

    a, s = config.alpha_affine, max(size // 3, 1)
    spread = a / (math.sqrt(2.0) * s)
    shear = math.degrees(math.atan(spread))
    shift = int(round(a / math.sqrt(2.0)))
    return A.Affine(scale={"x": (1 - spread, 1 + spread), "y": (1 - spread, 1 + spread)},
                    shear={"x": (-shear, shear), "y": (-shear, shear)},
                    translate_px={"x": (-shift, shift), "y": (-shift, shift)},
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=_mask_fill(config), p=1.0)


def _mask_fill(config: AugmentConfig) -> int:
    return IGNORE if config.border == "ignore" else 0


def build_pipeline(config: AugmentConfig, size: int):
    """The albumentations ``Compose`` of the released recipe at ``size`` px (``config`` resolved)."""
    import albumentations as A
    import cv2

    from pipeline.data.elastic import ElasticTransform, prepare_blur

    elastic = ElasticTransform if config.elastic_blur == "low-rank" else A.ElasticTransform
    if config.elastic_blur == "low-rank":
        prepare_blur(height=size, width=size, sigma=ELASTIC_SIGMA)  # the field is drawn on the S x S crop
    if config.jitter is None or config.rotate is None:
        raise ValueError("resolve_augment() the config first: jitter/rotate are per dataset")
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": _mask_fill(config)}
    j, p = config.jitter, config.step_p
    crop = A.OneOf([
        A.RandomResizedCrop(size=(size, size), scale=config.crop_scale, p=1.0),
        A.Sequential([A.SmallestMaxSize(max_size=size, p=1.0), A.RandomCrop(size, size, p=1.0)], p=1.0),
    ], p=1.0)
    block = A.Sequential([
        A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j, 0.5), p=p),
        A.GaussNoise(std_range=config.noise_std, p=p),
        A.HorizontalFlip(p=p),
        # 1.x ElasticTransform(alpha_affine=...) = an affine warp, then the elastic field, as one step.
        A.Sequential([_affine_of_elastic(config, size), elastic(alpha=1, sigma=ELASTIC_SIGMA, p=1.0, **border)],
                     p=p),
        shift_scale_rotate(config, p=p),
    ], p=config.block_p)
    return A.Compose([crop, block], seed=0)


def shift_scale_rotate(config: AugmentConfig, *, p: float):
    """1.x ``ShiftScaleRotate(shift_limit, scale_limit, rotate_limit)`` as the 2.x ``Affine`` with these ranges.

    1.x draws one scale factor for both axes; 2.x ``Affine`` draws x and y apart unless
    ``keep_ratio`` is set, which ``isotropic_scale`` does.
    """
    import albumentations as A
    import cv2

    return A.Affine(translate_percent=(-config.shift, config.shift), scale=(1 - config.scale, 1 + config.scale),
                    rotate=(-config.rotate, config.rotate), keep_ratio=config.isotropic_scale, p=p,
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=_mask_fill(config))


_LOCAL = threading.local()  # one Compose per thread and (config, size): a Compose holds its random state


def _pipeline(config: AugmentConfig, size: int):
    cache = _LOCAL.__dict__.setdefault("pipelines", {})
    key = (config, size)
    if key not in cache:
        cache[key] = build_pipeline(config, size)
    return cache[key]


def view_seed(*, seed: int, image_index: int, view_index: int) -> int:
    """A 32-bit seed from (seed, image, view): independent streams for every view."""
    return int(np.random.SeedSequence([seed, image_index, view_index]).generate_state(1)[0])


def augment_view(*, image: np.ndarray, mask: np.ndarray, config: AugmentConfig, size: int, seed: int,
                 image_index: int, view_index: int) -> tuple[np.ndarray, np.ndarray]:
    """View ``view_index`` of an image: [S, S, 3] uint8 and its transformed [S, S] uint8 mask."""
    pipeline = _pipeline(config, size)
    number = view_seed(seed=seed, image_index=image_index, view_index=view_index)
    if config.independent_draws:  # one stream, drawn from in turn by every transform
        pipeline.set_random_state(np.random.default_rng(number), random.Random(number))
    else:  # as splits planned before independent_draws were rendered
        pipeline.set_random_seed(number)
    out = pipeline(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask))
    return np.ascontiguousarray(out["image"], dtype=np.uint8), np.ascontiguousarray(out["mask"], dtype=np.uint8)


def view_numbers(view_image: np.ndarray, *, order: np.ndarray | None = None) -> np.ndarray:
    """Each planned row's position among its image's views (0..K-1), the ``k`` of its seed (seed, i, k).

    The plan groups an image's views side by side; a shuffled layout stores row ``order[p]`` of that
    plan at position ``p`` (``view_order``), so the numbers are taken in plan order and then shuffled
    the same way. Without this, views of one image scattered over a shuffled store would share a seed.
    """
    view_image = np.asarray(view_image)
    if view_image.size == 0:
        return np.zeros(0, np.int64)
    if order is not None:
        order = np.asarray(order)
        planned = np.empty_like(view_image)
        planned[order] = view_image  # back to plan order: views of an image side by side
        return view_numbers(planned)[order]
    starts = np.flatnonzero(np.r_[True, view_image[1:] != view_image[:-1]])
    lengths = np.diff(np.r_[starts, view_image.size])
    return np.arange(view_image.size) - np.repeat(starts, lengths)
