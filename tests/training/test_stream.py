"""Read mode ``stream``: whole-block reads, a shuffle buffer, targets built on the device."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import FOLD0, SHARD, train_overrides

from pipeline.data.labels import VOC_CLASSES
from pipeline.store.reader import load_into_memory, open_split
from pipeline.training.batches import binary_targets, training_batches, training_pairs
from pipeline.training.config import build_config
from pipeline.training.loop import train
from pipeline.training.stream import class_targets, stream_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("novel_pixels", ["background", "ignore"])
def test_device_targets_equal_the_numpy_targets(novel_pixels):
    rng = np.random.default_rng(0)
    masks = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=(5, 7, 9))
    classes = [(2,), (1, 3), (3,), (1, 2, 3), (2, 1)]
    expected, valid = binary_targets(masks=masks, classes=classes, width=3, novel=(3,), novel_pixels=novel_pixels)
    slots = np.zeros((5, 3), np.int64)
    for b, cls in enumerate(classes):
        slots[b, :len(cls)] = cls
    got = class_targets(masks=torch.from_numpy(masks), classes=torch.from_numpy(slots), novel=(3,),
                        novel_pixels=novel_pixels)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)
    assert np.array_equal((slots > 0), valid)


def _stream(gen, *, readers=2, epoch=0, skip=0, batch_size=8, block_views=0, cps="1"):
    split = open_split(store=gen.vision, split="folder/train")
    samples = training_pairs(split=split, seen=FOLD0.seen, classes_per_sample=cps)
    text = np.eye(len(VOC_CLASSES), dtype=np.float32)
    return split, samples, list(stream_batches(
        split=split, samples=samples, text=text, batch_size=batch_size, epoch=epoch, seed=0, novel=FOLD0.novel,
        readers=readers, block_views=block_views, buffer_blocks=2, skip_batches=skip))


def _views(batches) -> list[int]:
    return [int(v) for batch in batches for v in batch.views]


@pytest.mark.parametrize("cps", ["1", "all"])
def test_stream_batches_hold_the_same_samples_as_the_memory_mode(gen, cps):
    split, samples, batches = _stream(gen, cps=cps)
    memory = list(training_batches(samples=samples, memory=load_into_memory(split),
                                   text=np.eye(len(VOC_CLASSES), dtype=np.float32), batch_size=8, epoch=0, seed=0,
                                   novel=FOLD0.novel))

    def items(batch_list, unpack):
        out = Counter()
        for batch in batch_list:
            feats, text, mask, targets = unpack(batch)
            for b, view in enumerate(batch.views):
                slots = tuple(int(np.argmax(row)) + 1 for row, ok in zip(text[b].numpy(), mask[b]) if ok)
                out[(int(view), slots, targets[b].numpy().tobytes(), feats[b].numpy().tobytes())] += 1
        return out

    streamed = items(batches, lambda b: b.to_device(torch.device("cpu")))
    assert streamed == items(memory, lambda b: (b.features, b.text, b.text_mask, b.targets))


def test_stream_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch(gen):
    _, _, first = _stream(gen, readers=1)
    assert _views(_stream(gen, readers=4)[2]) == _views(first)  # how many readers never changes the order
    assert _views(_stream(gen, epoch=1)[2]) != _views(first)
    _, _, tail = _stream(gen, skip=3)
    assert _views(tail) == _views(first[3:])
    for a, b in zip(tail, first[3:]):
        assert torch.equal(a.features, b.features) and torch.equal(a.masks, b.masks)


def test_stream_reads_a_few_contiguous_blocks_at_a_time(gen):
    """With buffer_blocks=2, every stretch of the order that finishes the blocks begun in it spans <= 2 blocks."""
    block = SHARD // 2
    _, _, batches = _stream(gen, block_views=block)
    views = _views(batches)
    blocks = [v // block for v in views]
    remaining, stretch, widest = Counter(blocks), set(), 0
    for b in blocks:
        stretch.add(b)
        remaining[b] -= 1
        if all(remaining[s] == 0 for s in stretch):
            widest, stretch = max(widest, len(stretch)), set()
    assert widest <= 2 and len(set(blocks)) > 2


def test_training_in_stream_mode_resumes_to_the_same_weights(gen, tmp_path):
    extra = ("optim.epochs=2", "data.read_mode=stream", "data.readers=2")
    straight = tmp_path / "straight"
    summary = train(config=build_config(preset="tiny", overrides=train_overrides(gen, straight, *extra)), quiet=True)
    assert summary["steps"] > 4
    start = (straight / "metrics.jsonl").read_text().splitlines()[0]
    assert '"read_mode": "stream"' in start
    run = tmp_path / "run"
    train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, *extra, "optim.max_steps=3")),
          quiet=True)
    train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, *extra, "data.readers=1")),
          resume=True, quiet=True)
    left, right = load_file(str(straight / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
