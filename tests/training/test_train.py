"""Stage two: the tiny preset learns, a killed run resumes to the same bits, checkpoints are atomic, configs are strict."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import LEARN_EPOCHS, SEEN, Generated, train_overrides

from pipeline.config import from_dict, to_dict
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.encode.text import class_embeddings
from pipeline.errors import UserError
from pipeline.eval.metrics import SegmentationMeter
from pipeline.model import build_model
from pipeline.store.reader import open_split
from pipeline.training.checkpoints import latest_checkpoint, load_model
from pipeline.training.config import TrainConfig, build_config, resume_identity
from pipeline.training.loop import train
from pipeline.training.schedule import lr_at, wd_at

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(gen: Generated, out: Path, *extra: str) -> TrainConfig:
    return build_config(preset="tiny", overrides=train_overrides(gen, out, *extra))


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# --------------------------------------------------------------------------- #
# Learning
# --------------------------------------------------------------------------- #


def seen_iou(split, predict) -> float:
    """HSNet mIoU over the seen classes of every training view; ``predict(view, class)`` -> [S, S] bool."""
    masks = split.masks(slice(None))
    meter = SegmentationMeter(list(SEEN))
    for view in range(split.num_views):
        for value in SEEN:
            if split.view_classes[view, value - 1]:
                target = np.where(masks[view] == 255, 255, masks[view] == value).astype(np.uint8)
                meter.update(pred=torch.as_tensor(predict(view, value, target)), target=torch.from_numpy(target),
                             class_id=value)
    return meter.miou()


def model_predictor(model, split, text):
    features = torch.from_numpy(split.features(slice(None)))

    @torch.inference_mode()
    def predict(view, value, target):
        logits = model(features[view:view + 1], text[value - 1][None], grid=split.grid)  # [1, 1, S, S]
        return torch.sigmoid(logits[0, 0]) > model.config.threshold

    return predict


def test_tiny_preset_learns_the_rectangles(gen, learned):
    losses = [loss for _, loss in _losses(learned)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])

    split = open_split(store=gen.vision, split="folder/train")
    text = torch.from_numpy(class_embeddings(text_store=gen.text, names=split.class_names))
    model, config = load_model(learned)
    trained = seen_iou(split, model_predictor(model, split, text))
    torch.manual_seed(config.seed)
    untrained = seen_iou(split, model_predictor(build_model(config.model).eval(), split, text))
    everywhere = seen_iou(split, lambda view, value, target: np.ones(target.shape, bool))
    rng = np.random.default_rng(0)
    coin = seen_iou(split, lambda view, value, target: rng.random(target.shape)
                    < (target == 1).sum() / max((target != 255).sum(), 1))
    assert trained > untrained + 10
    assert trained > max(everywhere, coin) + 10, (trained, everywhere, coin)


def test_run_directory_holds_what_the_docs_promise(learned):
    for name in ("config.json", "metrics.jsonl", "curves.png", "summary.json", "model.safetensors"):
        assert (learned / name).is_file(), name
    records = [json.loads(line) for line in (learned / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["event"] == "start" and start["read_mode"] == "memory" and start["fold_novel"] == [1, 2, 3, 4, 5]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == LEARN_EPOCHS * start["steps_per_epoch"]
    waits = [r["data_wait_fraction"] for r in records if "loss" in r]
    assert all(0.0 <= w < 1.0 for w in waits)
    summary = json.loads((learned / "summary.json").read_text())
    assert summary["steps"] == steps[-1] and 0.0 <= summary["data_wait_fraction"] < 1.0
    assert summary["pretrained_features"] is False
    assert sorted(p.name for p in (learned / "checkpoints").glob("step-*")) == [
        f"step-{s:08d}" for s in (steps[-1] - start["steps_per_epoch"], steps[-1])]  # the last two kept
    assert_same_weights(latest_checkpoint(learned), learned)


def test_saved_config_round_trips_and_rebuilds_the_model(gen, learned):
    saved = json.loads((learned / "config.json").read_text())
    config = from_dict(TrainConfig, saved)
    assert config.model.vision_dim == 32 and config.model.text_dim == 384  # dims from the two stores
    assert config.model.decoder.out_size == 64 and config.preset == "tiny"
    assert resume_identity(config) == resume_identity(saved)
    assert to_dict(config) == saved
    model, loaded = load_model(learned)
    assert loaded == config
    checkpoint_model, _ = load_model(latest_checkpoint(learned))
    for (name, a), (_, b) in zip(model.state_dict().items(), checkpoint_model.state_dict().items()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- #
# Resume
# --------------------------------------------------------------------------- #

RESUME_EPOCHS = ("optim.epochs=3", "model.fusion.dropout=0.1", "checkpoint_every=2")


@pytest.fixture(scope="module")
def straight(gen, tmp_path_factory) -> Path:
    """Run A: no interruption. Dropout is on, so equality also needs the RNG state restored."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(config=tiny_config(gen, run, *RESUME_EPOCHS), quiet=True)
    return run


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.safetensors", "train_state.pt", "config.json"))


@pytest.mark.reliability
@pytest.mark.processes
def test_killed_run_resumes_to_the_same_bits(gen, straight, tmp_path):
    run = tmp_path / "run"
    script = ("import torch; torch.set_num_threads(1)\n"
              "from pipeline.training.config import build_config\nfrom pipeline.training.loop import train\n"
              f"train(config=build_config(preset='tiny', overrides={train_overrides(gen, run, *RESUME_EPOCHS)!r}), "
              "quiet=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    pointer, seen_steps = run / "checkpoints" / "latest", []
    try:
        while proc.poll() is None:
            if pointer.is_file():
                named = run / "checkpoints" / pointer.read_text().strip()
                assert _complete(named), f"latest names an incomplete {named.name}"
                seen_steps.append(int(named.name.split("-")[1]))
                if seen_steps[-1] >= 2:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "model.safetensors").exists()  # killed before the end
    # A save killed half-way leaves a hidden temporary folder; resuming must not use it.
    junk = run / "checkpoints" / ".step-00009999.tmp"
    junk.mkdir(exist_ok=True)
    (junk / "model.safetensors").write_bytes(b"half a file")

    train(config=tiny_config(gen, run, *RESUME_EPOCHS), resume=True, quiet=True)
    assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)  # each step logged once, with the same loss


@pytest.mark.reliability
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_a_full_disk_or_read_only_run_folder_is_one_line_and_resumes_to_the_same_bits(gen, straight, tmp_path,
                                                                                         monkeypatch, capsys, error):
    import pipeline.training.checkpoints as checkpoints
    from pipeline.errors import run_entry

    run, save, calls = tmp_path / "run", checkpoints.save_file, []

    def second_save_fails(state, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the OS refuses the write half-way through the second checkpoint
            Path(path).write_bytes(b"half")
            raise type(error)(error.errno, error.strerror, path)
        return save(state, path, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_file", second_save_fails)
        code = run_entry(lambda: train(config=tiny_config(gen, run, *RESUME_EPOCHS), quiet=True))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "run the same command again" in err and ".step-" in err
    train(config=tiny_config(gen, run, *RESUME_EPOCHS), resume=True, quiet=True)
    assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)


@pytest.mark.reliability
def test_a_file_size_limit_inside_torchs_checkpoint_writer_is_one_line_and_resumes_to_the_same_bits(
        gen, straight, tmp_path, monkeypatch, capsys):
    """A real EFBIG from the OS (``ulimit -f``) inside torch's own writer of the second checkpoint."""
    import resource

    import pipeline.training.checkpoints as checkpoints
    from pipeline.errors import run_entry

    run, save, calls = tmp_path / "run", checkpoints.torch.save, []

    def under_a_limit(obj, handle, **kwargs):
        calls.append(handle)
        if len(calls) != 2:
            return save(obj, handle, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # the soft limit only: raised back below
        try:
            return save(obj, handle, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints.torch, "save", under_a_limit)
        code = run_entry(lambda: train(config=tiny_config(gen, run, *RESUME_EPOCHS), quiet=True))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "file too large writing" in err and "ulimit -f" in err and "run the same command again" in err, err
    train(config=tiny_config(gen, run, *RESUME_EPOCHS), resume=True, quiet=True)
    assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)


@pytest.mark.reliability
def test_resume_may_raise_max_steps_and_still_match(gen, straight, tmp_path):
    run = tmp_path / "run"
    first = train(config=tiny_config(gen, run, *RESUME_EPOCHS, "optim.max_steps=5"), quiet=True)
    assert first["steps"] == 5 and latest_checkpoint(run).name == "step-00000005"
    # As if killed after logging steps 6 and 7 but before their checkpoint: they must not be logged twice.
    ahead = [line for line in (straight / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("step") in (6, 7)]
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("\n".join(ahead) + "\n")
    train(config=tiny_config(gen, run, *RESUME_EPOCHS), resume=True, quiet=True)
    assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)
    with pytest.raises(UserError, match="already holds a run"):
        train(config=tiny_config(gen, run, *RESUME_EPOCHS), quiet=True)
    with pytest.raises(UserError, match="different config"):
        train(config=tiny_config(gen, run, *RESUME_EPOCHS, "optim.lr=0.002"), resume=True, quiet=True)
    with pytest.raises(UserError, match="no checkpoint"):
        train(config=tiny_config(gen, tmp_path / "empty", *RESUME_EPOCHS), resume=True, quiet=True)


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #


@pytest.mark.reliability
def test_latest_checkpoint_ignores_leftovers_and_survives_a_lost_pointer(learned, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(learned, run)
    folder = run / "checkpoints"
    newest = sorted(folder.glob("step-*"))[-1]
    (folder / ".step-99999999.tmp").mkdir()
    (folder / ".step-99999999.tmp" / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(run) == newest
    (folder / "latest").write_text("step-99999999\n")  # names a folder whose rename never happened
    assert latest_checkpoint(run) == newest
    (folder / "latest").unlink()
    assert latest_checkpoint(run) == newest
    (newest / "train_state.pt").unlink()  # an incomplete folder is never chosen
    assert latest_checkpoint(run) == sorted(folder.glob("step-*"))[-2]
    shutil.rmtree(folder)
    assert latest_checkpoint(run) is None
    with pytest.raises(UserError, match="no trained model"):
        load_model(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- #
# Config and schedules
# --------------------------------------------------------------------------- #


def test_build_config_is_strict_and_applies_presets():
    with pytest.raises(UserError, match="optim.epoch"):
        build_config(overrides=["optim.epoch=3"])
    with pytest.raises(UserError, match="optim.epochs"):
        build_config(overrides=["optim.epochs=many"])
    with pytest.raises(UserError, match="data.novel_pixels"):
        build_config(overrides=["data.novel_pixels=zero"])
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        build_config(preset="huge")
    tiny = build_config(preset="tiny")
    assert (tiny.model.fusion.width, tiny.model.fusion.layers, tiny.preset) == (32, 1, "tiny")
    paper = build_config()
    assert (paper.model.fusion.width, paper.model.fusion.layers, paper.model.fusion.heads) == (512, 12, 8)
    assert (paper.optim.epochs, paper.optim.warmup_epochs, paper.optim.batch_size) == (510, 10, 32)
    from_file = build_config(base={"preset": "small", "optim": {"lr": 5e-4}}, overrides=["model.fusion.layers=3"])
    assert (from_file.model.fusion.width, from_file.model.fusion.layers, from_file.optim.lr) == (64, 3, 5e-4)
    # YAML and --set read a bare 1 as an integer; it still means one pair per sample.
    assert build_config(overrides=["data.classes_per_sample=1"]).data.classes_per_sample == "1"
    assert build_config(overrides=["data.classes_per_sample=all"]).data.classes_per_sample == "all"


def test_resume_identity_ignores_only_how_far_and_where():
    base = build_config(preset="tiny")
    same = build_config(preset="tiny", overrides=["optim.max_steps=7", "out=elsewhere", "log_every=3",
                                                  "checkpoint_every=5"])
    assert resume_identity(base) == resume_identity(same)
    for change in ("optim.lr=0.01", "seed=1", "data.classes_per_sample=all", "optim.epochs=20"):
        assert resume_identity(build_config(preset="tiny", overrides=[change])) != resume_identity(base), change


def test_learning_rate_and_weight_decay_schedules():
    optim = build_config(overrides=["optim.epochs=12", "optim.warmup_epochs=2"]).optim
    lrs = [lr_at(step=s, steps_per_epoch=10, optim=optim) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 20) and lrs[19] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:20]))  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # then cosine decay
    assert lr_at(step=120, steps_per_epoch=10, optim=optim) == pytest.approx(2e-6)
    wds = [wd_at(step=s, steps_per_epoch=10, optim=optim) for s in (0, 60, 120)]
    assert wds == pytest.approx([0.01, 0.205, 0.4])


# --------------------------------------------------------------------------- #
# Protocols against the store's classes
# --------------------------------------------------------------------------- #


def test_protocol_must_match_the_stores_classes(gen, tmp_path):
    with pytest.raises(UserError, match="protocol 'coco20i' classes do not match"):
        train(config=tiny_config(gen, tmp_path / "a", "data.protocol=coco20i"), quiet=True)
    with pytest.raises(UserError, match="folds 0..3, not 4"):
        train(config=tiny_config(gen, tmp_path / "b", "data.fold=4"), quiet=True)
    with pytest.raises(UserError, match="needs data.novel"):
        train(config=tiny_config(gen, tmp_path / "c", "data.protocol=custom"), quiet=True)
    custom = train(config=tiny_config(gen, tmp_path / "e", "data.protocol=custom", 'data.novel=["cat"]',
                                      "optim.max_steps=2"), quiet=True)
    assert custom["steps"] == 2


def test_pascal5i_on_a_coco_class_store_is_refused(coco128, tmp_path):
    ids = sorted(p.stem for p in (coco128 / "images").glob("*.jpg"))[:2]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    extract(config=ExtractConfig(backbone="test-vit", out=str(tmp_path / "store"), dataset="folder",
                                 data_root=str(coco128), dataset_options={"list_file": str(tmp_path / "ids.txt")},
                                 input_size=32, random_init=True, vision_only=True, device="cpu"), quiet=True)
    config = build_config(preset="tiny", overrides=[f"data.cache={tmp_path / 'store'}", "data.split=folder/train",
                                                    "data.protocol=pascal5i", f"out={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="protocol 'pascal5i' classes do not match the store's \\(20 vs 80"):
        train(config=config, quiet=True)
