"""Stores that must not be mixed: evaluation and prediction check a run's recorded identity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cli import main as cli_main
from pipeline.encode.registry import DATASET_STATS
from pipeline.errors import UserError
from pipeline.eval.identity import check_allow
from pipeline.store.layout import open_store, store_attrs

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy_with(source, target, edit, *, node: str = "") -> str:
    """A copy of store ``source`` whose ``node``'s attributes ``edit`` changed (a planted mismatch)."""
    shutil.copytree(source, target)
    meta = target / node / "zarr.json" if node else target / "zarr.json"
    data = json.loads(meta.read_text())
    edit(data["attributes"])
    meta.write_text(json.dumps(data))
    return str(target)


def _eval(capsys, run, out, *extra) -> tuple[int, str]:
    code = cli_main(["eval", str(run), "--split", "folder/val", "--limit", "2", "--min-pixels", "64",
                     "--out", str(out), "-q", *extra])
    return code, capsys.readouterr().err.strip()


def _refused(capsys, run, out, *extra) -> str:
    code, err = _eval(capsys, run, out, *extra)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (out / "eval.json").exists()
    return err


def test_another_encoders_store_of_the_same_width_is_refused_then_allowed_and_labelled(gen, learned, tmp_path, capsys):
    trained = store_attrs(open_store(gen.vision))["encoder"]
    other = _copy_with(gen.vision, tmp_path / "rn", lambda a: a["fusioner"].update(encoder="clip-rn101"))
    err = _refused(capsys, learned, tmp_path / "out", "--cache", other)
    assert f"vision encoder: trained on {trained} features" in err and "holds clip-rn101" in err
    assert "--allow-mismatch encoder" in err
    code, err = _eval(capsys, learned, tmp_path / "out", "--cache", other, "--allow-mismatch", "encoder")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert record["label"].startswith("clip-rn101 + ") and "vision encoder" in record["mismatches_allowed"][0]
    assert "--allow-mismatch" in (tmp_path / "out" / "table.md").read_text()


def test_other_weights_are_refused(gen, learned, tmp_path, capsys):
    other = _copy_with(gen.vision, tmp_path / "w",
                       lambda a: a["fusioner"]["weights"].update(source="/elsewhere/other.pt", sha256="ab" * 32))
    assert "vision weights" in _refused(capsys, learned, tmp_path / "out", "--cache", other)


def test_a_store_at_another_input_size_is_one_line_not_a_traceback(gen, learned, tmp_path, capsys):
    other = _copy_with(gen.vision, tmp_path / "big", lambda a: a["fusioner"].update(input_size=128, grid=[8, 8]))
    err = _refused(capsys, learned, tmp_path / "out", "--cache", other)
    assert "input size: trained at 64 px" in err and "holds 128 px" in err


def test_an_evaluation_split_normalised_otherwise_is_refused_unless_allowed(gen, learned, tmp_path, capsys):
    mean, std = DATASET_STATS["coco"]
    coco = {"name": "coco", "mean": list(mean), "std": list(std)}
    other = _copy_with(gen.vision, tmp_path / "coco", lambda a: a["meta"].update(normalize=coco), node="folder/val")
    err = _refused(capsys, learned, tmp_path / "out", "--cache", other)
    assert "normalisation" in err and "coco statistics" in err and "--allow-mismatch normalize" in err
    code, err = _eval(capsys, learned, tmp_path / "out", "--cache", other, "--allow-mismatch", "normalize")
    assert code == 0, err
    allowed = json.loads((tmp_path / "out" / "eval.json").read_text())[0]["mismatches_allowed"]
    assert len(allowed) == 1 and allowed[0].startswith("normalisation")


def test_class_embeddings_of_other_words_are_refused(gen, learned, tmp_path, capsys):
    recorded = json.loads((learned / "inputs.json").read_text())["class_words"]
    assert recorded in ("raw", "natural")
    flipped = "raw" if recorded == "natural" else "natural"
    other = _copy_with(gen.text, tmp_path / "words", lambda a: a.update(class_words=flipped), node="text")
    err = _refused(capsys, learned, tmp_path / "out", "--text-cache", other)
    assert f"class words: trained with {recorded} class names" in err


def test_the_runs_own_stores_pass_and_record_nothing(learned, tmp_path, capsys):
    code, err = _eval(capsys, learned, tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "eval.json").read_text())[0]["mismatches_allowed"] == []


def test_unknown_aspects_are_refused():
    assert check_allow(["encoder,normalize", "encoder"]) == ("encoder", "normalize")
    with pytest.raises(UserError, match="unknown aspect 'size'"):
        check_allow(["size"])


def test_prediction_refuses_a_reachable_store_that_is_not_the_runs(gen, learned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(learned, run)
    other = _copy_with(gen.vision, tmp_path / "rn", lambda a: a["fusioner"].update(encoder="clip-rn101"))
    config = json.loads((run / "config.json").read_text())
    config["data"]["cache"] = other  # the store the run names is now another encoder's
    (run / "config.json").write_text(json.dumps(config))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(photo)
    code = cli_main(["predict", str(photo), "--classes", "cat", "--checkpoint", str(run), "--out",
                     str(tmp_path / "pred"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "vision encoder" in err, err
    assert not (tmp_path / "pred" / "prediction.json").exists()
