"""Class-name embeddings from a text store, with names it lacks encoded on demand by the same encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import UserError
from pipeline.store.layout import has_text, open_store, read_text, store_attrs, text_class_words


def class_embeddings(*, text_store: str | Path, names: list[str], encode_missing: bool = True,
                     device: str = "cpu", text_encoder: Callable[[], Any] | None = None) -> np.ndarray:
    """[len(names), Dt] embeddings; names absent from the store are encoded on demand.

    On-demand encoding rebuilds the store's own text encoder with the same
    weights (random-init weights are seeded by name, so they match too), or
    takes it from ``text_encoder()`` when a caller keeps one across calls.
    """
    from pipeline.data.labels import text_words

    root = open_store(text_store)
    known, table = read_text(root) if has_text(root) else ([], np.zeros((0, 0), np.float32))
    index = {n: i for i, n in enumerate(known)}
    missing = [n for n in names if n not in index]
    extra = {}
    if missing:
        if not encode_missing:
            raise UserError(f"{text_store} has no embedding for: {', '.join(missing[:5])}")
        encoders = text_encoder() if text_encoder is not None else text_encoder_of(text_store, device=device)
        words = text_class_words(root) or "natural"
        emb = encoders.text.encode_names([text_words(n, words) for n in missing]).cpu().numpy()
        extra = dict(zip(missing, emb))
    return np.stack([table[index[n]] if n in index else extra[n] for n in names]).astype(np.float32)


def text_encoder_of(store_path: str | Path, *, device: str = "cpu"):
    """The text encoder that made a store, rebuilt from its attributes."""
    return encoder_of(store_path, vision=False, text=True, device=device)


def encoder_of(store_path: str | Path, *, vision: bool, text: bool, device: str = "cpu"):
    """The frozen encoder(s) that made a store, rebuilt with the same weights and input size."""
    return encoder_from_identity(store_attrs(open_store(store_path)), vision=vision, text=text, device=device)


def encoder_from_identity(identity: dict, *, vision: bool, text: bool, device: str = "cpu"):
    """The frozen encoder(s) an identity record names (a store's attributes, or the copy a run keeps):
    encoder name, weights (random-init ones are seeded by name, so they match), input size."""
    from pipeline.encode.families import create_encoder

    weights = identity["weights"]
    source = weights["source"]
    if not weights["pretrained"]:
        kwargs = {"random_init": True}
    elif source.startswith("hub:") or "/" not in source:
        kwargs = {}
    else:
        if not Path(source).exists():
            raise UserError(f"the {identity['encoder']} weights this run was trained with ({source}) are not on "
                            f"this machine; put them at that path (or a link to them)")
        kwargs = {"weights": source}
    return create_encoder(identity["encoder"], vision=vision, text=text, device=device,
                          input_size=identity["input_size"] if vision else None, **kwargs)
