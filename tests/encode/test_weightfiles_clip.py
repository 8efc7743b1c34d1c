"""CLIP weight files as users hold them: OpenAI's TorchScript archives, the state dict of a loaded JIT
model, open_clip hub folders; wrong files and files that would run code refused in one line."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from released_layouts import openai_torchscript

from cli import main
from pipeline.encode.compat import ensure_torchvision
from pipeline.encode.families import create_encoder
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "fusioner-tiny-clip-quickgelu"  # an open_clip architecture of OpenAI's ViT layout at small widths
TINY_SIZES = {"width": 64, "layers": 2, "embed": 32, "text_width": 64, "text_layers": 2}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """The small architecture registered with open_clip (as a user's own model config would be) and
    as a registry entry of OpenAI weights like clip-b's (QuickGELU, as its name says to open_clip)."""
    from dataclasses import replace

    ensure_torchvision()
    import open_clip

    from pipeline.encode import registry

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    (folder / f"{TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    entry = replace(registry.get_spec("clip-b"), name="tiny-openai", arch=TINY, vision_dim=32, text_dim=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, entry.name, entry)
        yield entry.name


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return openai_torchscript(tmp_path_factory.mktemp("openai") / "ViT-tiny.pt", seed=1, **TINY_SIZES)


def _reference_tokens(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's own conversion of an OpenAI state dict, then its patch tokens in the joint space."""
    from open_clip.model import build_model_from_openai_state_dict

    model = build_model_from_openai_state_dict(dict(state), quick_gelu=True).float().eval()
    model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = model.visual(pixels)
    return tokens @ model.visual.proj


def _images(size: int = 224) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def test_the_library_name_of_the_architecture_resolves_too(tiny_arch):
    from pipeline.encode.registry import activation, get_spec

    spec = get_spec(f"open_clip:{TINY}")
    assert (spec.vision_dim, spec.text_dim, spec.patch_size, activation(spec)) == (32, 32, 16, "quick_gelu")


def test_openai_torchscript_archive_equals_open_clips_conversion(tiny_arch, archive):
    jit_state = torch.jit.load(str(archive)).state_dict()
    assert "input_resolution" in jit_state and "vocab_size" in jit_state  # the sizes the archives carry
    assert jit_state["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    encoders = create_encoder(tiny_arch, weights=archive)
    assert encoders.weights.pretrained and len(encoders.weights.sha256) == 64
    ours = encoders.vision.encode(_images())
    ref = _reference_tokens(jit_state, encoders.vision.normalize(_images()))
    assert ours.shape == (2, 196, 32)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    # The text tower is loaded too (its output differs from a random-init one).
    random = create_encoder(tiny_arch, random_init=True)
    assert not torch.allclose(encoders.text.encode_names(["cat"], templates=["{}"]),
                              random.text.encode_names(["cat"], templates=["{}"]))


def test_saved_state_dict_of_a_jit_model_and_an_open_clip_hub_folder_load(tiny_arch, archive, tmp_path):
    from safetensors.torch import save_file

    jit_state = torch.jit.load(str(archive)).state_dict()
    saved = tmp_path / "state.pt"
    torch.save(jit_state, saved)  # carries input_resolution / vocab_size beside the weights
    hub = tmp_path / "hub-folder"
    hub.mkdir()
    plain = {k: v.float().contiguous() for k, v in jit_state.items() if k not in ("input_resolution", "vocab_size",
                                                                                  "context_length")}
    save_file(plain, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text("{}")
    for weights in (saved, hub):
        encoders = create_encoder(tiny_arch, weights=weights)
        pixels = encoders.vision.normalize(_images())
        assert torch.allclose(encoders.vision.encode(_images()), _reference_tokens(jit_state, pixels), atol=1e-5)
    info = create_encoder(tiny_arch, weights=hub, input_size=32).weights
    assert info.sha256 and info.source == str(hub)


def test_another_input_size_resizes_the_positional_embedding(tiny_arch, archive):
    encoders = create_encoder(tiny_arch, weights=archive, input_size=64)
    tokens = encoders.vision.encode(_images(64))
    assert tokens.shape == (2, 16, 32) and torch.isfinite(tokens).all()


@pytest.mark.fullsize
def test_a_clip_file_of_another_size_is_one_line(archive):
    with pytest.raises(UserError) as info:
        create_encoder("clip-b", weights=archive, input_size=32)
    message = str(info.value)
    assert "\n" not in message and str(archive) in message
    assert "a CLIP ViT (width 64, 2 layers, patch 16)" in message  # what the file is
    assert "not a CLIP ViT (width 768, 12 layers, patch 16)" in message  # what clip-b needs
    assert "of another shape (first: " in message


class _Runs:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tiny_arch, tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Runs()}, bad)
    with pytest.raises(UserError, match=r"refusing to load .* \(it names posix.system\)|refusing to load"):
        create_encoder(tiny_arch, weights=bad)


class _Hook(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        print("code ran on load")
        self.weight = state[0]
        self.training = state[1]


def test_a_torchscript_archive_whose_code_runs_on_load_is_refused_unread(tiny_arch, tmp_path, capfd):
    bad = tmp_path / "hook.pt"
    torch.jit.script(_Hook()).save(str(bad))
    with zipfile.ZipFile(bad) as zf:
        assert any(b"__setstate__" in zf.read(n) for n in zf.namelist() if n.endswith(".py"))
    with pytest.raises(UserError, match=r"refusing TorchScript archive .*code runs on load \(__setstate__"):
        create_encoder(tiny_arch, weights=bad)
    assert "code ran on load" not in capfd.readouterr().out


def test_a_wrong_file_at_the_command_line_exits_2_and_writes_nothing(tiny_arch, tmp_path, capsys):
    """One line naming the file, what it is, what was needed and the first keys; no store."""
    from released_layouts import timm_vit_state

    vit = tmp_path / "vit.pt"
    torch.save(timm_vit_state("vit_tiny_patch16_224"), vit)
    out = tmp_path / "out"
    args = ["extract", "--backbone", "clip-b", "--weights", str(vit), "--text-only", "--names", "cat,dog",
            "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "is a ViT (width 192, 12 layers, patch 16), not a CLIP ViT (width 768" in err and "missing (first: " in err
    assert not out.exists()


def test_pickled_torchscript_detection_does_not_catch_plain_zips(tmp_path):
    from pipeline.encode.weightfiles import is_torchscript

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    assert not is_torchscript(plain)
    (tmp_path / "x.bin").write_bytes(pickle.dumps({"w": 1}))
    assert not is_torchscript(tmp_path / "x.bin")


@pytest.mark.slow
def test_openai_vit_b_16_archive_extracts_with_clip_b_and_records_its_hash(tmp_path, capsys):
    """The real ViT-B/16 layout (widths, depths, fp16), through the command line; features equal
    open_clip's own ``load_openai_model`` of the same file (QuickGELU on both sides)."""
    import hashlib

    from open_clip import load_openai_model

    path = openai_torchscript(tmp_path / "ViT-B-16.pt", seed=2)
    out = tmp_path / "clip-b"
    assert main(["extract", "--backbone", "clip-b", "--weights", str(path), "--text-only", "--names", "cat,dog",
                 "--out", str(out), "--quiet"]) == 0
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    identity = next(v for v in attrs.values() if isinstance(v, dict) and "encoder" in v)
    assert identity["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity["pretrained"] is True and identity["activation"] == "quick_gelu"
    encoders = create_encoder("clip-b", weights=path, text=False)
    reference = load_openai_model(str(path), precision="fp32", device="cpu").eval()
    reference.visual.output_tokens = True
    pixels = encoders.vision.normalize(_images())
    with torch.no_grad():
        _, tokens = reference.visual(pixels)
    assert torch.allclose(encoders.vision.encode(_images()), tokens @ reference.visual.proj, atol=1e-4, rtol=0)
