"""What a run keeps of its inputs, so it predicts without the stores it was trained from.

``inputs.json`` holds the stores' absolute paths (resolved at training time), the
identity of each frozen encoder (name, weights source and hash, input size, grid, image
normalisation, prompt templates), the statistics the training split's images were
normalised with and the words the class embeddings were made from; ``class_embeddings.safetensors`` holds the class-name
embeddings the run was trained with. A run folder copied to another machine then predicts
on a photo with new class names given the encoder weights alone: the known names use the
kept embeddings, new ones are encoded by the text encoder the identity names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import write_json_atomic
from pipeline.errors import UserError
from pipeline.runtime import default_file_mode
from pipeline.store.layout import has_text, open_store, store_attrs, text_class_words

INPUTS = "inputs.json"
EMBEDDINGS = "class_embeddings.safetensors"
_IDENTITY_KEYS = ("encoder", "weights", "pretrained", "input_size", "grid", "vision_dim", "text_dim", "mean", "std")


def _identity(store: str | Path) -> dict | None:
    if not (Path(store) / "zarr.json").is_file():  # an online run reads no vision store
        return None
    root = open_store(store)
    attrs = store_attrs(root)
    identity = {k: attrs.get(k) for k in _IDENTITY_KEYS}
    if has_text(root):
        identity["templates"] = root["text"].attrs.get("templates")
    return identity


def split_normalization(store: str | Path, split: str | None) -> dict | None:
    """The mean/std a split's images were normalised with (its ``meta.normalize``); None if not recorded.

    ``split`` None takes the store's training split (the first one named like one).
    """
    from pipeline.data.labels import TRAIN_SPLITS
    from pipeline.store.splits import list_splits, resolve_split

    root = open_store(store)
    if split:
        names = [resolve_split(root, split)]
    else:
        names = [s for s in list_splits(root) if s.split("/")[-1] in TRAIN_SPLITS][:1]
    return dict(root[names[0]].attrs["meta"]).get("normalize") if names else None


def write_run_inputs(*, run: str | Path, vision_store: str | Path, text_store: str | Path,
                     class_names: list[str], embeddings: np.ndarray, training_split: str | None = None) -> None:
    """Keep the stores' absolute paths, the encoders' identities and the class embeddings in ``run``."""
    run = Path(run)
    vision_is_store = (Path(vision_store) / "zarr.json").is_file()
    text_is_store = (Path(text_store) / "zarr.json").is_file()
    record = {
        "vision_store": str(Path(vision_store).resolve()), "text_store": str(Path(text_store).resolve()),
        "vision": _identity(vision_store), "text": _identity(text_store), "class_names": list(class_names),
        "normalize": split_normalization(vision_store, training_split) if vision_is_store and training_split
        else None,
        "class_words": (text_class_words(open_store(text_store)) or None) if text_is_store else None,
    }
    write_json_atomic(run / INPUTS, record)
    tmp = run / f".{EMBEDDINGS}.tmp"
    save_file({"embeddings": torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))}, str(tmp),
              metadata={"class_names": json.dumps(list(class_names))})
    default_file_mode(tmp)
    tmp.replace(run / EMBEDDINGS)


def read_run_inputs(run: str | Path) -> dict | None:
    """The record :func:`write_run_inputs` kept (with ``embeddings``: name -> vector), or None for older runs."""
    run = Path(run)
    if not (run / INPUTS).is_file():
        return None
    name = INPUTS
    try:
        record = json.loads((run / INPUTS).read_text())
        names = [str(n) for n in record["class_names"]]
        name = EMBEDDINGS
        table = load_file(str(run / EMBEDDINGS))["embeddings"].numpy() if (run / EMBEDDINGS).is_file() else None
    except Exception as err:  # noqa: BLE001 - JSON or safetensors errors, a missing key: the file is damaged
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{run / name} is damaged or not this run's file ({reason}); restore it from a copy of "
                        f"the run, or train the run again") from None
    record["embeddings"] = {} if table is None else dict(zip(names, table))
    return record
