"""Hugging Face folders as users hold them: save_pretrained folders with and without tokenizer files,
a weight file named instead of its folder, a folder of another width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from released_layouts import tiny_bert_folder

from pipeline.encode.families import create_encoder
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("bert") / "tiny-bert", tokenizer=True)


def _reference(folder: Path, sentences: list[str]) -> torch.Tensor:
    """transformers' own loading of the folder, mean-pooled over real tokens."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("given", ["folder", "model.safetensors"])
def test_a_saved_folder_or_its_weight_file_loads(folder, given):
    weights = folder if given == "folder" else folder / "model.safetensors"
    encoders = create_encoder(f"hf:{folder}", weights=weights)
    sentences = ["a dog", "a photo of a cat.", "a cat"]  # run in groups of one token count, rows put back
    assert torch.allclose(encoders.text._encode_sentences(sentences), _reference(folder, sentences), atol=1e-5)
    assert encoders.text.dim == 32 and encoders.weights.pretrained


def test_a_library_name_of_a_local_folder_uses_its_weights(folder):
    assert create_encoder(f"hf:{folder}").weights.source == str(folder)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    bare = tiny_bert_folder(tmp_path / "bare", tokenizer=False)
    for name in ("bert-b", f"hf:{bare}"):
        with pytest.raises(UserError, match=r"has no tokenizer files .*tokenizer.save_pretrained") as info:
            create_encoder(name, weights=bare)
        assert "\n" not in str(info.value)


def test_a_vocabulary_that_cannot_tell_names_apart_is_refused(tmp_path):
    """A vocabulary of special tokens alone: every word becomes [UNK]."""
    bare = tiny_bert_folder(tmp_path / "unk", tokenizer=False)
    (bare / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(UserError, match=r"cannot tell class names apart \(1 token sequences for 10 words"):
        create_encoder(f"hf:{bare}", weights=bare)


def test_a_folder_of_another_width_is_one_line(folder):
    with pytest.raises(UserError) as info:
        create_encoder("bert-l", weights=folder)
    assert str(info.value) == (f"bert-l: {folder} is a bert of width 32 and 2 layers, not the width 1024 and "
                               f"24 layers bert-l needs")


def test_a_weight_file_without_its_config_is_one_line(folder, tmp_path):
    lone = tmp_path / "model.safetensors"
    lone.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="without a config.json beside it; pass the folder"):
        create_encoder("bert-b", weights=lone)
