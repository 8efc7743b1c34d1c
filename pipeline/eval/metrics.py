"""HSNet-style segmentation metrics: accumulate intersections and unions, divide once.

Per episode (one image, one target class), pixels labelled ``ignore_index``
are dropped from both prediction and target; the background (row 0) and
foreground (row 1) intersection and union areas are added to the class's
column. At the end, per-class IoU = summed intersection / max(summed union, 1)
(HSNet's ``torch.max(union, ones)``), so

* a class is scored over all its episodes pooled, not as a mean of
  per-episode IoUs: an episode with a large object weighs more;
* a class whose episodes all had empty target and empty prediction (union 0)
  scores 0, not 1 -- HSNet's behaviour, kept for comparable numbers;
* mIoU averages the foreground IoU over all of the meter's classes (a fold's
  classes), including classes that were never seen (they score 0).

FB-IoU = mean over {background, foreground} of (intersection summed over
classes / union summed over classes), from the pooled buffers described in
:meth:`SegmentationMeter.update_multiclass`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.labels import IGNORE

ArrayLike = Tensor | np.ndarray


def _as_tensor(array: ArrayLike, *, name: str) -> Tensor:
    tensor = torch.as_tensor(array)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [H, W], got {tuple(tensor.shape)}")
    return tensor


def _areas(pred: Tensor, target: Tensor) -> tuple[list[int], list[int]]:
    """[bg, fg] intersection and union of two boolean foreground maps."""
    inter = [int((~pred & ~target).sum()), int((pred & target).sum())]
    union = [int((~pred | ~target).sum()), int((pred | target).sum())]
    return inter, union


class SegmentationMeter:
    """Running HSNet sums for a fixed list of classes; mergeable across workers."""

    def __init__(self, class_ids: Sequence[int], *, ignore_index: int = IGNORE):
        self.class_ids = [int(c) for c in class_ids]
        if len(set(self.class_ids)) != len(self.class_ids) or not self.class_ids:
            raise ValueError(f"class_ids must be unique and non-empty, got {self.class_ids}")
        self.ignore_index = ignore_index
        self._column = {c: i for i, c in enumerate(self.class_ids)}
        self.intersection = np.zeros((2, len(self.class_ids)), dtype=np.int64)  # [bg/fg, classes]
        self.union = np.zeros((2, len(self.class_ids)), dtype=np.int64)  # [bg/fg, classes]
        self.pooled_intersection = np.zeros(2, dtype=np.int64)  # [bg/fg], for FB-IoU
        self.pooled_union = np.zeros(2, dtype=np.int64)  # [bg/fg], for FB-IoU
        self._episodes = 0
        self.class_episodes = np.zeros(len(self.class_ids), dtype=np.int64)  # episodes that scored each class

    @property
    def episodes(self) -> int:
        return self._episodes

    def _column_of(self, class_id: int) -> int:
        if int(class_id) not in self._column:
            raise ValueError(f"class {class_id} is not one of this meter's classes {self.class_ids}")
        return self._column[int(class_id)]

    def update(self, *, pred: ArrayLike, target: ArrayLike, class_id: int) -> None:
        """Add one binary episode: ``pred`` [H, W] bool or 0/1, ``target`` [H, W] 0/1/ignore."""
        pred, target = _as_tensor(pred, name="pred"), _as_tensor(target, name="target")
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if not bool(((pred == 0) | (pred == 1)).all()):
            raise ValueError("pred must be a binary map (bool or 0/1)")
        target = target.to(pred.device)
        valid = target != self.ignore_index  # [H, W]
        if not bool(((target[valid] == 0) | (target[valid] == 1)).all()):
            raise ValueError(f"target must hold only 0, 1 and {self.ignore_index}")
        inter, union = _areas(pred[valid].bool(), target[valid] == 1)  # each [bg, fg]
        column = self._column_of(class_id)
        self.intersection[:, column] += inter
        self.union[:, column] += union
        self.pooled_intersection += inter
        self.pooled_union += union
        self._episodes += 1
        self.class_episodes[column] += 1

    def update_multiclass(
        self, *, pred_labels: ArrayLike, target_labels: ArrayLike, class_ids_of_labels: Sequence[int]
    ) -> None:
        """Add one multi-class episode (Mosaic-4): label maps with 0 = background, k = class k - 1 of W.

        ``class_ids_of_labels[k - 1]`` is the class id of label k. For each class
        of W, its column gets the one-vs-rest areas: foreground = pixels labelled
        k, background = pixels labelled anything else (so a confusion between
        two classes costs both). FB-IoU is class-agnostic here: the pooled
        foreground is "any class" (label > 0) and the pooled background is
        label 0, so a pixel of class a predicted as class b counts as a
        foreground hit for FB-IoU (but a miss for both classes' IoU).
        Ignored pixels are dropped first, as in :meth:`update`.
        """
        pred, target = _as_tensor(pred_labels, name="pred_labels"), _as_tensor(target_labels, name="target_labels")
        if pred.shape != target.shape:
            raise ValueError(f"pred_labels {tuple(pred.shape)} and target_labels {tuple(target.shape)} differ")
        class_ids = [int(c) for c in class_ids_of_labels]
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"class_ids_of_labels must be unique, got {class_ids}")
        columns = [self._column_of(c) for c in class_ids]
        target = target.to(pred.device)
        valid = target != self.ignore_index  # [H, W]
        pred, target = pred[valid].long(), target[valid].long()  # [N], [N]
        labels = len(class_ids)
        if bool(((pred < 0) | (pred > labels)).any()) or bool(((target < 0) | (target > labels)).any()):
            raise ValueError(f"labels must lie in 0..{labels} (or be {self.ignore_index} in the target)")
        for label, column in enumerate(columns, start=1):
            inter, union = _areas(pred == label, target == label)
            self.intersection[:, column] += inter
            self.union[:, column] += union
        inter, union = _areas(pred > 0, target > 0)
        self.pooled_intersection += inter
        self.pooled_union += union
        self._episodes += 1
        self.class_episodes[columns] += 1

    def iou_per_class(self) -> dict[int, float]:
        """Foreground IoU per class (0..1): summed intersection / max(summed union, 1)."""
        iou = self.intersection[1] / np.maximum(self.union[1], 1)
        return {c: float(v) for c, v in zip(self.class_ids, iou)}

    def episodes_per_class(self) -> dict[int, int]:
        """How many episodes scored each class; a class with none has no IoU (shown as n/a)."""
        return {c: int(n) for c, n in zip(self.class_ids, self.class_episodes)}

    def miou(self) -> float:
        """Mean foreground IoU over the meter's classes that some episode scored, in percent.

        A class without episodes has no IoU: averaging it in as 0 would understate the mean
        (NaN when no class was scored at all).
        """
        scored = [iou for c, iou in self.iou_per_class().items() if self.class_episodes[self._column[c]]]
        return float(np.mean(scored) * 100.0) if scored else float("nan")

    def fb_iou(self) -> float:
        """Mean of pooled background and foreground IoU, in percent.

        HSNet divides without a floor; the max(union, 1) here only changes the
        degenerate case of no pixels counted at all (0 instead of NaN).
        """
        iou = self.pooled_intersection / np.maximum(self.pooled_union, 1)
        return float(iou.mean() * 100.0)

    def merge(self, other: SegmentationMeter) -> None:
        """Add another meter's sums (e.g. from another worker) into this one."""
        if other.class_ids != self.class_ids or other.ignore_index != self.ignore_index:
            raise ValueError("can only merge meters with the same classes and ignore index")
        self.intersection += other.intersection
        self.union += other.union
        self.pooled_intersection += other.pooled_intersection
        self.pooled_union += other.pooled_union
        self._episodes += other._episodes
        self.class_episodes += other.class_episodes

    def state_dict(self) -> dict:
        """A JSON-ready snapshot of the sums (integers, so merging stays exact)."""
        return {
            "class_ids": list(self.class_ids),
            "ignore_index": self.ignore_index,
            "episodes": self._episodes,
            "class_episodes": self.class_episodes.tolist(),
            "intersection": self.intersection.tolist(),
            "union": self.union.tolist(),
            "pooled_intersection": self.pooled_intersection.tolist(),
            "pooled_union": self.pooled_union.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore sums saved by :meth:`state_dict` into a meter with the same classes."""
        if [int(c) for c in state["class_ids"]] != self.class_ids:
            raise ValueError("saved meter has different classes")
        self.ignore_index = int(state["ignore_index"])
        self._episodes = int(state["episodes"])
        self.intersection = np.asarray(state["intersection"], dtype=np.int64).reshape(2, -1)
        self.union = np.asarray(state["union"], dtype=np.int64).reshape(2, -1)
        self.pooled_intersection = np.asarray(state["pooled_intersection"], dtype=np.int64)
        self.pooled_union = np.asarray(state["pooled_union"], dtype=np.int64)
        # Saved before per-class counts existed: a class with any union was scored.
        counts = state.get("class_episodes", (self.union.sum(axis=0) > 0).astype(np.int64))
        self.class_episodes = np.asarray(counts, dtype=np.int64).reshape(-1)

    @classmethod
    def from_state_dict(cls, state: dict) -> SegmentationMeter:
        meter = cls(state["class_ids"], ignore_index=int(state["ignore_index"]))
        meter.load_state_dict(state)
        return meter

    def summary(self) -> dict:
        """Headline numbers for logs and metrics files."""
        return {
            "miou": self.miou(),
            "fb_iou": self.fb_iou(),
            "episodes": self._episodes,
            "iou_per_class": {str(c): v * 100.0 for c, v in self.iou_per_class().items()},
            "episodes_per_class": {str(c): n for c, n in self.episodes_per_class().items()},
        }
