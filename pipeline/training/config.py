"""The config of a training run, saved as config.json beside every checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import config_hash, to_dict
from pipeline.data.augment import AugmentConfig
from pipeline.errors import UserError
from pipeline.model import ModelConfig, preset_settings


@dataclass
class OnlineConfig:
    """Online mode: the frozen encoder runs on a fresh augmentation of every sample at every step."""

    enabled: bool = False
    backbone: str = ""  # encoder name (fusioner encoders)
    data_root: str = ""
    dataset: str = "folder"  # reader name (fusioner datasets)
    split: str = "train"
    random_init: bool = False
    weights: str | None = None
    input_size: int | None = None
    workers: int = 2  # DataLoader processes that decode and augment
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DataConfig:
    """Which cache to train from and on which classes."""

    cache: str = "cache/clip-l"  # vision store
    text_cache: str | None = None  # text store (default: the vision store)
    split: str | None = None  # e.g. "voc/train"; default: the store's only training split
    protocol: str = "pascal5i"  # pascal5i, coco20i, coco2voc, custom, ...
    fold: int = 0
    novel: list[str] = field(default_factory=list)  # class names, for protocol "custom"
    # "1": one (view, class) pair per sample (released code); "all": every seen class of the view (paper's W).
    # A bare 1 is accepted because YAML and ``--set`` read it as an integer.
    classes_per_sample: Literal["1", "all", 1] = "1"
    novel_pixels: Literal["background", "ignore"] = "background"
    # A splits folder: train only on the protocol's standard (image, class) lists (pascal/trn, coco/trn).
    train_lists: str | None = None
    # memory: load the split once; stream: contiguous block reads by `readers` threads into a shuffle
    # buffer, targets built on the device. auto: memory if it fits.
    read_mode: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = 8.0
    readers: int = 4  # reader threads of read_mode stream
    feature_noise: float = 0.0  # feature-space augmentation of cached tokens (0 = off); see training.md
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        self.classes_per_sample = str(self.classes_per_sample)
        if isinstance(self.readers, bool) or not isinstance(self.readers, int) or self.readers < 1:
            raise UserError(f"data.readers must be a whole number of at least 1, got {self.readers!r}")

    @property
    def text_store(self) -> str:
        """The store the class-name embeddings come from: ``text_cache``, else the vision store itself."""
        return self.text_cache or self.cache


@dataclass
class OptimConfig:
    epochs: int = 510  # 10 warm-up + 500, as released
    warmup_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 2e-6
    weight_decay: float = 0.01
    weight_decay_end: float = 0.4
    # Released: the decoder has its own Adam at a constant 1e-3; only the fusion module follows warm-up +
    # cosine and the weight-decay ramp. "shared" puts the decoder on the fusion schedule instead.
    decoder_schedule: Literal["constant", "shared"] = "constant"
    decoder_lr: float = 1e-3
    grad_clip: float = 0.0  # 0 = off
    # Released: each sample's BCE is the mean over its own valid pixels, then samples are averaged;
    # "pixel" averages over every valid pixel of the batch (samples with more ignore count less).
    loss_reduction: Literal["sample", "pixel"] = "sample"
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); for quick checks

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"optim.epochs and optim.batch_size must be at least 1, got {self.epochs} and "
                            f"{self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"optim.lr must be a positive number, got {self.lr}")
        if self.max_steps < 0 or self.warmup_epochs < 0:
            raise UserError("optim.max_steps and optim.warmup_epochs must be >= 0")


@dataclass
class TrainConfig:
    """A whole training run; saved as config.json in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vision_dim=0, text_dim=0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    preset: str = "paper"
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the model (measure first: docs/benchmarks.md)
    out: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = False  # also write TensorBoard event files to <out>/tensorboard (fusioner[tensorboard])
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    val_split: str | None = None  # evaluate novel-class mIoU on this split of the cache each eval_every epochs
    eval_every: int = 1
    splits_dir: str | None = None  # episode lists for val (default: derived from masks)
    # Which weights the run reports: "final" (the honest default) or "best-val", the checkpoint with the
    # best validation mIoU on val_split (episodes derived from its masks), which must share no image with
    # the test episodes of test_lists (a splits folder). The released code picks the best of many *test*
    # evaluations instead; this option is the labelled, leak-free form of model selection.
    select: Literal["final", "best-val"] = "final"
    test_lists: str | None = None


# Keys that say how far to go, where to write and what to log, not what is trained:
# a resumed run may change them (e.g. raise optim.max_steps) and still reach the
# weights of an uninterrupted run.
RESUME_FREE_KEYS = ("optim.max_steps", "out", "log_every", "tensorboard", "checkpoint_every", "val_split",
                    "eval_every", "splits_dir", "data.readers", "compile", "data.online.workers")


def resume_identity(config: TrainConfig | dict) -> str:
    """Hash of the parts of a config that decide the trained weights (see RESUME_FREE_KEYS)."""
    data = json.loads(json.dumps(to_dict(config)))  # a deep copy to prune
    for key in RESUME_FREE_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return config_hash(data)


# What a config.json written before a field existed meant by its absence: the behaviour of that time,
# not today's default, so an older run is rebuilt (and refused on --resume under new defaults) as trained.
LEGACY_DEFAULTS = {"model.decoder.upsample": "logits", "optim.loss_reduction": "pixel"}


def upgrade_run_config(saved: dict) -> dict:
    """A saved config.json with :data:`LEGACY_DEFAULTS` filled in where it predates them."""
    data = json.loads(json.dumps(saved))
    for key, value in LEGACY_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return data


def default_config_dict() -> dict:
    return to_dict(TrainConfig())


def build_config(*, base: dict | None = None, preset: str | None = None,
                 overrides: Mapping[str, Any] | Iterable[str] = ()) -> TrainConfig:
    """Defaults <- preset <- YAML file values <- dotted-key settings, strictly checked.

    ``overrides`` maps dotted keys to typed values (``{"optim.epochs": 5, "data.novel": ["cat"]}``);
    ``key=value`` strings are accepted too and parsed as YAML values.
    """
    from pipeline.config import apply_overrides, deep_merge

    data = default_config_dict()
    chosen = preset or (base or {}).get("preset") or "paper"
    data["model"] = deep_merge(data["model"], preset_settings(chosen))
    data["preset"] = chosen
    if base:
        data = deep_merge(data, base)
        data["preset"] = chosen
    config = apply_overrides(TrainConfig, data, overrides)
    check_schedule(config.optim)
    return config


def check_schedule(optim: OptimConfig) -> None:
    """Refuse a schedule that would end while the learning rate is still warming up (``optim.epochs`` >= 1
    is checked by :class:`OptimConfig` itself)."""
    if not 0 <= optim.warmup_epochs < optim.epochs:
        raise UserError(f"optim.warmup_epochs ({optim.warmup_epochs}) must be from 0 to below optim.epochs "
                        f"({optim.epochs}): otherwise training ends before the learning rate leaves its warm-up; "
                        f"lower optim.warmup_epochs")


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
