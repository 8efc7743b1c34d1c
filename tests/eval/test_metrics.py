"""HSNet metric protocol pinned on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import SegmentationMeter

I = 255  # ignore


def test_single_episode_with_ignore_pixels():
    pred = np.array([[1, 1, 0],
                     [1, 0, 0],
                     [0, 0, 1]], dtype=np.uint8)
    target = np.array([[1, 0, 0],
                       [1, 1, I],
                       [0, 0, I]], dtype=np.uint8)
    # Valid pixels: 7 (the two 255s dropped, including pred=1 at (2,2)).
    # fg: pred {00,01,10}, target {00,10,11} -> inter 2, union 4 -> IoU 0.5
    # bg: pred {02,11,20,21}, target {01,02,20,21} -> inter 3 {02,20,21}, union 5 -> IoU 0.6
    meter = SegmentationMeter([3])
    meter.update(pred=pred, target=target, class_id=3)
    assert meter.intersection.tolist() == [[3], [2]]
    assert meter.union.tolist() == [[5], [4]]
    assert meter.iou_per_class() == {3: 0.5}
    assert meter.miou() == pytest.approx(50.0)
    assert meter.fb_iou() == pytest.approx((0.6 + 0.5) / 2 * 100)
    assert meter.episodes == 1


def test_torch_bool_prediction_is_accepted():
    pred = torch.tensor([[True, False], [False, False]])
    target = torch.tensor([[1, 1], [0, 0]], dtype=torch.uint8)
    meter = SegmentationMeter([1])
    meter.update(pred=pred, target=target, class_id=1)
    # fg inter 1, union 2; bg inter 2, union 3
    assert meter.intersection.tolist() == [[2], [1]]
    assert meter.union.tolist() == [[3], [2]]


def test_empty_prediction_scores_zero_foreground():
    pred = np.zeros((4, 4), dtype=bool)
    target = np.zeros((4, 4), dtype=np.uint8)
    target[:2, :2] = 1
    # fg: inter 0, union 4 -> 0; bg: pred bg 16 px, target bg 12 px -> inter 12, union 16
    meter = SegmentationMeter([1])
    meter.update(pred=pred, target=target, class_id=1)
    assert meter.intersection[:, 0].tolist() == [12, 0]
    assert meter.union[:, 0].tolist() == [16, 4]
    assert meter.miou() == 0.0
    assert meter.fb_iou() == pytest.approx((12 / 16 + 0.0) / 2 * 100)


def test_empty_target_and_prediction_counts_zero_like_hsnet():
    # Class 7 only ever appears as an empty target with an empty prediction:
    # fg inter 0, union 0 -> IoU = 0 / max(0, 1) = 0 (HSNet), not 1. It still
    # counts in mIoU, pulling it down.
    meter = SegmentationMeter([3, 7])
    meter.update(pred=np.ones((2, 2), bool), target=np.ones((2, 2), np.uint8), class_id=3)  # IoU 1
    meter.update(pred=np.zeros((2, 2), bool), target=np.zeros((2, 2), np.uint8), class_id=7)
    assert meter.union[1].tolist() == [4, 0]
    assert meter.iou_per_class() == {3: 1.0, 7: 0.0}
    assert meter.miou() == pytest.approx(50.0)
    # FB-IoU pools over classes: bg inter 0+4, union 0+4 -> 1; fg inter 4+0, union 4+0 -> 1
    assert meter.fb_iou() == pytest.approx(100.0)


def test_unseen_class_is_left_out_of_miou():
    # Issue 14 item 7 reverses the earlier rule (a class without episodes counted as 0):
    # such a class has no IoU, and is reported as n/a with its episode count of 0.
    meter = SegmentationMeter([1, 2])
    meter.update(pred=np.ones((2, 2), bool), target=np.ones((2, 2), np.uint8), class_id=1)
    assert meter.miou() == pytest.approx(100.0) and meter.episodes_per_class() == {1: 1, 2: 0}


def test_two_episodes_sum_then_divide():
    meter = SegmentationMeter([4])
    # Episode 1: target = pred = top half (8 px) -> inter 8, union 8 (IoU 1.0)
    big = np.zeros((4, 4), np.uint8)
    big[:2] = 1
    meter.update(pred=big.astype(bool), target=big, class_id=4)
    # Episode 2: target 1 px, pred 2 px covering it -> inter 1, union 2 (IoU 0.5)
    small_target = np.zeros((4, 4), np.uint8)
    small_target[3, 3] = 1
    small_pred = np.zeros((4, 4), bool)
    small_pred[3, 2:] = True
    meter.update(pred=small_pred, target=small_target, class_id=4)
    # Pooled: 9 / 10 = 0.9, whereas the mean of per-episode IoUs would be 0.75.
    assert meter.intersection[1, 0] == 9 and meter.union[1, 0] == 10
    assert meter.iou_per_class()[4] == pytest.approx(0.9)
    assert meter.miou() == pytest.approx(90.0)
    assert meter.episodes == 2


def test_fb_iou_pools_over_classes():
    meter = SegmentationMeter([1, 2])
    # class 1, 2x2: pred {00}, target {00,01} -> fg inter 1 union 2; bg inter 2 union 3
    meter.update(pred=np.array([[1, 0], [0, 0]]), target=np.array([[1, 1], [0, 0]]), class_id=1)
    # class 2, 2x2: pred {00,01,10}, target {00} -> fg inter 1 union 3; bg inter 1 union 3
    meter.update(pred=np.array([[1, 1], [1, 0]]), target=np.array([[1, 0], [0, 0]]), class_id=2)
    # bg: (2+1)/(3+3) = 0.5; fg: (1+1)/(2+3) = 0.4 -> FB-IoU 45; mIoU (0.5 + 1/3)/2
    assert meter.fb_iou() == pytest.approx(45.0)
    assert meter.miou() == pytest.approx((0.5 + 1 / 3) / 2 * 100)


def test_multiclass_mosaic_episode():
    target = np.array([[1, 1, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 2, 2],
                       [0, 0, 2, I]], dtype=np.uint8)
    pred = np.array([[1, 1, 0, 0],
                     [1, 2, 0, 0],
                     [0, 0, 2, 2],
                     [0, 0, 0, 2]], dtype=np.uint8)
    meter = SegmentationMeter([5, 9])
    meter.update_multiclass(pred_labels=pred, target_labels=target, class_ids_of_labels=[5, 9])
    # 15 valid pixels ((3,3) ignored, so pred=2 there is dropped).
    # class 5 (label 1): pred {00,01,10}, target {00,01,10,11} -> inter 3, union 4 (0.75)
    #   one-vs-rest bg: inter 15 - 4 = 11, union 15 - 3 = 12
    # class 9 (label 2): pred {11,22,23}, target {22,23,32} -> inter 2, union 4 (0.5)
    #   bg: inter 11, union 13
    assert meter.intersection.tolist() == [[11, 11], [3, 2]]
    assert meter.union.tolist() == [[12, 13], [4, 4]]
    assert meter.miou() == pytest.approx(62.5)
    # Pooled, class-agnostic: fg = label > 0. pred fg {00,01,10,11,22,23} (6),
    # target fg {00,01,10,11,22,23,32} (7): inter 6, union 7 -- (1,1) is a
    # class confusion yet a foreground hit. bg: inter 15-7 = 8, union 15-6 = 9.
    assert meter.pooled_intersection.tolist() == [8, 6]
    assert meter.pooled_union.tolist() == [9, 7]
    assert meter.fb_iou() == pytest.approx((8 / 9 + 6 / 7) / 2 * 100)


def test_merge_and_state_round_trip():
    a, b = SegmentationMeter([1, 2]), SegmentationMeter([1, 2])
    a.update(pred=np.array([[1, 0]]), target=np.array([[1, 1]]), class_id=1)
    b.update(pred=np.array([[1, 1]]), target=np.array([[1, 1]]), class_id=1)
    b.update(pred=np.array([[0, 0]]), target=np.array([[0, 1]]), class_id=2)
    a.merge(b)
    # class 1: inter 1+2, union 2+2 -> 0.75; class 2: 0 / 1 -> 0
    assert a.iou_per_class() == {1: 0.75, 2: 0.0}
    assert a.episodes == 3
    restored = SegmentationMeter.from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert restored.state_dict() == a.state_dict()
    assert restored.miou() == a.miou() and restored.fb_iou() == a.fb_iou()


def test_rejects_bad_inputs():
    meter = SegmentationMeter([1])
    with pytest.raises(ValueError):
        meter.update(pred=np.zeros((2, 2)), target=np.zeros((2, 2)), class_id=2)  # unknown class
    with pytest.raises(ValueError):
        meter.update(pred=np.full((2, 2), 0.7), target=np.zeros((2, 2)), class_id=1)  # not binary
    with pytest.raises(ValueError):
        meter.update(pred=np.zeros((2, 2)), target=np.full((2, 2), 3), class_id=1)  # bad target
    with pytest.raises(ValueError):
        meter.merge(SegmentationMeter([2]))
