"""Stage two through the command line, as a user runs it: train, eval, predict, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main
from pipeline.data.synthetic import make_shapes_dataset, split_lists
from pipeline.plots import CAVEAT_KEY, RANDOM_INIT_CAVEAT


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Generated shapes, a test-vit (random-init, 32 px) vision cache and a MiniLM text cache."""
    root = tmp_path_factory.mktemp("stage2")
    data = make_shapes_dataset(out=root / "data", count=16, size=(48, 64))
    train_list, val_list = split_lists(root=data, out=root)
    vision, text = root / "test-vit", root / "minilm"
    common = ["extract", "--backbone", "test-vit", "--random-init", "--input-size", "32", "--dataset", "folder",
              "--data-root", str(data), "--out", str(vision), "--vision-only", "--quiet"]
    assert main(common + ["--split", "train", "--views", "2", "--option", f"list_file={train_list}"]) == 0
    assert main(common + ["--split", "val", "--option", f"list_file={val_list}"]) == 0
    assert main(["extract", "--backbone", "minilm", "--text-only", "--dataset", "folder", "--data-root", str(data),
                 "--out", str(text), "--quiet"]) == 0
    return {"root": root, "data": data, "vision": vision, "text": text}


@pytest.fixture(scope="module")
def trained(caches) -> Path:
    run = caches["root"] / "run"
    code = main(["train", "--cache", str(caches["vision"]), "--text-cache", str(caches["text"]), "--protocol",
                 "custom", "--novel", "star,ring", "--preset", "tiny", "--out", str(run), "--quiet",
                 "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=1", "--set", "optim.batch_size=8"])
    assert code == 0
    return run


def test_train_writes_safetensors_config_metrics_and_curves(trained: Path) -> None:
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["data"]["novel"] == ["star", "ring"] and config["preset"] == "tiny"
    assert (trained / "checkpoints" / "latest").read_text().strip().startswith("step-")
    steps = [json.loads(line).get("step") for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == json.loads((trained / "summary.json").read_text())["steps"]  # the curve reaches the end
    assert Image.open(trained / "curves.png").text[CAVEAT_KEY] == RANDOM_INIT_CAVEAT  # random-init features


def test_eval_prints_and_saves_the_fold_table(trained: Path, capsys) -> None:
    assert main(["eval", str(trained), "--split", "folder/val", "--min-pixels", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| model | fold 0 | mean | FB-IoU |" in printed
    assert "random-init" in printed
    results = json.loads((trained / "eval.json").read_text())
    assert results[0]["episodes"] > 0 and 0.0 <= results[0]["miou"] <= 100.0
    assert set(results[0]["per_class"]) <= {"star", "ring"}
    assert (trained / "per_class.csv").read_text().startswith("run,fold,class,iou")


def test_predict_writes_one_mask_per_class_and_an_overlay(trained: Path, caches, tmp_path: Path) -> None:
    photo = next((caches["data"] / "images").iterdir())
    out = tmp_path / "pred"
    names = "circle, square, zebra crossing"  # the last name is in no store: encoded on demand
    assert main(["predict", str(photo), "--classes", names, "--checkpoint", str(trained), "--out", str(out),
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["classes"] == ["circle", "square", "zebra crossing"]
    labels = np.asarray(Image.open(out / "labels.png"))
    height, width = np.asarray(Image.open(photo)).shape[:2]
    assert labels.shape == (height, width) and labels.max() <= 3
    for j, name in enumerate(summary["classes"]):
        mask = np.asarray(Image.open(out / summary["masks"][name]))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert np.array_equal(mask == 255, labels == j + 1)
        assert summary["coverage"][name] == pytest.approx((labels == j + 1).mean())
    assert (out / "overlay.png").stat().st_size > 1000
    assert summary["legend"] == "legend.png"  # the key to labels.png's colours
    for picture in ("overlay.png", "labels.png", "legend.png", *summary["masks"].values()):  # random-init tower
        assert Image.open(out / picture).text[CAVEAT_KEY] == RANDOM_INIT_CAVEAT, picture


@pytest.mark.reliability
def test_stage_two_user_errors_are_one_line_with_exit_code_2(trained: Path, caches, capsys, tmp_path) -> None:
    cases = [
        ["train", "--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
        ["train", "--cache", str(caches["vision"]), "--set", "optim.nope=1", "--out", str(tmp_path / "r")],
        ["train", "--cache", str(caches["vision"]), "--set", "optim.epochs=many", "--out", str(tmp_path / "r")],
        ["train", "--cache", str(caches["vision"]), "--protocol", "pascal5i", "--out", str(tmp_path / "r")],
        ["train", "--cache", str(caches["vision"]), "--preset", "huge", "--out", str(tmp_path / "r")],
        ["train", "--cache", str(caches["vision"]), "--text-cache", str(caches["text"]), "--protocol", "custom",
         "--novel", "star", "--out", str(trained)],  # an existing run without --resume
        ["eval", str(tmp_path / "no-run")],
        ["predict", str(tmp_path / "no.jpg"), "--classes", "cat", "--checkpoint", str(trained)],
        ["predict", str(next((caches["data"] / "images").iterdir())), "--classes", " , ", "--checkpoint", str(trained)],
    ]
    for args in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (args, err)


def test_eval_accepts_a_bare_split_name(trained: Path, capsys) -> None:
    assert main(["eval", str(trained), "--split", "val", "--min-pixels", "16", "--quiet", "--out",
                 str(trained.parent / "eval-bare")]) == 0
    assert "folder/val" in (trained.parent / "eval-bare" / "eval.json").read_text()


def test_run_files_are_readable_by_the_group_like_everything_else(trained: Path) -> None:
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    weights = [trained / "model.safetensors", *trained.glob("checkpoints/step-*/model.safetensors")]
    assert len(weights) >= 2
    for path in weights:  # safetensors writes 0600 by itself
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def _copy_elsewhere(run: Path, target: Path, *, keep_inputs: bool = True) -> Path:
    """The run folder as it arrives on another machine: none of its stores exist there."""
    import shutil

    copy = shutil.copytree(run, target / "copied-run")
    config = json.loads((copy / "config.json").read_text())
    config["data"].update(cache="cache/test-vit", text_cache="cache/minilm")  # relative, as a user types them
    (copy / "config.json").write_text(json.dumps(config))
    if keep_inputs:
        inputs = json.loads((copy / "inputs.json").read_text())
        inputs.update(vision_store="/nowhere/test-vit", text_store="/nowhere/minilm")
        (copy / "inputs.json").write_text(json.dumps(inputs))
    else:
        (copy / "inputs.json").unlink()
    return copy


def test_a_copied_run_predicts_new_names_without_its_stores(trained: Path, caches, tmp_path, monkeypatch) -> None:
    photo = next((caches["data"] / "images").iterdir())
    inputs = json.loads((trained / "inputs.json").read_text())
    assert inputs["vision_store"] == str(caches["vision"].resolve()) and inputs["vision"]["encoder"] == "test-vit"
    assert inputs["text"]["encoder"] == "minilm" and len(inputs["text"]["templates"]) == 32
    assert inputs["vision"]["mean"] and inputs["class_names"][:2] == ["circle", "square"]
    reference = tmp_path / "reference"
    names = "star, square, zebra crossing"  # trained with, trained with, new
    assert main(["predict", str(photo), "--classes", names, "--checkpoint", str(trained), "--out", str(reference),
                 "--device", "cpu"]) == 0
    copy = _copy_elsewhere(trained, tmp_path / "machine2")
    monkeypatch.chdir(tmp_path / "machine2")
    assert main(["predict", str(photo), "--classes", names, "--checkpoint", str(copy), "--out", "pred",
                 "--device", "cpu"]) == 0
    same = np.asarray(Image.open(reference / "labels.png")), np.asarray(Image.open(Path("pred") / "labels.png"))
    assert np.array_equal(*same)  # the kept embeddings and the rebuilt encoders give the same answer


def test_an_older_run_without_its_stores_says_what_to_do(trained: Path, caches, tmp_path, capsys) -> None:
    photo = next((caches["data"] / "images").iterdir())
    copy = _copy_elsewhere(trained, tmp_path, keep_inputs=False)
    capsys.readouterr()
    assert main(["predict", str(photo), "--classes", "star", "--checkpoint", str(copy), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and "extract" not in err and err.count("\n") == 1, err


def test_no_evaluation_episode_says_which_option_gives_some(trained: Path, capsys) -> None:
    assert main(["eval", str(trained), "--split", "folder/val", "--min-pixels", "1000000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no evaluation episode" in err and "lower --min-pixels" in err and "--episode-lists" in err, err
    assert err.count("\n") == 1
