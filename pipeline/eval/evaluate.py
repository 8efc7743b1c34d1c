"""Evaluation by the paper's protocol, from cached evaluation windows.

Episodes are (image, novel class) pairs: from the standard lists when a
splits folder is given, else derived from the cached masks (a novel class
covering at least 2 x 32 x 32 pixels of the image, the OSLSM/PFENet rule).
For each episode the model sees the image's cached windows with W = {class};
window logits are stitched back at the original resolution (averaged where
windows overlap) and thresholded with the class-wise sigmoid rule. Scores
accumulate HSNet-style: intersections and unions summed per class over all
episodes, then IoU per class, mIoU over the fold's novel classes, and FB-IoU
from pooled foreground and background.

Mosaic-4 (``mode="multiclass"``) gives each image its |W| = 4 class names at
once and takes the argmax against the constant background channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.data.labels import IGNORE
from pipeline.data.protocols import SMALL_OBJECT_PIXELS, resolve_fold
from pipeline.data.views import stitch
from pipeline.encode.text import class_embeddings
from pipeline.errors import UserError
from pipeline.eval.metrics import SegmentationMeter
from pipeline.runtime import progress
from pipeline.store.reader import CachedSplit, open_split


@dataclass
class ImageViews:
    views: np.ndarray  # view indices of one image
    height: int
    width: int


def image_views(split: CachedSplit) -> dict[int, ImageViews]:
    groups: dict[int, list[int]] = {}
    for view, image in enumerate(split.view_image):
        if split.view_valid[view]:
            groups.setdefault(int(image), []).append(view)
    return {i: ImageViews(views=np.asarray(v), height=int(split.image_hw[i][0]), width=int(split.image_hw[i][1]))
            for i, v in groups.items()}


def ground_truth(split: CachedSplit, image: ImageViews, masks: np.ndarray | None = None) -> np.ndarray:
    """The label mask an image is scored on: stitched windows (original size) or the resized view."""
    views = image.views
    data = masks[views] if masks is not None else split.masks(views)  # [V, S, S]
    if split.kind == "resize":
        return data[0]
    stitched = stitch(torch.from_numpy(data[:, None].astype(np.float32)), boxes=split.view_box[views],
                      flips=split.view_flip[views], height=image.height, width=image.width, mode="nearest")
    return stitched[0].round().to(torch.uint8).numpy()


def derive_cached_episodes(*, split: CachedSplit, novel: tuple[int, ...], images: dict[int, ImageViews],
                           masks: np.ndarray, min_pixels: int = SMALL_OBJECT_PIXELS) -> list[tuple[int, int]]:
    """(image index, class) pairs for novel classes covering at least ``min_pixels``."""
    episodes = []
    for index in sorted(images):
        gt = ground_truth(split, images[index], masks)
        # Resized views are scored at view size: scale the pixel rule from the original image.
        scale = gt.size / (images[index].height * images[index].width) if split.kind == "resize" else 1.0
        values, counts = np.unique(gt, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            if value in novel and count >= min_pixels * scale:
                episodes.append((index, int(value)))
    return episodes


def listed_episodes(*, split: CachedSplit, protocol: str, fold: int, splits_dir: str,
                    limit: int | None) -> list[tuple[int, int]]:
    from pipeline.data.protocols import load_episodes

    episodes = load_episodes(protocol=protocol, fold=fold, splits_dir=Path(splits_dir), limit=limit)
    index = {image_id: i for i, image_id in enumerate(split.image_ids)}
    missing = [e.image_id for e in episodes if e.image_id not in index]
    if missing:
        raise UserError(f"{len(missing)} episode image(s) are not in {split.path} {split.split} "
                        f"(first: {missing[0]}); extract the split the list was made for")
    return [(index[e.image_id], e.class_value) for e in episodes]


def _fold_for_eval(*, protocol: str, fold: int, class_names: list[str], novel_names: list[str]):
    from pipeline.data.protocols import create_protocol, protocol_entry

    if protocol_entry(protocol).train_protocol:
        # Trained on another protocol's data (coco2voc: COCO-20i), scored on this one's classes.
        proto = create_protocol(protocol)
        if list(proto.class_names) != list(class_names):
            raise UserError(f"{protocol} evaluates on its own class list ({len(proto.class_names)} classes): "
                            f"pass the matching evaluation split of the cache")
        return proto.fold(fold)
    return resolve_fold(protocol=protocol, fold=fold, novel=list(novel_names), class_names=class_names)


def _check_widths(model, *, vision: int, text: int, stores: tuple) -> None:
    """A model scores only features as wide as those it was trained on."""
    config = getattr(model, "config", None)
    if config is not None and (config.vision_dim, config.text_dim) != (vision, text):
        raise UserError(f"the model takes {config.vision_dim}-d vision and {config.text_dim}-d text features; "
                        f"{stores[0]} and {stores[1]} hold {vision}-d and {text}-d: evaluate on stores of the "
                        f"encoders it was trained with")


@torch.inference_mode()
def evaluate_split(*, model, vision_cache: str, text_cache: str, split: str, protocol: str, fold: int,
                   novel_names: list[str] = (), splits_dir: str | None = None, device="cpu",
                   mode: str = "binary", limit: int | None = None, quiet: bool = False,
                   min_pixels: int = SMALL_OBJECT_PIXELS, on_episode: Callable | None = None) -> dict:
    """Score ``model`` on the novel classes of a protocol fold; returns metrics and counts.

    ``on_episode(image=, class_value=, logits=, target=)``, when given, sees each binary episode's
    stitched logits [H, W] and its target [H, W] (0, 1, ignore): threshold-free measures and
    controls are computed from exactly what was scored.
    """
    if limit is not None and limit < 1:
        raise UserError(f"`limit` must be at least 1 episode, got {limit}")
    cached = open_split(store=vision_cache, split=split)
    # Multi-class (Mosaic-4) scores every class present in the masks, so it needs no
    # fold; resolving one would refuse the mosaic's own class list (or need its root).
    fold_ = None if mode == "multiclass" else _fold_for_eval(
        protocol=protocol, fold=fold, class_names=cached.class_names, novel_names=list(novel_names))
    names = cached.class_names
    text = torch.from_numpy(class_embeddings(text_store=text_cache, names=names))  # [K, Dt]
    _check_widths(model, vision=int(cached.group["features"].shape[2]), text=int(text.shape[1]),
                  stores=(vision_cache, text_cache))
    images = image_views(cached)
    masks = cached.masks(slice(None))
    features = cached.features(slice(None))
    device = torch.device(device)
    model = model.to(device).eval()
    if mode == "multiclass":
        return _evaluate_multiclass(model=model, cached=cached, images=images, masks=masks, features=features,
                                    text=text, device=device, quiet=quiet)
    if splits_dir:
        episodes = listed_episodes(split=cached, protocol=protocol, fold=fold, splits_dir=splits_dir, limit=limit)
        source = f"lists in {splits_dir}"
    else:
        episodes = derive_cached_episodes(split=cached, novel=tuple(fold_.novel), images=images, masks=masks,
                                          min_pixels=min_pixels)
        episodes = episodes[:limit] if limit else episodes
        source = f"derived from masks (novel class >= {min_pixels} px)"
    if not episodes:
        hint = ("the episode lists in `splits_dir` name no image of this split" if splits_dir else
                f"no novel class covers `min_pixels` {min_pixels} px in any image: lower `min_pixels`, or give "
                f"the standard lists with `splits_dir`")
        raise UserError(f"{vision_cache} {split}: no evaluation episode for fold {fold}'s novel classes ({hint})")
    meter = SegmentationMeter(list(fold_.novel))
    truth_cache: dict[int, np.ndarray] = {}
    bar = progress(total=len(episodes), desc="eval", quiet=quiet, unit="episode")
    for image, value in episodes:
        if image not in images:
            raise UserError(f"episode image {cached.image_ids[image]} has no valid cached view")
        views = images[image]
        if image not in truth_cache:
            truth_cache = {image: ground_truth(cached, views, masks)}
        gt = truth_cache[image]
        logits = model(torch.from_numpy(features[views.views]).to(device), text[value - 1][None].to(device),
                       grid=cached.grid)  # [V, 1, S, S]
        if cached.kind == "resize":
            full = logits[0]
        else:
            full = stitch(logits, boxes=cached.view_box[views.views], flips=cached.view_flip[views.views],
                          height=views.height, width=views.width)  # [1, H, W]
        pred = torch.sigmoid(full[0]) > model.config.threshold
        target = np.where(gt == IGNORE, IGNORE, (gt == value).astype(np.uint8)).astype(np.uint8)
        meter.update(pred=pred.cpu(), target=torch.from_numpy(target), class_id=value)
        if on_episode is not None:
            on_episode(image=image, class_value=value, logits=full[0].cpu(), target=target)
        bar.update(1)
    bar.close()
    return _result(meter=meter, names=names, novel=fold_.novel, source=source, cached=cached)


def _evaluate_multiclass(*, model, cached, images, masks, features, text, device, quiet) -> dict:
    truths = {index: ground_truth(cached, images[index], masks) for index in sorted(images)}
    present = {i: [int(v) for v in np.unique(gt) if 0 < v < IGNORE] for i, gt in truths.items()}
    classes = sorted({c for values in present.values() for c in values})
    if not classes:
        raise UserError(f"{cached.path} {cached.split}: no labelled class in any image")
    meter = SegmentationMeter(classes)
    bar = progress(total=len(images), desc="eval", quiet=quiet, unit="image")
    for index, gt in truths.items():
        bar.update(1)
        if not present[index]:
            continue
        views, names = images[index], present[index]
        logits = model(torch.from_numpy(features[views.views]).to(device), text[np.asarray(names) - 1].to(device),
                       grid=cached.grid)  # [V, |W|, S, S]
        full = logits[0] if cached.kind == "resize" else stitch(
            logits, boxes=cached.view_box[views.views], flips=cached.view_flip[views.views],
            height=views.height, width=views.width)  # [|W|, H, W]
        labels, _ = model.predict_masks(full[None])  # [1, H, W]: 0 bg, j+1 = names[j]
        local = np.zeros(256, np.uint8)  # class value -> label in W (1-based), IGNORE kept
        local[IGNORE] = IGNORE
        local[np.asarray(names)] = np.arange(1, len(names) + 1)
        meter.update_multiclass(pred_labels=labels[0].cpu(), target_labels=torch.from_numpy(local[gt]),
                                class_ids_of_labels=names)
    bar.close()
    return _result(meter=meter, names=cached.class_names, novel=tuple(classes),
                   source="|W| = the classes of each image", cached=cached)


def _result(*, meter: SegmentationMeter, names: list[str], novel, source: str, cached: CachedSplit) -> dict:
    per_class = meter.iou_per_class()
    counts = meter.episodes_per_class()
    return {
        "miou": meter.miou(),
        "fb_iou": meter.fb_iou(),
        "episodes": meter.episodes,
        # A class no episode scored has no IoU (None, shown as n/a), never 0.0.
        "per_class": {names[c - 1]: 100.0 * per_class[c] if counts.get(c) else None for c in novel if c in per_class},
        "episodes_per_class": {names[c - 1]: n for c, n in meter.episodes_per_class().items() if c in novel},
        "episode_source": source,
        "pretrained_features": cached.pretrained,
        "meter": meter.state_dict(),
    }
