"""Reading the cache for training: samples, targets, batch order, read modes, prefetch, text.

Also home of the generated dataset the stage-two tests share: coloured
rectangles of a few VOC classes on grey noise, so a model can learn it from
random-init features, and PASCAL-5i fold 0 applies (classes 1 and 3 novel).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from synthetic_data import FOLD0, NOVEL, SEEN

from pipeline.data.labels import VOC_CLASSES, prompt_name
from pipeline.encode.text import class_embeddings, text_encoder_of
from pipeline.errors import UserError
from pipeline.store.reader import load_into_memory, open_split
from pipeline.training.batches import (
    binary_targets,
    prefetch,
    training_batches,
    training_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- #
# Samples and targets
# --------------------------------------------------------------------------- #


def test_training_pairs_one_per_class_or_all_seen_classes_of_a_view(gen):
    split = open_split(store=gen.vision, split="folder/train")
    masks = split.masks(slice(None))
    expected = {v: tuple(c for c in SEEN if (masks[v] == c).any()) for v in range(split.num_views)}
    expected = {v: classes for v, classes in expected.items() if classes}
    assert len(expected) < split.num_views or any(len(c) > 1 for c in expected.values())  # both cases occur

    every = training_pairs(split=split, seen=FOLD0.seen, classes_per_sample="all")
    assert dict(every) == expected and len(every) == len(expected)
    single = training_pairs(split=split, seen=FOLD0.seen, classes_per_sample="1")
    assert all(len(classes) == 1 for _, classes in single)
    assert sorted(single) == sorted((v, (c,)) for v, classes in expected.items() for c in classes)
    assert len(single) > len(every)
    assert not {c for _, classes in single for c in classes} & set(NOVEL)
    with pytest.raises(UserError, match="no view shows any seen class"):
        training_pairs(split=split, seen=(20,), classes_per_sample="1")  # tvmonitor never drawn


def test_binary_targets_keep_ignore_and_hide_novel_pixels_as_asked():
    mask = np.array([[0, 2, 2, 3],
                     [255, 2, 3, 0]], np.uint8)[None]  # class 2 seen, class 3 novel
    targets, valid = binary_targets(masks=mask, classes=[(2,)], width=2, novel=(3,), novel_pixels="background")
    assert targets.shape == (1, 2, 2, 4) and targets.dtype == np.uint8
    assert np.array_equal(targets[0, 0], [[0, 1, 1, 0], [255, 1, 0, 0]])
    assert (targets[0, 1] == 255).all() and valid.tolist() == [[True, False]]  # the padded slot
    targets, _ = binary_targets(masks=mask, classes=[(2,)], width=1, novel=(3,), novel_pixels="ignore")
    assert np.array_equal(targets[0, 0], [[0, 1, 1, 255], [255, 1, 255, 0]])
    two = np.stack([mask[0], mask[0]])
    targets, valid = binary_targets(masks=two, classes=[(2,), (3, 2)], width=2, novel=(), novel_pixels="ignore")
    assert np.array_equal(targets[1, 0], [[0, 0, 0, 1], [255, 0, 1, 0]])  # "all": one map per class of W
    assert np.array_equal(targets[1, 1], targets[0, 0]) and valid.tolist() == [[True, False], [True, True]]


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #


def _epoch(gen, *, batch_size=8, epoch=0, seed=0, skip=0, cps="1", novel_pixels="background"):
    split = open_split(store=gen.vision, split="folder/train")
    samples = training_pairs(split=split, seen=FOLD0.seen, classes_per_sample=cps)
    text = np.eye(len(VOC_CLASSES), dtype=np.float32)  # row k-1 names class k
    return split, list(training_batches(samples=samples, memory=load_into_memory(split), text=text,
                                        batch_size=batch_size, epoch=epoch, seed=seed, novel=FOLD0.novel,
                                        novel_pixels=novel_pixels, skip_batches=skip))


def _views(batches) -> list[int]:
    return [int(v) for batch in batches for v in batch.views]


def test_batch_order_is_a_function_of_seed_and_epoch_only(gen):
    split, first = _epoch(gen)
    assert _views(_epoch(gen, batch_size=5)[1]) == _views(first)  # the batch size only cuts it
    assert _views(_epoch(gen, epoch=1)[1]) != _views(first)
    assert _views(_epoch(gen, seed=1)[1]) != _views(first)
    assert sorted(_views(_epoch(gen, epoch=1)[1])) == sorted(_views(first))
    _, tail = _epoch(gen, skip=2)
    assert _views(tail) == _views(first[2:])
    for a, b in zip(tail, first[2:]):
        assert torch.equal(a.features, b.features) and torch.equal(a.targets, b.targets)


def test_novel_pixels_ignore_reaches_the_batches(gen):
    split = open_split(store=gen.vision, split="folder/train")
    masks = split.masks(slice(None))
    _, batches = _epoch(gen, novel_pixels="ignore")
    hidden = 0
    for batch in batches:
        for b, view in enumerate(batch.views):
            novel = np.isin(masks[view], NOVEL)
            assert (batch.targets[b, 0].numpy()[novel] == 255).all()
            hidden += int(novel.sum())
    assert hidden > 0


# --------------------------------------------------------------------------- #
# Prefetch
# --------------------------------------------------------------------------- #


def _prefetch_threads() -> int:
    return sum(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(prefetch(iter(range(20)), depth=2)) == list(range(20))

    def broken():
        yield 1
        raise ValueError("bad shard")

    stream = prefetch(broken(), depth=2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(stream)


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    before = _prefetch_threads()
    stream = prefetch(iter(range(100)), depth=1)
    assert next(stream) == 0
    time.sleep(0.3)  # the producer fills the queue and waits
    stream.close()
    deadline = time.monotonic() + 5
    while _prefetch_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _prefetch_threads() == before


# --------------------------------------------------------------------------- #
# Class-name embeddings
# --------------------------------------------------------------------------- #


def test_names_absent_from_the_text_store_are_encoded_on_demand(gen):
    table = class_embeddings(text_store=gen.text, names=["cat", "zebra crossing", "dog"])
    assert table.shape == (3, 384) and table.dtype == np.float32
    assert np.allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)
    stored = class_embeddings(text_store=gen.text, names=["dog", "cat"], encode_missing=False)
    assert np.array_equal(stored, table[[2, 0]])  # stored rows come back untouched
    fresh = text_encoder_of(gen.text).text.encode_names([prompt_name("zebra crossing")]).numpy()[0]
    assert np.allclose(table[1], fresh, atol=1e-5)
    assert float(table[1] @ table[0]) < 0.99  # a real new embedding, not a copy of a stored one
    with pytest.raises(UserError, match="zebra crossing"):
        class_embeddings(text_store=gen.text, names=["zebra crossing"], encode_missing=False)
