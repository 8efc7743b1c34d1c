"""The notebook API: keyword-only calls that return data, on the generated cache and the real photos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import write_folder_dataset

import pipeline
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.processes
def test_import_pipeline_is_cheap_and_makes_open_clip_importable():
    script = ("import sys, pipeline\n"
              "assert 'torch' not in sys.modules, 'import pipeline imported torch'\n"
              "import open_clip, torchvision\n"
              "assert callable(pipeline.extract) and 'predict' in dir(pipeline)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_api_functions_are_keyword_only_and_documented():
    import inspect

    for name in pipeline.__all__:
        function = getattr(pipeline, name)
        assert function.__doc__, name
        params = list(inspect.signature(function).parameters.values())
        if name == "create_encoder":  # create_encoder("clip-l"), as open_clip's create_model takes its name
            params = params[1:]
        assert {p.kind for p in params} <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}, name


def test_extract_returns_its_report_and_refuses_unknown_settings(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", sizes=((48, 64), (40, 40)))
    report = pipeline.extract(backbone="test-vit", out=tmp_path / "store", dataset="folder", data_root=data,
                              input_size=32, random_init=True, device="cpu", views=2)
    assert report["views"] == 4 and report["pretrained"] is False
    said = capsys.readouterr().err  # the command line's progress and notes, in a notebook too
    assert "extract" in said and "4/4" in said and "note: random-init weights" in said
    pipeline.extract(backbone="test-vit", out=tmp_path / "quiet", dataset="folder", data_root=data,
                     input_size=32, random_init=True, device="cpu", views=2, quiet=True)
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="unknown config key 'viewz'"):
        pipeline.extract(backbone="test-vit", out=tmp_path / "other", dataset="folder", data_root=data, viewz=2)


def test_train_evaluate_predict_round_trip(gen, tmp_path, capsys):
    run = tmp_path / "run"
    summary = pipeline.train(cache=gen.vision, text_cache=gen.text, out=run, split="folder/train", preset="tiny",
                             config={"optim": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}})
    assert summary["steps"] > 0 and np.isfinite(summary["final_loss"])
    assert (run / "model.safetensors").is_file()
    said = capsys.readouterr().err
    assert f"{summary['steps']}/{summary['steps']}" in said and "note: trained on random-init features" in said
    scores = pipeline.evaluate(run=run, split="folder/val", min_pixels=1, device="cpu")
    assert 0.0 <= scores["miou"] <= 100.0 and scores["episodes"] > 0
    assert "note: scored on random-init features" in capsys.readouterr().err
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(photo)
    result = pipeline.predict(image=photo, classes=["cat", "dog"], run=run)
    assert result["label_map"].shape == (70, 90) and result["label_map"].max() <= 2
    assert result["probabilities"].shape == (2, 70, 90)
    assert not (tmp_path / "prediction.json").exists()
    assert "note: random-init vision tower" in capsys.readouterr().err
    written = pipeline.predict(image=photo, classes=["cat"], run=run, out=tmp_path / "pred", quiet=True)
    assert (tmp_path / "pred" / "prediction.json").is_file() and written["label_map"].shape == (70, 90)
    assert capsys.readouterr().err == ""


def test_train_config_refuses_an_unknown_key(gen, tmp_path):
    with pytest.raises(UserError, match="unknown config key 'optim.epoch'"):
        pipeline.train_config(cache=gen.vision, out=tmp_path, config={"optim": {"epoch": 3}})


def test_build_model_takes_a_nested_config():
    model = pipeline.build_model(vision_dim=64, text_dim=32, preset="tiny", config={"fusion": {"layers": 1}})
    assert sum(1 for _ in model.modules() if type(_).__name__ == "Block") == 1
    assert model.config.vision_dim == 64 and model.config.text_dim == 32


def test_run_study_dry_run_plans_and_returns_data(gen, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"""name: api
out: {tmp_path / "out"}
pairs:
  - {{label: generated, vision: {gen.vision}, text: {gen.text}}}
eval: {{split: folder/val}}
base: {{preset: tiny, data: {{protocol: pascal5i, split: folder/train}}, optim: {{max_steps: 2}}}}
grid: {{folds: [0, 1], variants: {{full: {{}}, no-decoder: {{model.decoder.enabled: false}}}}}}
table: {{rows: [variant], columns: fold}}
""")
    plan = pipeline.run_study(study=study, dry_run=True)
    assert plan["plan"].startswith("4 runs: 4 pending")
    assert plan["failed"] == [] and plan["table"] == ""


@pytest.mark.reliability
@pytest.mark.parametrize("config", ["optim.epochs=3", ["optim", 3], 7])
def test_a_config_that_is_not_a_dict_is_the_one_line_error(tmp_path, config):
    for call in (lambda: pipeline.train_config(cache=tmp_path, out=tmp_path / "run", config=config),
                 lambda: pipeline.train(cache=tmp_path, out=tmp_path / "run", config=config),
                 lambda: pipeline.build_model(vision_dim=8, text_dim=8, config=config)):
        with pytest.raises(UserError, match="config must be a dict of changes") as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.reliability
@pytest.mark.parametrize(("classes", "message"), [([None, 1], "classes must be strings, got None"),
                                                  (["cat", 1], "classes must be strings, got 1"),
                                                  ("cat, dog", "non-empty list of names"),
                                                  ([], "non-empty list of names")])
def test_class_names_that_are_not_strings_are_the_one_line_error(tmp_path, classes, message):
    with pytest.raises(UserError, match=message):
        pipeline.predict(image=tmp_path / "photo.png", classes=classes, run=tmp_path / "run", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
