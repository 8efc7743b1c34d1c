"""Binary segmentation loss: ignore pixels and padded classes contribute nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.training.losses import binary_segmentation_loss, class_targets


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_class_targets_keeps_ignore():
    mask = np.array([[0, 3, 255],
                     [5, 3, 0]], dtype=np.uint8)
    targets = class_targets(mask, [3, 5, 7])
    assert targets.dtype == torch.uint8 and targets.shape == (3, 2, 3)
    assert targets[0].tolist() == [[0, 1, 255], [0, 1, 0]]
    assert targets[1].tolist() == [[0, 0, 255], [1, 0, 0]]
    assert targets[2].tolist() == [[0, 0, 255], [0, 0, 0]]


def test_mean_over_valid_pixels_only():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 9.0]]]])  # [1, 1, 2, 2]
    targets = torch.tensor([[[[1, 0], [0, 255]]]], dtype=torch.uint8)
    expected = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0)) / 3
    assert binary_segmentation_loss(logits, targets).item() == pytest.approx(expected)
    # Changing the ignored pixel's logit changes nothing.
    logits[0, 0, 1, 1] = -50.0
    assert binary_segmentation_loss(logits, targets).item() == pytest.approx(expected)


def test_padded_classes_are_excluded_and_get_no_gradient():
    logits = torch.tensor([[[[1.0, -2.0]], [[-1e4, -1e4]]]], requires_grad=True)  # [1, 2, 1, 2]
    targets = torch.tensor([[[[1, 0]], [[1, 1]]]], dtype=torch.uint8)
    text_mask = torch.tensor([[True, False]])
    loss = binary_segmentation_loss(logits, targets, text_mask=text_mask)
    assert loss.item() == pytest.approx((_bce(1.0, 1) + _bce(-2.0, 0)) / 2)
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0)
    assert torch.all(logits.grad[0, 0] != 0)


def test_all_ignored_gives_zero_and_finite_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    loss = binary_segmentation_loss(logits, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_long_targets_and_custom_ignore_index():
    logits = torch.zeros(1, 1, 1, 3)
    targets = torch.tensor([[[[1, 0, -1]]]])
    loss = binary_segmentation_loss(logits, targets, ignore_index=-1)
    assert loss.item() == pytest.approx(math.log(2))



def test_released_reduction_averages_each_sample_over_its_own_valid_pixels():
    # Sample 0: four valid pixels; sample 1: one valid pixel, three ignored (an object border).
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[1.5, 4.0], [-2.0, 0.0]]]])  # [2, 1, 2, 2]
    targets = torch.tensor([[[[1, 0], [0, 0]]], [[[0, 255], [255, 255]]]], dtype=torch.uint8)
    first = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(-3.0, 0)) / 4
    second = _bce(1.5, 0)
    assert binary_segmentation_loss(logits, targets).item() == pytest.approx((first + second) / 2)
    pooled = (first * 4 + second) / 5
    assert binary_segmentation_loss(logits, targets, reduction="pixel").item() == pytest.approx(pooled)


def test_sample_reduction_skips_padded_classes_and_fully_ignored_samples():
    logits = torch.tensor([[[[1.0, -2.0]], [[-1e4, -1e4]]], [[[3.0, 3.0]], [[-1e4, -1e4]]]],
                          requires_grad=True)  # [2, 2, 1, 2]
    targets = torch.tensor([[[[1, 0]], [[1, 1]]], [[[255, 255]], [[1, 1]]]], dtype=torch.uint8)
    text_mask = torch.tensor([[True, False], [True, False]])
    loss = binary_segmentation_loss(logits, targets, text_mask=text_mask)
    assert loss.item() == pytest.approx((_bce(1.0, 1) + _bce(-2.0, 0)) / 2)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, 1] == 0) and torch.all(logits.grad[1] == 0)
