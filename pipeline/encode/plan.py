"""Planning an extraction: every view of a split decided before any pixel is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.augment import resolve_augment
from pipeline.encode.config import ExtractConfig
from pipeline.data.views import ViewParams, pad_fill, window_boxes
from pipeline.encode.registry import get_spec, resolve_normalization
from pipeline.errors import UserError
from pipeline.store.splits import SplitPlan


# Readers whose evaluation images come from a protocol's standard episode lists.
_EPISODE_PROTOCOLS = {"coco": "coco20i", "coco2014": "coco20i", "voc": "pascal5i", "pascal": "pascal5i"}


def open_extraction_dataset(config: ExtractConfig):
    """The reader an extraction runs over; with ``episodes``, only the images the standard episodes score
    (COCO-20i: the first 1000 episodes of each fold use 730-894 of the 40,504 val images)."""
    from pipeline.data.protocols import load_episodes, protocol_entry
    from pipeline.data.registry import create_dataset

    dataset = create_dataset(config.dataset, root=config.data_root, split=config.split,
                             skip_bad=config.skip_bad, **config.dataset_options)
    if not config.episodes:
        return dataset
    protocol = _EPISODE_PROTOCOLS.get(config.dataset or "")
    if protocol is None:
        raise UserError(f"`episodes` knows the episode lists of {', '.join(sorted(_EPISODE_PROTOCOLS))}, "
                        f"not of reader {config.dataset!r}")
    folds = config.episode_folds or list(range(protocol_entry(protocol).folds))
    wanted = {e.image_id for fold in folds
              for e in load_episodes(protocol=protocol, fold=fold, splits_dir=Path(config.episodes))}
    missing = sorted(wanted - set(dataset.ids))
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {protocol} episodes in {config.episodes} are not in "
                        f"{dataset.root} {dataset.split} (first: {missing[0]})")
    dataset.ids = [i for i in dataset.ids if i in wanted]
    dataset.lists.append(f"{Path(config.episodes).resolve()} {protocol} folds {folds}")
    return dataset


# --------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------- #


def _default_shard_size(*, tokens: int, dim: int, views_per_image: int, num_views: int, mib: int = 16) -> int:
    """About ``mib`` MiB of fp16 features per shard, a multiple of the views per image."""
    per_view = max(tokens * dim * 2, 1)
    size = max(1, (mib << 20) // per_view)
    size = max(views_per_image, size - size % views_per_image)
    return max(1, min(size, num_views))


def _view_rows(*, dataset, config: ExtractConfig, input_size: int,
               stride: int) -> tuple[np.ndarray, list[tuple[int, ViewParams]], list[list[str]]]:
    """Image sizes from headers, and one (image index, view) row per view in image order."""
    from pipeline.data.readers import BadRecordError

    kind = config.kind
    image_hw = np.zeros((len(dataset), 2), np.int32)
    rows: list[tuple[int, ViewParams]] = []
    skipped: list[list[str]] = []
    for index in range(len(dataset)):
        try:
            height, width = dataset.image_size(index)
        except BadRecordError as err:
            if not config.skip_bad:
                raise
            skipped.append([dataset.ids[index], str(err)])
            continue
        image_hw[index] = (height, width)
        if kind == "views":
            rows.extend((index, ViewParams(box=(0, 0, width, height))) for _ in range(config.views))
        elif kind == "windows":
            rows.extend((index, ViewParams(box=box)) for box in window_boxes(
                height=height, width=width, size=input_size, stride=stride, last=config.last_window))
        else:
            rows.append((index, ViewParams(box=(0, 0, width, height))))
    return image_hw, rows, skipped


def plan_split(*, dataset, config: ExtractConfig, input_size: int, tokens: int, dim: int) -> SplitPlan:
    """Every view of the split, decided before decoding.

    Training views are rendered from the whole image by the seeded augmentation
    (:mod:`pipeline.data.augment`): their plan row is the image's full box, and the
    resolved augmentation config goes into the split's signature, so a resume or an
    append with another augmentation is refused.
    """
    kind = config.kind
    stride = config.stride or max(1, (2 * input_size) // 3)
    image_hw, rows, skipped = _view_rows(dataset=dataset, config=config, input_size=input_size, stride=stride)
    if not rows:
        raise UserError(f"{dataset.name} {dataset.split}: no readable images to extract")
    if config.layout not in ("image", "shuffled"):
        raise UserError(f"`layout` must be image or shuffled, not '{config.layout}'")
    n = len(rows)
    shuffled = config.layout == "shuffled" and kind == "views"
    order = np.random.default_rng([config.seed, 0x5EED]).permutation(n) if shuffled else np.arange(n)
    rows = [rows[i] for i in order]
    per_image = config.views if kind == "views" and not shuffled else 1
    shard = config.shard_size or _default_shard_size(tokens=tokens, dim=dim, views_per_image=per_image,
                                                      num_views=n, mib=128 if shuffled else 16)
    augment = resolve_augment(config.augment, class_names=dataset.class_names) if kind == "views" else None
    if augment is not None and augment.backend == "gpu":
        from pipeline.data.augment_gpu import require_kornia

        require_kornia()  # before any pixel: the switch without its extra is a one-line error
    described = dataset.describe()
    # Part of the signature a resumed run must match: the same folder, however its path is spelled.
    described["root"] = str(Path(described["root"]).resolve())
    described["lists"] = [str(Path(p).resolve()) for p in described["lists"]]
    meta = {"seed": config.seed, "views": config.views if kind == "views" else None,
            "stride": stride if kind == "windows" else None, "input_size": input_size,
            "last_window": config.last_window if kind == "windows" else None,
            "augment": augment.to_dict() if augment is not None else None,
            "normalize": resolve_normalization(config.normalize, dataset=config.dataset,
                                               spec=get_spec(config.backbone)),
            "dataset": described, "plan_skipped": skipped}
    if kind == "windows":  # stores planned before the choice existed were padded black and say nothing
        pad_fill(fill=config.window_fill, mean=meta["normalize"]["mean"], std=meta["normalize"]["std"])  # checked
        meta["window_fill"] = config.window_fill
    if shuffled:  # only then, so that stores planned before the option existed keep their signature
        meta["layout"] = "shuffled"
    return SplitPlan(
        dataset=dataset.name, split=dataset.split, kind=kind, image_ids=list(dataset.ids), image_hw=image_hw,
        view_image=np.array([r[0] for r in rows], np.int32),
        view_box=np.array([r[1].box for r in rows], np.int32).reshape(n, 4),
        view_flip=np.array([r[1].flip for r in rows], bool),
        view_jitter=np.array([r[1].jitter for r in rows], np.float32).reshape(n, 4),
        class_names=list(dataset.class_names), shard_size=shard, meta=meta,
        view_order=order.astype(np.int32) if shuffled else None,
    )
