"""Evaluation faults: classes without episodes are not averaged in as zeros (issue 14 item 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.eval.metrics import SegmentationMeter

pytestmark = pytest.mark.reliability


def test_the_mean_skips_classes_no_episode_scored():
    meter = SegmentationMeter([1, 2, 3, 4, 5])
    perfect = np.array([[1, 0], [0, 1]])
    half = np.array([[1, 1], [0, 0]])
    meter.update(pred=perfect, target=perfect, class_id=1)  # IoU 1
    meter.update(pred=half, target=np.array([[1, 0], [0, 0]]), class_id=2)  # IoU 0.5
    meter.update(pred=perfect, target=perfect, class_id=2)  # class 2 summed: 3 / 4
    meter.update(pred=np.zeros((2, 2), int), target=perfect, class_id=4)  # IoU 0
    assert meter.episodes_per_class() == {1: 1, 2: 2, 3: 0, 4: 1, 5: 0}
    assert meter.miou() == pytest.approx((1.0 + 0.75 + 0.0) / 3 * 100)  # not / 5
    summary = meter.summary()
    assert summary["episodes_per_class"] == {"1": 1, "2": 2, "3": 0, "4": 1, "5": 0}
    again = SegmentationMeter.from_state_dict(meter.state_dict())
    assert again.miou() == meter.miou() and again.episodes_per_class() == meter.episodes_per_class()
    other = SegmentationMeter([1, 2, 3, 4, 5])
    other.update(pred=perfect, target=perfect, class_id=3)
    meter.merge(other)
    assert meter.episodes_per_class()[3] == 1 and meter.miou() == pytest.approx((1 + 0.75 + 1 + 0) / 4 * 100)


def test_multiclass_episodes_count_for_each_class_of_the_image():
    meter = SegmentationMeter([1, 2, 3])
    labels = np.array([[1, 2], [0, 0]])
    meter.update_multiclass(pred_labels=labels, target_labels=labels, class_ids_of_labels=[3, 1])
    assert meter.episodes_per_class() == {1: 1, 2: 0, 3: 1} and meter.miou() == pytest.approx(100.0)


def test_no_episode_at_all_is_not_a_score():
    assert math.isnan(SegmentationMeter([1, 2]).miou())


@pytest.mark.parametrize("wrong", ["text", "vision", "run"])
def test_a_wrong_store_or_run_fails_before_any_model_is_built(gen, tmp_path, monkeypatch, wrong):
    import json

    import pipeline.training.checkpoints
    from pipeline.eval.report import evaluate_runs

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(pipeline.training.checkpoints, "load_model", no_model)
    run = tmp_path / "run"
    run.mkdir()
    if wrong != "run":
        (run / "config.json").write_text(json.dumps({"data": {"cache": str(gen.vision), "text_cache": str(gen.text)}}))
    options = dict(split="folder/val", cache=None, text_cache=None, protocol=None, splits_dir=None, mode="binary",
                   limit=None, out=tmp_path / "out", device="cpu", quiet=True)
    if wrong == "text":
        options["text_cache"] = gen.vision.parent / "no-such-text-store"
    elif wrong == "vision":
        options["cache"] = tmp_path / "no-such-store"
    with pytest.raises(UserError, match={"text": "no-such-text-store", "vision": "no-such-store",
                                         "run": "no trained model at"}[wrong]):
        evaluate_runs(runs=[run], **options)
    assert not (tmp_path / "out").exists()
