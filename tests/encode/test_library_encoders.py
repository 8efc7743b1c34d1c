"""Encoders named by their library (open_clip:, timm:, hf:): entries derived from the library's own
configuration, recorded in the store, and extract -> train -> eval on real photos, random-init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from cli import main
from pipeline.encode.registry import get_spec
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def test_entries_come_from_the_libraries_own_configs():
    dinov2 = get_spec("timm:vit_large_patch14_dinov2.lvd142m")
    assert (dinov2.family, dinov2.patch_size, dinov2.input_size, dinov2.vision_dim) == ("timm", 14, 518, 1024)
    assert dinov2.grid() == (37, 37) and dinov2.mean == (0.485, 0.456, 0.406)
    assert dinov2.hub_name == "vit_large_patch14_dinov2.lvd142m" and dinov2.weights_tag == "lvd142m"
    siglip = get_spec("open_clip:ViT-SO400M-14-SigLIP/webli")
    assert (siglip.patch_size, siglip.vision_dim, siglip.text_dim, siglip.mean) == (14, 1152, 1152, (0.5, 0.5, 0.5))
    small = get_spec("open_clip:ViT-S-16")
    assert (small.patch_size, small.vision_dim, small.text_dim, small.weights_tag) == (16, 384, 384, "local-file")
    assert get_spec("timm:vit_tiny_patch16_224").mean == (0.5, 0.5, 0.5)  # augreg's own statistics


@pytest.mark.parametrize(("name", "needle"), [
    ("open_clip:ViT-Q-99", "open_clip has no model 'ViT-Q-99'"),
    ("open_clip:ViT-B-16/nosuchtag", "no pretrained tag 'nosuchtag' for ViT-B-16 (its tags: openai"),
    ("timm:resnet_nope", "timm has no model 'resnet_nope'"),
    ("timm:resnet50", "timm:resnet50 cannot be built as a ViT with patch tokens"),
    ("hf:/nonexistent/folder", "no config.json in the hub cache or at that path"),
    ("timm:", "name the model after 'timm:'"),
])
def test_unknown_library_names_are_one_line(name, needle):
    with pytest.raises(UserError) as info:
        get_spec(name)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_encoders_explains_the_library_forms(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for form in ("open_clip:ARCH[/TAG]", "timm:NAME[.TAG]", "hf:REPO", "--random-init", "clip-l"):
        assert form in out


def _hub_cache(home: Path, repo: str) -> None:
    """A Hugging Face hub cache holding one repository's snapshot (config + tokenizer), as a download leaves it."""
    from released_layouts import tiny_bert_folder

    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    tiny_bert_folder(folder / "snapshots" / commit, tokenizer=True)
    (folder / "snapshots" / commit / "model.safetensors").unlink()  # random-init needs no weights
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def _lists(coco128: Path, tmp: Path) -> tuple[Path, Path]:
    images = sorted(p.stem for p in (coco128 / "images").glob("*.jpg"))
    train, val = tmp / "train.txt", tmp / "val.txt"
    train.write_text("\n".join(images[:12]) + "\n")
    val.write_text("\n".join(images[12:18]) + "\n")
    return train, val


def _extract_vision(name: str, coco128: Path, out: Path, lists: tuple[Path, Path], *extra: str) -> None:
    common = ["extract", "--backbone", name, "--random-init", "--input-size", "32", "--dataset", "folder",
              "--data-root", str(coco128), "--out", str(out), "--quiet", *extra]
    assert main(common + ["--split", "train", "--views", "1", "--option", f"list_file={lists[0]}"]) == 0
    assert main(common + ["--split", "val", "--vision-only", "--eval-resize", "--option", f"list_file={lists[1]}"]) == 0


def _train_and_eval(vision: Path, text: Path, run: Path, capsys) -> None:
    assert main(["train", "--cache", str(vision), "--text-cache", str(text), "--protocol", "custom", "--novel",
                 "dog,cat,bus", "--preset", "tiny", "--out", str(run), "--quiet", "--set", "optim.epochs=1",
                 "--set", "optim.warmup_epochs=0", "--set", "optim.batch_size=8"]) == 0
    assert main(["eval", str(run), "--split", "folder/val", "--min-pixels", "16", "--device", "cpu", "--quiet"]) == 0
    assert "mIoU" in capsys.readouterr().out or (run / "eval.json").exists()


def _identity(store: Path) -> dict:
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    return next(v for v in attrs.values() if isinstance(v, dict) and "encoder" in v)


def test_a_timm_name_and_a_transformers_folder_run_extract_train_eval(coco128, tmp_path, capsys):
    from released_layouts import tiny_bert_folder

    lists = _lists(coco128, tmp_path)
    folder = tiny_bert_folder(tmp_path / "tiny-bert", tokenizer=True)
    text, vision = tmp_path / "cache" / "text", tmp_path / "cache" / "timm"
    assert main(["extract", "--backbone", f"hf:{folder}", "--random-init", "--text-only", "--dataset", "folder",
                 "--data-root", str(coco128), "--out", str(text), "--quiet"]) == 0
    _extract_vision("timm:vit_tiny_patch16_224", coco128, vision, lists)
    assert _identity(vision)["spec"]["patch_size"] == 16 and _identity(vision)["vision_dim"] == 192
    assert _identity(text)["spec"]["text_dim"] == 32 and _identity(text)["encoder"] == f"hf:{folder}"
    _train_and_eval(vision, text, tmp_path / "runs" / "timm-hf", capsys)


@pytest.mark.slow
def test_one_name_of_each_library_runs_extract_train_eval(coco128, tmp_path, capsys):
    lists = _lists(coco128, tmp_path)
    # transformers: a repository by name from a filled hub cache, offline (its own process: the hub
    # settings are read when huggingface_hub is imported).
    repo = "fusioner-test/tiny-bert"
    _hub_cache(tmp_path / "hf", repo)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    text = tmp_path / "cache" / "hf-text"
    done = subprocess.run([sys.executable, "-m", "cli", "extract", "--backbone", f"hf:{repo}", "--random-init",
                           "--text-only", "--dataset", "folder", "--data-root", str(coco128), "--out", str(text),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # timm vision + the transformers text store; open_clip vision + text in one store.
    timm_store, clip_store = tmp_path / "cache" / "timm", tmp_path / "cache" / "open_clip"
    _extract_vision("timm:vit_tiny_patch16_224", coco128, timm_store, lists)
    _extract_vision("open_clip:ViT-S-16", coco128, clip_store, lists)
    for store, name, dims in ((timm_store, "timm:vit_tiny_patch16_224", (192, None)),
                              (clip_store, "open_clip:ViT-S-16", (384, 384)), (text, f"hf:{repo}", (None, 32))):
        identity = _identity(store)
        assert identity["encoder"] == name and (identity["vision_dim"], identity["text_dim"]) == dims
        assert identity["spec"]["name"] == name and identity["pretrained"] is False
    assert zarr.open_group(str(timm_store), mode="r")  # a plain zarr store like any other
    _train_and_eval(timm_store, text, tmp_path / "runs" / "timm-hf", capsys)
    _train_and_eval(clip_store, clip_store, tmp_path / "runs" / "open_clip", capsys)
