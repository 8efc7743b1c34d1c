"""Online mode: the frozen encoder on fresh augmentations at every step, same model, config, checkpoints and eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import cli
from pipeline.config import from_dict
from pipeline.encode.extract import extract
from pipeline.encode.config import ExtractConfig
from pipeline.errors import UserError
from pipeline.training.config import TrainConfig, build_config
from pipeline.training.loop import prepare_data, train

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


@pytest.fixture(scope="module")
def eval_store(coco128, tmp_path_factory) -> Path:
    """coco128's images resized whole by the same random-init CLIP-B, with its class-name embeddings."""
    out = tmp_path_factory.mktemp("online") / "test-vit"
    extract(config=ExtractConfig(backbone="test-vit", out=str(out), dataset="folder", data_root=str(coco128),
                                 split="val", eval_resize=True, input_size=SIZE, random_init=True, device="cpu"),
            quiet=True)
    return out


def _online(coco128: Path, store: Path, out: Path, *extra: str):
    return build_config(preset="tiny", overrides=[
        "data.online.enabled=true", f"data.online.data_root={coco128}", "data.online.backbone=test-vit",
        "data.online.random_init=true", f"data.online.input_size={SIZE}", "data.online.workers=0",
        f"data.cache={store}", "data.protocol=coco20i", "data.fold=0", "optim.batch_size=4", "optim.epochs=2",
        "optim.warmup_epochs=1", "device=cpu", "log_every=1", f"out={out}", *extra])


@pytest.mark.processes
def test_online_train_then_eval_from_the_command_line(coco128, eval_store, tmp_path, capsys):
    run = tmp_path / "online"
    code = cli.main(["train", "--online", "--data-root", str(coco128), "--backbone", "test-vit", "--random-init",
                     "--cache", str(eval_store), "--protocol", "coco20i", "--fold", "0", "--preset", "tiny",
                     "--set", f"data.online.input_size={SIZE}", "--set", "data.online.workers=2",
                     "--set", "optim.max_steps=3", "--set", "optim.batch_size=4", "--set", "device=cpu",
                     "--out", str(run), "-q"])
    assert code == 0, capsys.readouterr().err
    # The files of a cached run, and a config that loads as one.
    for name in ("config.json", "model.safetensors", "summary.json", "metrics.jsonl", "checkpoints/latest"):
        assert (run / name).exists(), name
    config = from_dict(TrainConfig, json.loads((run / "config.json").read_text()))
    assert config.data.online.enabled and config.model.vision_dim == 32 and config.model.decoder.out_size == SIZE
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["read_mode"] == "online" and start["samples"] > 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert load_file(str(run / "model.safetensors"))
    capsys.readouterr()
    # `fusioner eval` as for a cached run: the vision and text stores default to the run's data.cache.
    assert cli.main(["eval", str(run), "--split", "folder/val", "-q"]) == 0
    assert "mIoU" in capsys.readouterr().out or (run / "eval.json").exists()


def test_online_run_resumes_to_the_same_bits(coco128, eval_store, tmp_path):
    straight = tmp_path / "straight"
    train(config=_online(coco128, eval_store, straight, "optim.max_steps=4"), quiet=True)
    parted = tmp_path / "parted"
    train(config=_online(coco128, eval_store, parted, "optim.max_steps=2", "checkpoint_every=1"), quiet=True)
    train(config=_online(coco128, eval_store, parted, "optim.max_steps=4", "checkpoint_every=1"), resume=True,
          quiet=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(parted / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_online_and_cached_count_epochs_alike(coco128, eval_store, tmp_path):
    prepared = prepare_data(_online(coco128, eval_store, tmp_path / "x"))
    pairs = {(image, classes) for image, classes in prepared.samples}
    assert len(pairs) == len(prepared.samples)  # one sample per (image, seen class)
    assert all(len(classes) == 1 and classes[0] in prepared.fold.seen for _, classes in prepared.samples)
    assert prepared.split.grid == (SIZE // 16, SIZE // 16) and prepared.vision_dim == 32


def test_online_without_a_data_root_is_one_line(eval_store, tmp_path):
    config = build_config(preset="tiny", overrides=["data.online.enabled=true", "data.online.backbone=test-vit",
                                                    f"data.cache={eval_store}", f"out={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="data root"):
        train(config=config, quiet=True)
    assert cli.main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2


def test_online_refuses_the_device_augmentation_in_one_line(tmp_path):
    from pipeline.training.online import prepare_online

    config = build_config(preset="tiny", overrides=["data.online.enabled=true", "data.online.backbone=test-vit",
                                                    f"data.online.data_root={tmp_path}",
                                                    "data.online.augment.backend=gpu", f"out={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="augment.backend") as err:
        prepare_online(config)
    assert "\n" not in str(err.value)
