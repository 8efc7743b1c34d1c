"""Rendering a shard: class presence counted once, the plan read once, views written into given buffers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.encode.shards import classes_in, render_shard, split_rows


def _unique_classes(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """The reference: a sort per mask."""
    out = np.zeros((len(masks), num_classes), bool)
    for s, mask in enumerate(masks):
        values = np.unique(mask)
        values = values[(values > 0) & (values <= num_classes)]
        out[s, values - 1] = True
    return out


@pytest.mark.parametrize("num_classes", [1, 20, 80, 254])
def test_class_presence_is_the_sorted_values(num_classes):
    rng = np.random.default_rng(num_classes)
    masks = rng.integers(0, 256, (5, 40, 50)).astype(np.uint8)
    masks[1] = 0  # background only
    masks[2] = 255  # ignore only
    masks[3, :4] = num_classes  # the last class
    masks[4] = rng.choice([0, 1, 255], (40, 50))
    assert np.array_equal(classes_in(masks, num_classes), _unique_classes(masks, num_classes))
    assert classes_in(masks[:0], num_classes).shape == (0, num_classes)


def test_class_presence_of_a_photo_sized_mask_costs_a_fraction_of_a_sort():
    masks = np.random.default_rng(0).integers(0, 81, (6, 480, 640)).astype(np.uint8)
    ours = theirs = 0.0
    for _ in range(3):  # interleaved: another process's load weighs on both alike
        start = time.thread_time()
        classes_in(masks, 80)
        middle = time.thread_time()
        _unique_classes(masks, 80)
        ours, theirs = ours + middle - start, theirs + time.thread_time() - middle
    assert ours < theirs / 2, f"histogram {ours * 1e3:.1f} ms vs sort {theirs * 1e3:.1f} ms"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from pipeline.bench.datapath import planned_store
    from pipeline.data.synthetic import make_shapes_dataset

    work = tmp_path_factory.mktemp("render")
    data = make_shapes_dataset(out=work / "data", count=6, size=(90, 120))
    config, dataset, group, _ = planned_store(work=work, data_root=data, images=6, views=2, backbone="test-vit",
                                               shard_size=5)
    return dataset, group


def test_a_shard_ships_its_views_classes_and_renders_the_same_with_the_plan_read_once(planned):
    dataset, group = planned
    size = int(group["masks"].shape[1])
    rows = split_rows(group)
    for shard in range(3):
        plain = render_shard(dataset=dataset, group=group, shard=shard, input_size=size, skip_bad=False)
        n = len(plain.valid)
        images = np.full((n, size, size, 3), 7, np.uint8)  # stale bytes: every row must be written
        masks = np.full((n, size, size), 7, np.uint8)
        given = render_shard(dataset=dataset, group=group, shard=shard, input_size=size, skip_bad=False, rows=rows,
                             images=images, masks=masks)
        assert given.images is images and given.masks is masks  # filled in place, no copy
        assert np.array_equal(given.images, plain.images) and np.array_equal(given.masks, plain.masks)
        assert plain.valid.all() and np.array_equal(given.source, plain.source)
        assert np.array_equal(plain.classes, classes_in(plain.masks, rows.num_classes))
        assert plain.cpu_seconds > 0


def test_a_render_process_runs_one_thread_of_torch_and_opencv():
    import cv2
    import torch

    from pipeline.encode.render_pool import one_thread_per_process

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        one_thread_per_process(0)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
