"""One batch source interface for every data path: memory and stream train on the same samples."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from synthetic_data import VIEWS, train_overrides

from pipeline.training.config import build_config
from pipeline.training.loop import prepare_data
from pipeline.training.sources import BatchSource, MemorySource, StreamSource

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _data(gen, tmp_path, mode: str, *extra: str):
    return prepare_data(build_config(preset="tiny", overrides=train_overrides(
        gen, tmp_path / "unused", f"data.read_mode={mode}", *extra)))


def _items(batches) -> Counter:
    """Multiset of (view, text rows, target bytes, feature bytes) over an epoch, whatever the batch type."""
    out = Counter()
    for batch in batches:
        feats, text, mask, targets = batch.to_device(CPU)
        for b, view in enumerate(batch.views):
            rows = text[b][mask[b]].numpy().tobytes()
            out[(int(view), rows, targets[b][mask[b]].numpy().tobytes(), feats[b].numpy().tobytes())] += 1
    return out


@pytest.mark.parametrize("cps", ["1", "all"])
def test_memory_and_stream_sources_train_on_the_same_view_samples(gen, tmp_path, cps):
    """With K = 2 views per image both paths show one view of each image per epoch, the same one.

    The stream path once took the (image, classes) samples for (view, classes) ones: it trained
    on other images' views, with targets of classes those views do not show.
    """
    assert VIEWS == 2
    memory = _data(gen, tmp_path, "memory", f"data.classes_per_sample={cps}")
    stream = _data(gen, tmp_path, "stream", f"data.classes_per_sample={cps}")
    assert isinstance(memory.source, MemorySource) and isinstance(stream.source, StreamSource)
    assert memory.mode == "memory" and stream.mode == "stream" and memory.samples == stream.samples
    split = memory.split
    for epoch in (0, 1):
        chosen = memory.source.epoch_samples(epoch)
        assert len({int(split.view_image[v]) for v, _ in chosen}) == len({i for i, _ in memory.samples})
        assert _items(stream.source.batches(epoch=epoch)) == _items(memory.source.batches(epoch=epoch))
    masks = split.masks(slice(None))
    text = memory.text
    for batch in memory.source.batches(epoch=0):  # targets are the views' own masks, per named class
        feats, rows, mask, targets = batch.to_device(CPU)
        assert np.array_equal(feats.numpy(), split.features(batch.views))
        for b, view in enumerate(batch.views):
            for j in np.flatnonzero(mask[b].numpy()):
                value = int(np.flatnonzero((text == rows[b, j].numpy()).all(axis=1))[0]) + 1
                expected = np.where(masks[view] == 255, 255, masks[view] == value)
                assert np.array_equal(targets[b, j].numpy(), expected)


def test_every_source_is_a_batch_source_that_resumes_inside_an_epoch(gen, tmp_path):
    for mode in ("memory", "stream"):
        source = _data(gen, tmp_path, mode).source
        assert isinstance(source, BatchSource)
        whole = list(source.batches(epoch=3))
        tail = list(source.batches(epoch=3, skip=2))
        assert [list(b.views) for b in tail] == [list(b.views) for b in whole[2:]]
