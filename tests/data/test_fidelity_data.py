"""Issue 10: the PASCAL training list is SBD's train_aug, never silently VOC's 1,464 images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.registry import create_dataset
from pipeline.errors import UserError


def _voc(root, ids):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in ids:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClassAug" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    return root


def test_voc_training_without_train_aug_is_refused(tmp_path):
    root = _voc(tmp_path / "voc", ["a", "b"])
    with pytest.raises(UserError, match="train_aug.txt") as err:
        create_dataset("voc", root=root, split="train")
    assert "small_train=true" in str(err.value) and "\n" not in str(err.value)


def test_voc_small_train_is_an_explicit_opt_in(tmp_path):
    root = _voc(tmp_path / "voc", ["a", "b"])
    assert create_dataset("voc", root=root, split="train", small_train=True).ids == ["a"]


def test_voc_train_aug_is_used_when_present(tmp_path):
    root = _voc(tmp_path / "voc", ["a", "b"])
    (root / "ImageSets" / "SegmentationAug").mkdir()
    (root / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("a\nb\n")
    assert create_dataset("voc", root=root, split="train").ids == ["a", "b"]


def test_coco_crowd_regions_are_painted_as_their_class_by_default(tmp_path):
    from synthetic_data import make_coco

    from pipeline.data.labels import COCO_CLASSES

    ds = create_dataset("coco", root=make_coco(tmp_path / "coco"), split="val")
    mask = ds.load(0).mask
    assert mask[10, 25] == COCO_CLASSES.index("person") + 1  # the crowd RLE's right third
    assert COCO_CLASSES.index("person") + 1 in ds.classes_present(0)
    with pytest.raises(UserError, match="crowd must be class or ignore"):
        create_dataset("coco", root=tmp_path / "coco", split="val", crowd="skip")
