"""What a study's runs need from the stores, and how to make what is missing (``--dry-run``).

A dry run plans without any data: for every store and split the runs read it
says whether it exists and prints the ``fusioner extract`` command that makes
it. The encoder is read from the store's folder name when it starts with a
registry name (``cache/clip-l``, ``cache/clip-l-coco``), the reader and split from the split name
(``voc/train``); data roots are placeholders the user fills in.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.labels import TRAIN_SPLITS
from pipeline.encode.config import RECIPE_VIEWS
from pipeline.encode.registry import list_encoders
from pipeline.errors import UserError

_ROOTS = {"voc": "~/data/VOCdevkit/VOC2012", "coco": "~/data/coco", "mosaic4": "~/data/mosaic4-{split}",
          "fss": "~/data/FSS-1000", "folder": "DATA_ROOT"}


def needed(run) -> list[tuple[str, str]]:
    """(store, split) pairs a run reads; split "text" means the class-name embeddings."""
    data = run.config["data"]
    wanted = [(data["cache"], data["split"] or "<training split>"), (data["cache"], run.eval["split"])]
    return wanted + [(data["text_cache"] or data["cache"], "text")]


def store_encoder(store: str) -> str:
    """The encoder a vision store was made with: its recorded name, else what its folder name says."""
    from pipeline.store.layout import open_store, store_attrs

    try:
        return str(store_attrs(open_store(store)).get("encoder") or backbone_of(store))
    except (UserError, KeyError):
        return backbone_of(store)


def decoder_summary(run) -> str:
    """The decoder a run trains, as ``decoder WIDTH x BLOCKS`` (or ``decoder off``), before any data exists.

    Block widths left open in the config are the fusion width, and the depth the vision encoder's
    registry entry, as training resolves them.
    """
    from pipeline.config import from_dict
    from pipeline.encode.registry import registry_decoder_blocks
    from pipeline.model import ModelConfig, decoder_channels

    model = from_dict(ModelConfig, {**run.config["model"], "vision_dim": 1, "text_dim": 1})
    if not model.decoder.enabled:
        return "decoder off"
    blocks = registry_decoder_blocks(store_encoder(run.config["data"]["cache"]))
    channels = decoder_channels(model, encoder_blocks=blocks)
    widths = str(channels[0]) if len(set(channels)) == 1 else "/".join(map(str, channels))
    return f"decoder {widths} x {len(channels)}"


def is_present(store: str, split: str) -> bool:
    from pipeline.store.layout import open_store
    from pipeline.store.splits import list_splits

    try:
        root = open_store(store)
    except UserError:
        return False
    return "text" in root if split == "text" else split in list_splits(root)


def backbone_of(store: str) -> str:
    """The registry name a store's folder starts with (cache/clip-l-coco -> clip-l), else a placeholder."""
    name = Path(store).name
    matches = [e for e in list_encoders(tests=True) if name == e or name.startswith(e + "-")]
    return max(matches, key=len) if matches else "ENCODER"


def make_command(store: str, split: str, *, splits_dir: str | None = None, train_reader: str = "",
                 text_only: bool = False) -> str:
    """The ``fusioner extract`` command that writes ``split`` (or the text embeddings) into ``store``.

    ``text_only``: no run reads images from ``store``, so only a text extraction fills it.
    """
    backbone = backbone_of(store)
    if split == "text" and train_reader not in ("voc", "coco") and not text_only:
        return "(written by the vision extractions into this store: they embed their class names)"
    if split == "text" and train_reader not in ("voc", "coco"):  # the class names come from the data's own list
        return (f"fusioner extract --backbone {backbone} --text-only --dataset {train_reader or 'folder'} "
                f"--data-root {_ROOTS.get(train_reader, 'DATA_ROOT')} --out {store}")
    if split == "text":
        return f"fusioner extract --backbone {backbone} --text-only --dataset {train_reader} --out {store}"
    reader, _, part = split.partition("/")
    root = _ROOTS.get(reader, "DATA_ROOT").format(split=part)
    command = f"fusioner extract --backbone {backbone} --dataset {reader} --data-root {root} --split {part}"
    if part in TRAIN_SPLITS:
        command += f" --views {RECIPE_VIEWS}"  # the recipe's K, not the quick-check default of 1
    if reader == "coco" and part == "val" and splits_dir:
        command += f" --episodes {splits_dir}"  # only the images the standard episodes score
    if train_reader in ("voc", "coco") and reader in ("voc", "coco") and reader != train_reader:
        command += f" --normalize {'pascal' if train_reader == 'voc' else 'coco'}"  # as the training views
    return command + f" --out {store}"


def describe_caches(runs) -> str:
    """Every store/split the runs need: present or missing, and the command that makes it."""
    users: dict[tuple[str, str], int] = {}
    hints: dict[tuple[str, str], dict] = {}
    vision_stores = {run.config["data"]["cache"] for run in runs}
    for run in runs:
        train_reader = (run.config["data"]["split"] or "").partition("/")[0]
        for key in needed(run):
            users[key] = users.get(key, 0) + 1
            hints[key] = {"splits_dir": run.eval.get("splits_dir"), "train_reader": train_reader,
                          "text_only": key[0] not in vision_stores}
    lines = [f"caches needed ({len(users)}):"]
    for (store, split), count in users.items():
        state = "present" if is_present(store, split) else "MISSING"
        lines.append(f"  {state:7s} {store} {split} ({count} runs)")
        if state == "MISSING":
            lines.append(f"          make: {make_command(store, split, **hints[(store, split)])}")
    return "\n".join(lines)
