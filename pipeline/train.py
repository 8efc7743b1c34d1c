"""Stage two: train the fusion module and the decoder from cached features.

No encoder runs here: batches come from a vision store (patch tokens, view
masks) and a text store (class-name embeddings), which may be the same store
(CLIP) or two (``dino-b`` vision with ``bert-b`` text).

The recipe is the released one: AdamW, learning rate warmed up linearly over
10 epochs to 1e-3, then cosine-decayed to 2e-6, weight decay cosine 0.01 ->
0.4 on the fusion module, binary cross-entropy per class map with 255
ignored. The batch order is a function of (seed, epoch), and checkpoints hold
the model, optimiser and position, so ``--resume`` continues a killed run to
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import config_hash, to_dict, write_json_atomic
from pipeline.errors import UserError
from pipeline.loader import (CachedSplit, class_embeddings, load_into_memory, open_split, prefetch,
                             training_batches, training_pairs)
from pipeline.checkpoints import _set_rng_state, _truncate_log, latest_checkpoint, save_checkpoint
from pipeline.losses import binary_segmentation_loss
from pipeline.model import PRESETS, ModelConfig, build_model, count_parameters, make_model_config
from pipeline.progress import progress


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
    read_mode: Literal["auto", "memory", "shards"] = "auto"
    memory_limit_gb: float = 8.0

    def __post_init__(self) -> None:
        self.classes_per_sample = str(self.classes_per_sample)


@dataclass
class OptimConfig:
    epochs: int = 510  # 10 warm-up + 500, as released
    warmup_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 2e-6
    weight_decay: float = 0.01
    weight_decay_end: float = 0.4
    grad_clip: float = 0.0  # 0 = off
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); for quick checks


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
    out: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    val_split: str | None = None  # evaluate novel-class mIoU on this split of the cache each eval_every epochs
    eval_every: int = 1
    splits_dir: str | None = None  # episode lists for val (default: derived from masks)


# Keys that say how far to go, where to write and what to log, not what is trained:
# a resumed run may change them (e.g. raise optim.max_steps) and still reach the
# weights of an uninterrupted run.
RESUME_FREE_KEYS = ("optim.max_steps", "out", "log_every", "checkpoint_every", "val_split", "eval_every",
                    "splits_dir")


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


def default_config_dict() -> dict:
    return to_dict(TrainConfig())


def build_config(*, base: dict | None = None, preset: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- preset <- YAML file values <- ``--set key=value`` overrides, strictly checked."""
    from pipeline.config import apply_overrides
    from pipeline.model import _deep_merge

    data = default_config_dict()
    chosen = preset or (base or {}).get("preset") or "paper"
    if chosen not in PRESETS:
        raise UserError(f"unknown model preset '{chosen}' (known: {', '.join(PRESETS)})")
    data["model"] = _deep_merge(data["model"], PRESETS[chosen])
    data["preset"] = chosen
    if base:
        data = _deep_merge(data, base)
        data["preset"] = chosen
    return apply_overrides(TrainConfig, data, list(overrides))


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #


def lr_at(*, step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_epochs``, then cosine decay to ``min_lr``."""
    warm = optim.warmup_epochs * steps_per_epoch
    total = max(optim.epochs * steps_per_epoch, 1)
    if step < warm:
        return optim.lr * (step + 1) / warm
    progress_ = min(1.0, (step - warm) / max(total - warm, 1))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress_))


def wd_at(*, step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Weight decay rising on a cosine from ``weight_decay`` to ``weight_decay_end``."""
    total = max(optim.epochs * steps_per_epoch, 1)
    frac = min(1.0, step / total)
    return optim.weight_decay_end + 0.5 * (optim.weight_decay - optim.weight_decay_end) * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def resolve_fold(*, data: DataConfig, class_names: list[str]):
    """The protocol fold for the store's class list, refusing a mismatched one."""
    from pipeline.protocols import create_protocol

    if data.protocol == "custom":
        if not data.novel:
            raise UserError("protocol 'custom' needs data.novel (the held-out class names)")
        protocol = create_protocol("custom", class_names=class_names, novel=list(data.novel))
    else:
        protocol = create_protocol(data.protocol)
        train_protocol = getattr(protocol, "train_protocol", None)
        if train_protocol:
            protocol = create_protocol(train_protocol)
        if list(protocol.class_names) != list(class_names):
            raise UserError(f"protocol '{data.protocol}' classes do not match the store's "
                            f"({len(protocol.class_names)} vs {len(class_names)} classes); "
                            f"use protocol 'custom' with data.novel for other data")
    if not 0 <= data.fold < protocol.num_folds:
        raise UserError(f"protocol '{data.protocol}' has folds 0..{protocol.num_folds - 1}, not {data.fold}")
    return protocol.fold(data.fold)


def _training_split_name(cache: str, split: str | None) -> str | None:
    if split:
        return split
    from pipeline import store as st

    names = [s for s in st.list_splits(st.open_store(cache)) if s.split("/")[-1] in ("train", "trn", "training")]
    if len(names) == 1:
        return names[0]
    raise UserError(f"{cache}: name the training split with data.split (training splits: {', '.join(names) or 'none'})")


@dataclass
class Prepared:
    split: CachedSplit
    samples: list
    text: np.ndarray
    fold: object
    memory: dict | None
    mode: str


def prepare_data(config: TrainConfig) -> Prepared:
    data = config.data
    split = open_split(store=data.cache, split=_training_split_name(data.cache, data.split))
    fold = resolve_fold(data=data, class_names=split.class_names)
    text = class_embeddings(text_store=data.text_cache or data.cache, names=split.class_names)
    samples = training_pairs(split=split, seen=fold.seen, classes_per_sample=data.classes_per_sample)
    mode = data.read_mode
    if mode == "auto":
        features = split.group["features"]
        size_gb = features.nbytes / 2**30 + split.group["masks"].nbytes / 2**30
        mode = "memory" if size_gb <= data.memory_limit_gb else "shards"
    memory = load_into_memory(split) if mode == "memory" else None
    return Prepared(split=split, samples=samples, text=text, fold=fold, memory=memory, mode=mode)


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def _device(name: str) -> torch.device:
    from pipeline.extract import resolve_device

    return resolve_device(name)


def _param_groups(model) -> list[dict]:
    decay, no_decay, decoder = [], [], []
    for name, param in model.named_parameters():
        if name.startswith("decoder."):
            decoder.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "wd_schedule": True}, {"params": no_decay, "weight_decay": 0.0},
            {"params": decoder, "weight_decay": 0.0}]


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def train(*, config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict:
    """Train from the cache; returns a summary (final loss, steps, timing, val metrics)."""
    run = Path(config.out)
    if run.exists() and (run / "config.json").exists() and not resume:
        if latest_checkpoint(run) is not None:
            raise UserError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    prepared = prepare_data(config)
    split = prepared.split
    text_dim = prepared.text.shape[1]
    vision_dim = int(split.group["features"].shape[2])
    model_cfg = config.model
    if model_cfg.vision_dim != vision_dim or model_cfg.text_dim != text_dim:
        model_cfg = make_model_config(vision_dim=vision_dim, text_dim=text_dim, preset="paper",
                                      overrides={k: v for k, v in to_dict(model_cfg).items()
                                                 if k not in ("vision_dim", "text_dim")})
        config.model = model_cfg
    if config.model.decoder.out_size != split.input_size:
        config.model.decoder.out_size = split.input_size
    if resume and (run / "config.json").exists():
        saved = json.loads((run / "config.json").read_text())
        if resume_identity(saved) != resume_identity(config):
            raise UserError(f"{run}: --resume with a different config than the run was started with "
                            f"(only {', '.join(RESUME_FREE_KEYS)} may change)")
    device = _device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    steps_per_epoch = -(-len(prepared.samples) // config.optim.batch_size)
    position = {"epoch": 0, "batch": 0, "step": 0}
    if resume:
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise UserError(f"--resume: no checkpoint in {run}")
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        state = torch.load(checkpoint / "train_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        position = state["position"]
        _set_rng_state(state.get("rng"))
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", config)
    metrics_path = run / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    if resume:
        _truncate_log(metrics_path, step=position["step"])
    counts = count_parameters(model)
    if position["step"] == 0:
        _log(metrics_path, {"event": "start", "parameters": counts, "samples": len(prepared.samples),
                            "steps_per_epoch": steps_per_epoch, "read_mode": prepared.mode,
                            "pretrained_features": split.pretrained, "fold_novel": list(prepared.fold.novel)})
    total_steps = config.optim.epochs * steps_per_epoch
    if config.optim.max_steps:
        total_steps = min(total_steps, config.optim.max_steps)
    bar = progress(total=total_steps, desc="train", quiet=quiet, unit="step", initial=position["step"])
    wait_total = compute_total = 0.0
    last_loss = float("nan")
    val_history = []
    step = position["step"]
    model.train()
    try:
        for epoch in range(position["epoch"], config.optim.epochs):
            skip = position["batch"] if epoch == position["epoch"] else 0
            batches = prefetch(training_batches(
                split=split, samples=prepared.samples, text=prepared.text, batch_size=config.optim.batch_size,
                epoch=epoch, seed=config.seed, novel=tuple(prepared.fold.novel),
                novel_pixels=config.data.novel_pixels, mode=prepared.mode, memory=prepared.memory,
                skip_batches=skip), pin=device.type == "cuda")
            batch_index = skip
            tick = time.perf_counter()
            for batch in batches:
                got = time.perf_counter()
                wait_total += got - tick
                lr = lr_at(step=step, steps_per_epoch=steps_per_epoch, optim=config.optim)
                wd = wd_at(step=step, steps_per_epoch=steps_per_epoch, optim=config.optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                    if group.get("wd_schedule"):
                        group["weight_decay"] = wd
                feats = batch.features.to(device, non_blocking=True)
                text = batch.text.to(device, non_blocking=True)
                mask = batch.text_mask.to(device, non_blocking=True)
                targets = batch.targets.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(feats, text, grid=split.grid, text_mask=mask)
                loss = binary_segmentation_loss(logits.float(), targets, text_mask=mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                step += 1
                batch_index += 1
                last_loss = float(loss.detach())
                tick = time.perf_counter()
                compute_total += tick - got
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch, refresh=False)
                if step % config.log_every == 0 or step == 1:
                    _log(metrics_path, {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                                        "data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9)})
                at_end = config.optim.max_steps and step >= total_steps
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or at_end:
                    save_checkpoint(run=run, model=model, optimizer=optimizer, config=config,
                                    position={"epoch": epoch, "batch": batch_index, "step": step})
                if at_end:
                    break
            if config.optim.max_steps and step >= total_steps:
                break
            save_checkpoint(run=run, model=model, optimizer=optimizer, config=config,
                            position={"epoch": epoch + 1, "batch": 0, "step": step})
            if config.val_split and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.optim.epochs):
                val = validate(model=model, config=config, device=device)
                val_history.append({"epoch": epoch + 1, **val})
                _log(metrics_path, {"event": "val", "epoch": epoch + 1, "step": step, **val})
                model.train()
    finally:
        bar.close()
    model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "fusioner"})
    os.replace(tmp, run / "model.safetensors")
    summary = {"steps": step, "final_loss": last_loss, "parameters": counts,
               "data_wait_fraction": wait_total / max(wait_total + compute_total, 1e-9),
               "seconds": wait_total + compute_total, "val": val_history,
               "pretrained_features": split.pretrained}
    write_json_atomic(run / "summary.json", summary)
    from pipeline.plots import plot_curves

    plot_curves(metrics_path=metrics_path, out=run / "curves.png")
    return summary


def validate(*, model, config: TrainConfig, device) -> dict:
    """Novel-class mIoU / FB-IoU on ``config.val_split`` of the vision cache."""
    from pipeline.evaluate import evaluate_split

    result = evaluate_split(model=model, vision_cache=config.data.cache,
                            text_cache=config.data.text_cache or config.data.cache,
                            split=config.val_split, protocol=config.data.protocol, fold=config.data.fold,
                            novel_names=config.data.novel, splits_dir=config.splits_dir, device=device, quiet=True)
    return {"miou": result["miou"], "fb_iou": result["fb_iou"], "episodes": result["episodes"]}
