"""Planted feature stores: patch tokens with a known right answer, for checking zero-shot transfer.

No pretrained vision weights can be had offline, and random-init towers carry no
meaning, so nothing would show that a class never trained on is found by its name.
A planted store supplies vision features that relate to class names the way a
joint image-text space does, with the answer known: each patch token is a fixed
random linear map of the text embedding of the class covering most of the patch,
plus Gaussian noise::

    token = normalize(text[class]) @ M + noise * g / sqrt(D)      M ~ N(0, 1/D)^(Dt x D), g ~ N(0, 1)

Background patches and ignored patches get their own fixed random vectors. ``M``
is near an isometry (cosines between class names survive the map), as CLIP's
image and text features share one space; the model sees neither ``M`` nor the
names' vectors as such, only tokens, so it has to learn the relation from the seen
classes alone, exactly what it must do with real features.

The store is an ordinary store (same layout, same writer, same plan, same views and
masks as ``fusioner extract`` renders); only its attributes say what it is: the
encoder is ``planted``, ``weights.pretrained`` is false and ``weights.planted``
holds the text store, map seed, noise and width. Nothing downstream reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.labels import IGNORE
from pipeline.encode.plan import ExtractConfig, open_extraction_dataset, plan_split
from pipeline.encode.device_views import finish_on_device
from pipeline.encode.shards import classes_in, render_shard
from pipeline.encode.text import class_embeddings
from pipeline.errors import UserError
from pipeline.runtime import progress
from pipeline.store.layout import consolidate, open_or_create_store, store_attrs, open_store, store_identity, \
    writer_lock
from pipeline.store.splits import create_split, done_shards, repair_lost_shards, write_shard

PLANTED_ENCODER = "planted"


@dataclass
class PlantedConfig:
    """Everything that defines a planted split; the planting part is saved in the store's identity."""

    out: str
    text_store: str  # the class-name embeddings the tokens are planted from (e.g. a minilm text store)
    data_root: str
    dataset: str = "folder"
    split: str = "train"
    dataset_options: dict = field(default_factory=dict)
    views: int = 1  # augmented views per training image
    eval_resize: bool = False
    seed: int = 0  # the view plan's seed (augmentation), as in fusioner extract
    map_seed: int = 0  # the random map M, the background and ignore vectors, the noise
    noise: float = 0.5  # norm of the noise added to each (about unit-norm) token
    dim: int = 512
    patch: int = 16
    input_size: int = 224
    overwrite: bool = False

    def planting(self, *, text_encoder: str, text_dim: int) -> dict:
        """What makes the tokens, part of the store's identity (another noise never appends to this store)."""
        return {"text_store": str(Path(self.text_store).resolve()), "text_encoder": text_encoder,
                "text_dim": text_dim, "map_seed": self.map_seed, "noise": float(self.noise), "dim": self.dim,
                "patch": self.patch, "rule": "majority label of each patch"}


def planted_table(*, text: np.ndarray, dim: int, map_seed: int) -> np.ndarray:
    """[K + 2, D] noise-free tokens by label: row 0 background, row k class k, row K + 1 ignore."""
    rng = np.random.default_rng([map_seed, 0x91A7])
    text = text / np.linalg.norm(text, axis=1, keepdims=True).clip(min=1e-12)
    mapping = rng.standard_normal((text.shape[1], dim)) / np.sqrt(dim)  # [Dt, D]
    extra = rng.standard_normal((2, dim)) / np.sqrt(dim)  # background, ignore: about unit norm, like the classes
    return np.concatenate([extra[:1], text @ mapping, extra[1:]]).astype(np.float32)


def patch_labels(masks: np.ndarray, *, patch: int, num_classes: int) -> np.ndarray:
    """[S, H, W] label masks -> [S, (H/p) * (W/p)] row of :func:`planted_table` per patch (ties: lower label)."""
    views, height, width = masks.shape
    h, w = height // patch, width // patch
    labels = masks.astype(np.int64)
    labels[labels == IGNORE] = num_classes + 1
    labels[labels > num_classes + 1] = num_classes + 1  # values past the class list are not classes
    cells = labels[:, :h * patch, :w * patch].reshape(views, h, patch, w, patch).transpose(0, 1, 3, 2, 4)
    cells = cells.reshape(views * h * w, patch * patch)
    counts = np.zeros((cells.shape[0], num_classes + 2), np.int32)
    np.add.at(counts, (np.repeat(np.arange(cells.shape[0]), cells.shape[1]), cells.ravel()), 1)
    return counts.argmax(axis=1).reshape(views, h * w)


def planted_tokens(*, masks: np.ndarray, table: np.ndarray, patch: int, noise: float,
                   rng: np.random.Generator) -> np.ndarray:
    """[S, H, W] masks -> [S, h*w, D] float16 tokens: the table row of each patch's label plus noise."""
    labels = patch_labels(masks, patch=patch, num_classes=table.shape[0] - 2)
    tokens = table[labels]  # [S, h*w, D]
    if noise:
        tokens = tokens + (noise / np.sqrt(table.shape[1])) * rng.standard_normal(tokens.shape).astype(np.float32)
    return tokens.astype(np.float16)


def _extract_config(config: PlantedConfig, *, text_encoder: str) -> ExtractConfig:
    """The plan of ``fusioner extract`` for the same data and views (normalisation: unused, the text encoder's)."""
    return ExtractConfig(backbone=text_encoder, out=config.out, dataset=config.dataset, data_root=config.data_root,
                         split=config.split, dataset_options=dict(config.dataset_options), views=config.views,
                         eval_resize=config.eval_resize, seed=config.seed, input_size=config.input_size,
                         normalize="encoder")


def write_planted(*, config: PlantedConfig, quiet: bool = False) -> dict:
    """Write (or finish) one planted split; returns what was written. Resumable like ``fusioner extract``."""
    if config.input_size % config.patch:
        raise UserError(f"input size {config.input_size} is not a multiple of the patch {config.patch}")
    if config.noise < 0 or config.dim < 1 or config.views < 1:
        raise UserError("planted noise must be >= 0, dim and views at least 1")
    text_attrs = store_attrs(open_store(config.text_store))
    with writer_lock(config.out):
        return _write(config=config, text_encoder=str(text_attrs["encoder"]), quiet=quiet)


def _write(*, config: PlantedConfig, text_encoder: str, quiet: bool) -> dict:
    extract_config = _extract_config(config, text_encoder=text_encoder)
    dataset = open_extraction_dataset(extract_config)
    names = list(dataset.class_names)
    text = class_embeddings(text_store=config.text_store, names=names)  # [K, Dt], as training will read them
    side = config.input_size // config.patch
    identity = store_identity(
        encoder=PLANTED_ENCODER, input_size=config.input_size, grid=(side, side), vision_dim=config.dim,
        text_dim=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        weights={"pretrained": False, "source": PLANTED_ENCODER, "sha256": None,
                 "planted": config.planting(text_encoder=text_encoder, text_dim=int(text.shape[1]))})
    root = open_or_create_store(config.out, identity=identity, overwrite=config.overwrite)
    plan = plan_split(dataset=dataset, config=extract_config, input_size=config.input_size, tokens=side * side,
                      dim=config.dim)
    plan.meta["planted"] = True
    group = create_split(root, plan=plan, tokens=side * side, dim=config.dim, input_size=config.input_size)
    repair_lost_shards(group, quiet=quiet)
    table = planted_table(text=text, dim=config.dim, map_seed=config.map_seed)
    todo = [int(s) for s in np.flatnonzero(~done_shards(group))]
    bar = progress(total=len(todo), desc="planted", quiet=quiet, unit="shard")
    for shard in todo:
        rendered = finish_on_device(render_shard(dataset=dataset, group=group, shard=shard,
                                                 input_size=config.input_size, skip_bad=False),
                                    meta=plan.meta, size=config.input_size, device="cpu")
        tokens = planted_tokens(masks=rendered.masks, table=table, patch=config.patch, noise=config.noise,
                                rng=np.random.default_rng([config.map_seed, shard, 0x5A17]))
        write_shard(group, shard=shard, features=tokens, masks=rendered.masks,
                    classes=classes_in(rendered.masks, len(names)) & rendered.valid[:, None],
                    valid=rendered.valid, source=rendered.source)
        bar.update(1)
    bar.close()
    consolidate(root, splits=[plan.group_path])
    return {"out": config.out, "split": plan.group_path, "views": plan.num_views, "shards_run": len(todo),
            "planting": asdict(config) | identity["weights"]["planted"]}
