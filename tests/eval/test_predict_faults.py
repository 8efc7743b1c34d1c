"""Prediction at scale (issue 14): large photos render windows without copying the photo, are encoded in
bounded batches, and more than 255 class names keep their label numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import pipeline.data.views
from pipeline.data.views import ViewParams, render_view
from pipeline.encode.text import encoder_from_identity
from pipeline.errors import UserError
from pipeline.eval.predict import PredictionInputs, predict
from pipeline.plots import save_label_png
from pipeline.store.layout import open_store, read_text, store_attrs
from pipeline.training.checkpoints import load_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.reliability]


def _photo(path, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(path)
    return path


def test_a_window_of_a_large_photo_hands_pil_only_the_window(monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (1500, 2000), dtype=np.uint8)
    # What the renderer gave before, computed from the whole photo by PIL's own crop.
    cases = [((100, 200, 164, 264), 64, False), ((1950, 1460, 2014, 1524), 64, False), ((10, 20, 110, 120), 50, True)]
    expected = []
    for box, size, flip in cases:
        crop = Image.fromarray(image).crop(box).resize((size, size), Image.BILINEAR)
        mcrop = Image.fromarray(mask).crop(box).resize((size, size), Image.NEAREST)
        view, view_mask = np.asarray(crop), np.asarray(mcrop)
        if box[2] > 2000 or box[3] > 1500:  # past the edge: black pixels, ignore label
            view, view_mask = view.copy(), view_mask.copy()
            view[1500 - box[1]:], view[:, 2000 - box[0]:] = 0, 0
            view_mask[1500 - box[1]:], view_mask[:, 2000 - box[0]:] = 255, 255
        expected.append((view[:, ::-1] if flip else view, view_mask[:, ::-1] if flip else view_mask))
    given = []
    fromarray = Image.fromarray
    monkeypatch.setattr(pipeline.data.views.Image, "fromarray",
                        lambda array, *a, **k: given.append(array.shape) or fromarray(array, *a, **k))
    for (box, size, flip), (view, view_mask) in zip(cases, expected):
        got, got_mask = render_view(image=image, mask=mask, params=ViewParams(box=box, flip=flip), size=size)
        assert np.array_equal(got, view) and np.array_equal(got_mask, view_mask)
    assert given and max(math.prod(shape[:2]) for shape in given) <= 100 * 100  # the window, never the photo


def _counting_encoders(gen, calls: list[int]):
    encoders = encoder_from_identity(store_attrs(open_store(gen.vision)), vision=True, text=False, device="cpu")
    encode = encoders.vision.encode
    encoders.vision.encode = lambda images, **kw: calls.append(len(images)) or encode(images, **kw)
    return encoders


def test_predict_encodes_bounded_batches_and_matches_one_batch(gen, learned, tmp_path):
    photo = _photo(tmp_path / "photo.png", 150, 200)
    calls: list[int] = []
    encoders = _counting_encoders(gen, calls)
    batched = predict(image=photo, classes=["cat", "dog"], checkpoint=learned, out=None, batch_size=6,
                      encoders=encoders)
    views = batched["views"]
    assert views == 20 and calls == [6, 6, 6, 2]  # 5 x 4 windows of 64 px, never more than 6 at once
    calls.clear()
    whole = predict(image=photo, classes=["cat", "dog"], checkpoint=learned, out=None, batch_size=10_000,
                    encoders=encoders)
    assert calls == [views]  # the old path: every window in one batch
    assert np.array_equal(batched["label_map"], whole["label_map"])
    np.testing.assert_allclose(batched["probabilities"], whole["probabilities"], rtol=0, atol=1e-5)
    assert batched["coverage"] == pytest.approx(whole["coverage"], abs=1e-3)
    with pytest.raises(UserError, match="`batch_size` must be at least 1, got 0"):
        predict(image=photo, classes=["cat"], checkpoint=learned, out=None, batch_size=0)


def test_more_than_255_class_names_keep_their_label_numbers(gen, learned, tmp_path, monkeypatch):
    names = [f"thing {n}" for n in range(300)]
    known, table = read_text(open_store(gen.text))
    rng = np.random.default_rng(0)
    # 300 embeddings near the store's own classes (encoding 300 new names would take minutes on a CPU);
    # every tenth one is a stored class itself, so the largest numbers compete with the smallest.
    vectors = table[np.arange(300) % len(known)] + 0.3 * rng.standard_normal((300, table.shape[1])).astype(np.float32)
    vectors[9::10] = table[np.arange(30) % len(known)]
    monkeypatch.setattr(PredictionInputs, "class_vectors", lambda self, wanted, device: vectors[:len(wanted)])
    photo = _photo(tmp_path / "photo.png", 60, 80, seed=1)
    result = predict(image=photo, classes=names, checkpoint=learned, out=tmp_path / "pred")
    labels, probs = result["label_map"], result["probabilities"]
    assert labels.dtype == np.uint16 and probs.shape == (300, 60, 80)
    threshold = load_model(learned)[0].config.threshold
    best = probs.max(axis=0)
    expected = np.where(best > threshold, probs.argmax(axis=0) + 1, 0)
    assert np.array_equal(labels, expected)  # no label wrapped through 256
    saved = np.asarray(Image.open(tmp_path / "pred" / "labels.png"))
    assert np.array_equal(saved.astype(np.int64), labels.astype(np.int64))
    assert (tmp_path / "pred" / "mask_300_thing_299.png").is_file()
    assert len(list((tmp_path / "pred").glob("mask_*.png"))) == 300


def test_label_png_keeps_numbers_above_255_and_stays_a_palette_below(tmp_path):
    labels = np.array([[0, 1, 255], [256, 299, 300]], np.uint16)
    saved = np.asarray(Image.open(save_label_png(labels, tmp_path / "wide.png")))
    assert np.array_equal(saved.astype(np.int64), labels.astype(np.int64))
    small = Image.open(save_label_png(np.array([[0, 1, 255]], np.uint8), tmp_path / "small.png"))
    assert small.mode == "P" and np.array_equal(np.asarray(small), [[0, 1, 255]])


def test_a_sideways_phone_photo_is_predicted_upright(gen, learned, tmp_path):
    """EXIF orientation 6 (stored 80 x 48, shown 48 x 80): masks and labels line up with the photo as shown."""
    from PIL import ImageOps
    from synthetic_data import sideways_photo

    photo = sideways_photo(tmp_path / "phone.jpg", height=48, width=80)
    with Image.open(photo) as stored:
        ImageOps.exif_transpose(stored).save(tmp_path / "upright.png")  # the same pixels, stored upright
    sideways = predict(image=photo, classes=["cat", "dog"], checkpoint=learned, out=tmp_path / "pred")
    upright = predict(image=tmp_path / "upright.png", classes=["cat", "dog"], checkpoint=learned, out=None)
    assert sideways["label_map"].shape == (80, 48)
    assert np.array_equal(sideways["label_map"], upright["label_map"])
    for name in ("labels.png", "mask_01_cat.png", "mask_02_dog.png"):
        assert Image.open(tmp_path / "pred" / name).size == (48, 80), name


def test_out_that_is_a_file_is_one_line_and_left_alone(learned, tmp_path):
    photo, out = _photo(tmp_path / "photo.png", 40, 40), tmp_path / "taken"
    out.write_text("mine\n")
    with pytest.raises(UserError, match="`out` .*taken is a file, not a folder") as err:
        predict(image=photo, classes=["cat"], checkpoint=learned, out=out)
    assert "\n" not in str(err.value) and out.read_text() == "mine\n"


def test_a_very_long_class_name_gets_a_short_mask_file_name(learned, tmp_path):
    name = "cat " * 2500  # 10,000 characters
    result = predict(image=_photo(tmp_path / "photo.png", 40, 40), classes=[name.strip(), "dog"],
                     checkpoint=learned, out=tmp_path / "pred")
    masks = sorted(p.name for p in (tmp_path / "pred").glob("mask_*.png"))
    assert len(masks) == 2 and all(len(m) < 100 for m in masks), masks
    assert result["classes"][0] == name.strip()
    # The pictures cut the name (a legend as wide as 10,000 characters was a 75,000-pixel-wide image)
    pictures = {p.name: Image.open(p).size for p in (tmp_path / "pred").glob("*.png") if not p.name.startswith("mask_")}
    assert {"overlay.png", "legend.png"} <= set(pictures) and all(w < 1600 for w, _ in pictures.values()), pictures


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran",))


@pytest.mark.parametrize(("name", "damage"), [
    ("model.safetensors", "truncate"), ("model.safetensors", "pickle"), ("class_embeddings.safetensors", "pickle"),
    ("config.json", "junk"), ("inputs.json", "junk"), ("config.json", "a-list")])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_runs_own_file_damaged_or_replaced_is_one_line_naming_it(learned, gen, tmp_path, capsys, name, damage,
                                                                     command):
    import pickle
    import shutil

    from pipeline.errors import run_entry
    from pipeline.eval.report import evaluate_runs

    if command == "eval" and name in ("inputs.json", "class_embeddings.safetensors"):
        pytest.skip("eval scores from the stores; it does not read what a run keeps for prediction")
    run = tmp_path / "run"
    shutil.copytree(learned, run, ignore=shutil.ignore_patterns("checkpoints"))
    target = run / name
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
    elif damage == "pickle":
        target.write_bytes(pickle.dumps(_Payload()))
    else:
        target.write_text("[1, 2]\n" if damage == "a-list" else '{"data": {"cache": ')
    photo, out = _photo(tmp_path / "photo.png", 40, 40), tmp_path / "pred"
    call = (lambda: predict(image=photo, classes=["cat"], checkpoint=run, out=out)) if command == "predict" else \
        (lambda: evaluate_runs(runs=[run], split="folder/val", cache=None, text_cache=None, protocol=None,
                               splits_dir=None, mode="episodes", limit=2, out=out, device="cpu", quiet=True))
    code = run_entry(call)
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.strip().splitlines()) == 1, captured.err[-3000:]
    assert str(target) in captured.err and "a pickle ran" not in captured.out + captured.err
    assert not out.exists()


def test_a_long_prediction_says_up_front_how_many_windows_how_long_and_what_is_faster(learned, tmp_path,
                                                                                        monkeypatch, capsys):
    import pipeline.eval.predict as predict_module
    from pipeline.eval.predict import time_note

    note = time_note(windows=27_170, done=16, seconds=0.64, size=64, shape=(6000, 8000))
    assert note.startswith("note: 27,170 windows of 64 px over 8000x6000 pixels: about 18 min at 25.0 windows/s")
    assert "`resize`" in note and "coarser `stride` (default 42 px)" in note
    assert time_note(windows=40, done=16, seconds=0.64, size=64, shape=(200, 300)) is None  # a second: no note
    monkeypatch.setattr(predict_module, "LONG_PREDICTION_S", 0.0)
    photo = _photo(tmp_path / "photo.png", 150, 200)
    fine = predict(image=photo, classes=["cat"], checkpoint=learned, out=None, batch_size=6, quiet=False)
    err = capsys.readouterr().err
    lines = ["note: " + line.split("note: ", 1)[1] for line in err.splitlines() if "note: " in line]  # after bars
    assert len(lines) == 1 and lines[0].startswith("note: 20 windows of 64 px over 200x150 pixels"), err[-2000:]
    coarse = predict(image=photo, classes=["cat"], checkpoint=learned, out=None, stride=64)
    assert coarse["views"] < fine["views"]
    with pytest.raises(UserError, match="`stride` must be at least 1"):
        predict(image=photo, classes=["cat"], checkpoint=learned, out=None, stride=0)
