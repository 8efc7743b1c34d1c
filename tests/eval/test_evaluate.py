"""Evaluation from cached windows: stitching, ground truth at the original size, episodes, HSNet sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_data import FOLD0, INPUT, NOVEL, SEEN

from pipeline.data.protocols import Fold, create_protocol, derive_episodes
from pipeline.data.registry import create_dataset
from pipeline.data.views import stitch
from pipeline.errors import UserError
from pipeline.eval.evaluate import (
    derive_cached_episodes,
    evaluate_split,
    ground_truth,
    image_views,
)
from pipeline.eval.metrics import SegmentationMeter
from pipeline.model import build_model
from pipeline.store.reader import open_split
from pipeline.training.checkpoints import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEEN_NAMES = ["bus", "cat", "dog", "person"]  # SEEN, by name, for protocol "custom"
MIN_PIXELS = 300  # the images are small; the 2 x 32 x 32 rule would leave few episodes


# --------------------------------------------------------------------------- #
# Stitching
# --------------------------------------------------------------------------- #


def _constant(value: float, size: int = 4) -> torch.Tensor:
    return torch.full((1, size, size), float(value))


def test_stitch_averages_where_windows_overlap():
    values = torch.stack([_constant(1), _constant(3)])  # [2, 1, 4, 4]
    out = stitch(values, boxes=np.array([[0, 0, 4, 4], [2, 0, 6, 4]]), flips=np.zeros(2, bool), height=4, width=6)
    assert out.shape == (1, 4, 6)
    assert torch.equal(out[0, 0], torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    assert torch.equal(out[0], out[0, :1].expand(4, 6))


def test_stitch_undoes_the_flip_of_a_view():
    ramp = torch.arange(4.0).expand(4, 4)[None, None]  # [1, 1, 4, 4], value = view column
    out = stitch(ramp, boxes=np.array([[0, 0, 4, 4]]), flips=np.array([True]), height=4, width=4)
    assert torch.equal(out[0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))  # view column x shows image column 3 - x
    same = stitch(ramp, boxes=np.array([[0, 0, 4, 4]]), flips=np.array([False]), height=4, width=4)
    assert torch.equal(same[0], ramp[0, 0])


def test_stitch_clips_a_box_beyond_the_image_and_resizes_other_sizes():
    view = torch.arange(16.0).view(1, 1, 4, 4)
    out = stitch(view, boxes=np.array([[0, 0, 4, 4]]), flips=np.zeros(1, bool), height=3, width=2)
    assert torch.equal(out[0], view[0, 0, :3, :2])
    shifted = stitch(view, boxes=np.array([[-1, -2, 3, 2]]), flips=np.zeros(1, bool), height=3, width=5)
    assert torch.equal(shifted[0, :2, :3], view[0, 0, 2:, 1:])
    assert (shifted[0, 2:] == 0).all() and (shifted[0, :, 3:] == 0).all()  # no window there
    big = stitch(view, boxes=np.array([[0, 0, 8, 8]]), flips=np.zeros(1, bool), height=8, width=8, mode="nearest")
    assert torch.equal(big[0], view[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))


# --------------------------------------------------------------------------- #
# Ground truth and episodes
# --------------------------------------------------------------------------- #


def test_ground_truth_from_windows_is_the_original_mask(gen):
    split = open_split(store=gen.vision, split="folder/val")
    dataset = create_dataset("folder", root=gen.data, split="val")
    images = image_views(split)
    boxes = split.view_box
    assert split.kind == "windows" and len(images) == len(dataset)
    # The check covers overlap in both directions and a window reaching past a short image.
    assert any(len({tuple(boxes[v][[0, 2]]) for v in im.views}) > 1 and len({tuple(boxes[v][[1, 3]])
               for v in im.views}) > 1 for im in images.values())
    assert any((boxes[im.views][:, 3] > im.height).any() for im in images.values())
    for index, image in images.items():
        mask = dataset.read_mask(index)
        assert (image.height, image.width) == mask.shape
        assert np.array_equal(ground_truth(split, image), mask), dataset.ids[index]


def test_ground_truth_of_a_resized_split_is_the_resized_mask(gen):
    split = open_split(store=gen.vision, split="folder/test")
    masks = split.masks(slice(None))
    assert split.kind == "resize" and split.num_views == len(split.image_ids)
    for index, image in image_views(split).items():
        assert np.array_equal(ground_truth(split, image), masks[image.views[0]])
        assert ground_truth(split, image).shape == (INPUT, INPUT)


def _derived(gen, fold: Fold) -> list[tuple[int, int]]:
    split = open_split(store=gen.vision, split="folder/val")
    return derive_cached_episodes(split=split, novel=fold.novel, images=image_views(split),
                                  masks=split.masks(slice(None)), min_pixels=MIN_PIXELS)


def test_episodes_from_cached_windows_follow_the_dataset_rule(gen):
    split = open_split(store=gen.vision, split="folder/val")
    dataset = create_dataset("folder", root=gen.data, split="val")
    cached = _derived(gen, FOLD0)
    from_masks = derive_episodes(dataset=dataset, fold=FOLD0, min_pixels=MIN_PIXELS)
    assert cached == [(split.image_ids.index(e.image_id), e.class_value) for e in from_masks]
    assert {c for _, c in cached} == set(NOVEL)  # both drawn novel classes, nothing else


# --------------------------------------------------------------------------- #
# Scores
# --------------------------------------------------------------------------- #


def _untrained(gen):
    from pipeline.training.config import build_config

    config = build_config(preset="tiny")
    config.model.vision_dim, config.model.text_dim, config.model.decoder.out_size = 32, 384, INPUT
    torch.manual_seed(0)
    return build_model(config.model)


def _everywhere_baseline(gen, split_name: str, classes: tuple[int, ...]) -> float:
    """mIoU of predicting every pixel as the class, on the episodes the evaluation scores."""
    split = open_split(store=gen.vision, split=split_name)
    images, masks = image_views(split), split.masks(slice(None))
    meter = SegmentationMeter(list(classes))
    for image, value in derive_cached_episodes(split=split, novel=classes, images=images, masks=masks,
                                               min_pixels=MIN_PIXELS):
        gt = ground_truth(split, images[image], masks)
        target = np.where(gt == 255, 255, gt == value).astype(np.uint8)
        meter.update(pred=torch.ones(gt.shape, dtype=torch.bool), target=torch.from_numpy(target), class_id=value)
    return meter.miou()


@pytest.mark.parametrize("split_name", ["folder/val", "folder/test"])
def test_trained_model_scores_its_classes_well_above_a_blind_guess(gen, learned, split_name):
    """Scored as if the seen classes were novel: wrong stitching (offsets, flips) would sink this."""
    model, _ = load_model(learned)
    result = evaluate_split(model=model, vision_cache=str(gen.vision), text_cache=str(gen.text), split=split_name,
                            protocol="custom", fold=0, novel_names=SEEN_NAMES, min_pixels=MIN_PIXELS, quiet=True)
    baseline = _everywhere_baseline(gen, split_name, SEEN)
    assert result["miou"] > baseline + 10, (result["miou"], baseline)
    assert set(result["per_class"]) == set(SEEN_NAMES)


def test_scores_are_hsnet_sums_over_the_folds_classes(gen):
    result = evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                            split="folder/val", protocol="pascal5i", fold=0, min_pixels=MIN_PIXELS, quiet=True)
    episodes = _derived(gen, FOLD0)
    assert result["episodes"] == len(episodes) and result["episode_source"].startswith("derived from masks")
    meter = SegmentationMeter.from_state_dict(result["meter"])
    assert meter.class_ids == list(FOLD0.novel)
    # Foreground union covers at least the labelled pixels of each class's episodes; intersection at most.
    split = open_split(store=gen.vision, split="folder/val")
    images, masks = image_views(split), split.masks(slice(None))
    labelled = dict.fromkeys(FOLD0.novel, 0)
    for image, value in episodes:
        labelled[value] += int((ground_truth(split, images[image], masks) == value).sum())
    for column, value in enumerate(meter.class_ids):
        assert meter.intersection[1, column] <= labelled[value] <= meter.union[1, column]
    assert np.array_equal(meter.pooled_union, meter.union.sum(axis=1))
    # Classes without an episode (bicycle, boat, bottle) have no IoU (n/a, issue 13 item 10) and 0 episodes;
    # the fold's mIoU is the mean over the classes that have episodes (issue 14 item 7 reversed the zeros rule).
    per_class = [result["per_class"][name] for name in ("aeroplane", "bicycle", "bird", "boat", "bottle")]
    assert per_class[1] is None and per_class[3] is None and per_class[4] is None
    assert [result["episodes_per_class"][n] for n in ("bicycle", "boat", "bottle")] == [0, 0, 0]
    assert result["miou"] == pytest.approx(np.mean([v for v in per_class if v is not None]))
    pooled = meter.pooled_intersection / np.maximum(meter.pooled_union, 1)
    assert result["fb_iou"] == pytest.approx(100 * pooled.mean())


def test_listed_episodes_come_from_a_splits_folder(gen, tmp_path):
    split = open_split(store=gen.vision, split="folder/val")
    chosen = _derived(gen, FOLD0)[:2]
    lists = tmp_path / "splits" / "pascal" / "val"
    lists.mkdir(parents=True)
    (lists / "fold0.txt").write_text("".join(f"{split.image_ids[i]}__{c:02d}\n" for i, c in chosen))
    result = evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                            split="folder/val", protocol="pascal5i", fold=0, splits_dir=str(tmp_path / "splits"),
                            quiet=True)
    assert result["episodes"] == 2 and "lists in" in result["episode_source"]
    (lists / "fold0.txt").write_text("2008_000123__01\n")
    with pytest.raises(UserError, match="not in"):
        evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                       split="folder/val", protocol="pascal5i", fold=0, splits_dir=str(tmp_path / "splits"),
                       quiet=True)


@pytest.mark.parametrize("protocol", ["pascal5i", "mosaic4"])
def test_multiclass_mode_gives_each_image_all_its_classes(gen, protocol):
    """Mosaic-4 scores the classes in the masks: no fold is resolved (mosaic4 could not be without its root)."""
    result = evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                            split="folder/val", protocol=protocol, fold=0, mode="multiclass", quiet=True)
    assert result["episodes"] == len(open_split(store=gen.vision, split="folder/val").image_ids)
    assert SegmentationMeter.from_state_dict(result["meter"]).class_ids == sorted(SEEN + NOVEL)


def test_evaluation_refuses_a_protocol_of_other_classes(gen):
    with pytest.raises(UserError, match="protocol 'coco20i' classes do not match"):
        evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                       split="folder/val", protocol="coco20i", fold=0, quiet=True)
    # coco2voc scores VOC-class data for a COCO-20i fold: person, aeroplane and dog are novel in fold 0.
    novel = create_protocol("coco2voc").fold(0).novel
    result = evaluate_split(model=_untrained(gen), vision_cache=str(gen.vision), text_cache=str(gen.text),
                            split="folder/val", protocol="coco2voc", fold=0, min_pixels=MIN_PIXELS, quiet=True)
    assert {1, 12, 15} <= set(novel) and result["episodes"] > 0


def test_a_class_without_episodes_is_na_with_its_count_never_zero():
    """Honest tables: IoU None (n/a) beside 0 episodes, in the result, the CLI text and per_class.csv."""
    from types import SimpleNamespace

    import torch

    from pipeline.eval.evaluate import _result
    from pipeline.eval.metrics import SegmentationMeter
    from pipeline.eval.report import class_cell

    meter = SegmentationMeter([1, 2])
    target = torch.zeros(4, 4, dtype=torch.uint8)
    target[:2] = 1
    meter.update(pred=target.bool(), target=target, class_id=1)
    result = _result(meter=meter, names=["cat", "dog"], novel=(1, 2), source="derived",
                     cached=SimpleNamespace(pretrained=False))
    assert result["per_class"] == {"cat": 100.0, "dog": None}
    assert result["episodes_per_class"] == {"cat": 1, "dog": 0}
    assert result["miou"] == 100.0  # the mean is over classes with episodes (issue 14)
    assert class_cell("dog", None, result["episodes_per_class"]) == "dog n/a (0 episodes)"
    assert class_cell("cat", 100.0, result["episodes_per_class"]) == "cat 100.0 (1 ep.)"
