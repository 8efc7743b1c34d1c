"""Stage two: train the fusion module and the decoder from cached features.

No encoder runs here: batches come from a vision store (patch tokens, view
masks) and a text store (class-name embeddings), which may be the same store
(CLIP) or two (``dino-b`` vision with ``bert-b`` text).

The recipe is the released one: AdamW, learning rate warmed up linearly over
10 epochs to 1e-3, then cosine-decayed to 2e-6, weight decay cosine 0.01 ->
0.4 on the fusion module, binary cross-entropy per class map with ignore-labelled pixels
left out. The batch order is a function of (seed, epoch), and checkpoints hold
the model, optimiser and position, so ``--resume`` continues a killed run to
the same weights as an uninterrupted one.

The loop itself only steps the optimiser over the batches of one
:class:`~pipeline.training.sources.BatchSource` (memory, stream or online: the
loop does not know which); logging, checkpoints, the progress bar, the
end-of-run files and (from the eval layer) validation are hooks called around
steps and epochs (:mod:`pipeline.training.hooks`). The loss stays on the device
between log steps: a step never waits for the GPU to finish.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.config import to_dict, write_json_atomic
from pipeline.encode.registry import registry_decoder_blocks
from pipeline.encode.text import class_embeddings
from pipeline.errors import UserError, setting
from pipeline.model import build_model, decoder_channels, make_model_config
from pipeline.data.labels import TRAIN_SPLITS
from pipeline.data.protocols import resolve_fold
from pipeline.runtime import resolve_device
from pipeline.store.layout import open_store
from pipeline.store.splits import list_splits
from pipeline.store.reader import load_into_memory, open_split
from pipeline.training.batches import image_pairs, view_table
from pipeline.training.checkpoints import checkpoint_problem, latest_checkpoint, load_train_state, set_rng_state
from pipeline.training.config import (
    RESUME_FREE_KEYS,
    TrainConfig,
    resume_identity,
    upgrade_run_config,
)
from pipeline.training.hooks import (
    Checkpointer,
    Curves,
    FinalWeights,
    HookBase,
    Loop,
    MetricsLog,
    ProgressBar,
    SummaryFile,
    check_hooks,
    run_hooks,
)
from pipeline.training.inputs import write_run_inputs
from pipeline.training.lists import listed_samples
from pipeline.training.losses import binary_segmentation_loss
from pipeline.training.schedule import lr_at, param_groups, set_group_rates, wd_at
from pipeline.training.sources import MemorySource, Sampling, StreamSource, TrainingData


def training_split_name(cache: str, split: str | None) -> str | None:
    if split:
        return split
    names = [s for s in list_splits(open_store(cache)) if s.split("/")[-1] in TRAIN_SPLITS]
    if len(names) == 1:
        return names[0]
    raise UserError(f"{cache}: name the training split with data.split (training splits: {', '.join(names) or 'none'})")


def prepare_data(config: TrainConfig) -> TrainingData:
    """The run's samples, class embeddings and batch source: cached (memory or stream) or online."""
    data = config.data
    if data.online.enabled:
        from pipeline.training.online import prepare_online

        return prepare_online(config)
    split = open_split(store=data.cache, split=training_split_name(data.cache, data.split))
    fold = resolve_fold(protocol=data.protocol, fold=data.fold, novel=data.novel, class_names=split.class_names)
    text = class_embeddings(text_store=data.text_store, names=split.class_names)
    if data.train_lists:
        samples = listed_samples(split=split, protocol=data.protocol, fold=data.fold, splits_dir=data.train_lists,
                                 classes_per_sample=data.classes_per_sample)
    else:
        samples = image_pairs(split=split, seen=fold.seen, classes_per_sample=data.classes_per_sample)
    mode = data.read_mode
    if mode == "auto":
        size_gb = split.group["features"].nbytes / 2**30 + split.group["masks"].nbytes / 2**30
        mode = "memory" if size_gb <= data.memory_limit_gb else "stream"
    device = resolve_device(config.device)
    cached = dict(split=split, samples=samples, table=view_table(split), text=text,
                  sampling=Sampling(batch_size=config.optim.batch_size, seed=config.seed, novel=tuple(fold.novel),
                                    novel_pixels=data.novel_pixels))
    if mode == "memory":
        source = MemorySource(memory=load_into_memory(split), feature_noise=data.feature_noise,
                              pin=device.type == "cuda", **cached)
    else:
        source = StreamSource(device=device, readers=data.readers, **cached)
    return TrainingData(source=source, split=split, samples=samples, text=text, fold=fold,
                        vision_dim=int(split.group["features"].shape[2]))


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def fit_model_config(config: TrainConfig, data: TrainingData) -> TrainConfig:
    """A copy of ``config`` whose model input dims and output size are the stores', whatever it said."""
    config = copy.deepcopy(config)
    vision_dim, text_dim = data.vision_dim, data.text.shape[1]
    if config.model.vision_dim != vision_dim or config.model.text_dim != text_dim:
        config.model = make_model_config(vision_dim=vision_dim, text_dim=text_dim, preset="paper",
                                         overrides={k: v for k, v in to_dict(config.model).items()
                                                    if k not in ("vision_dim", "text_dim")})
    config.model.decoder.out_size = data.split.input_size
    if not config.model.decoder.channels:  # released: as wide as the fusion module, the encoder's depth k
        config.model.decoder.channels = decoder_channels(
            config.model, encoder_blocks=registry_decoder_blocks(getattr(data.split, "encoder", "")))
    return config


def _check_run_folder(config: TrainConfig, *, resume: bool) -> None:
    run = Path(config.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"{setting('out')} {run} is a file, not a folder for a run; choose another {setting('out')}")
    if run.exists() and (run / "config.json").exists() and not resume:
        if latest_checkpoint(run) is not None:
            raise UserError(f"{run} already holds a run; pass {setting('resume')} to continue it or choose another "
                            f"{setting('out')}")


def _check_resume_identity(config: TrainConfig, *, resume: bool) -> None:
    run = Path(config.out)
    if resume and (run / "config.json").exists():
        saved = upgrade_run_config(json.loads((run / "config.json").read_text()))
        if resume_identity(saved) != resume_identity(config):
            raise UserError(f"{run}: {setting('resume')} with a different config than the run was started with "
                            f"(only {', '.join(RESUME_FREE_KEYS)} may change)")


def _start(config: TrainConfig, data: TrainingData, *, resume: bool) -> Loop:
    """Model, optimiser and position: fresh, or restored from the run's latest checkpoint."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    if device.type == "cuda" and model.decoder is not None:
        model.decoder.to(memory_format=torch.channels_last)  # cuDNN's fast layout for the conv decoder
    groups = param_groups(model, optim=config.optim)
    # A parameter-free variant (fusion.mode frozen) has nothing to optimise: it trains no step.
    # The fused kernel updates every parameter in one launch; it exists for CUDA tensors only.
    optimizer = torch.optim.AdamW(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  fused=device.type == "cuda") if groups else None
    position = {"epoch": 0, "batch": 0, "step": 0}
    run = Path(config.out)
    if resume:
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            saved = sorted((run / "checkpoints").glob("step-*"))
            reason = f" (newest: {checkpoint_problem(saved[-1])})" if saved else ""
            raise UserError(f"{setting('resume')}: no checkpoint in {run} that can be read{reason}; the same "
                            f"command without {setting('resume')} starts the run over")
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        state = load_train_state(checkpoint, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        position = state["position"]
        set_rng_state(state.get("rng"))
    steps_per_epoch = -(-len(data.samples) // config.optim.batch_size)
    total = config.optim.epochs * steps_per_epoch
    if config.optim.max_steps:
        total = min(total, config.optim.max_steps)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    forward = torch.compile(model) if config.compile else None
    return Loop(config=config, run=run, model=model, forward=forward, optimizer=optimizer, device=device, bf16=bf16,
                split=data.split, steps_per_epoch=steps_per_epoch, total_steps=total,
                epoch=position["epoch"], batch=position["batch"], step=position["step"], resumed=resume,
                samples=len(data.samples), read_mode=data.mode, fold_novel=list(data.fold.novel))


def train_step(loop: Loop, batch) -> torch.Tensor:
    """One optimiser step on one batch, under the released schedules; returns the loss, on the device.

    Nothing here waits for the device: the loss is read (``float``) only where a hook logs it.
    """
    optim = loop.config.optim
    lr = lr_at(step=loop.step, steps_per_epoch=loop.steps_per_epoch, optim=optim)
    wd = wd_at(step=loop.step, steps_per_epoch=loop.steps_per_epoch, optim=optim)
    set_group_rates(loop.optimizer, lr=lr, wd=wd)
    feats, text, mask, targets = batch.to_device(loop.device)
    with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.bf16):
        logits = (loop.forward or loop.model)(feats, text, grid=loop.split.grid, text_mask=mask)
    loss = binary_segmentation_loss(logits.float(), targets, text_mask=mask, reduction=optim.loss_reduction)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), optim.grad_clip)
    loop.optimizer.step()
    loop.lr = lr
    return loss.detach()


def _run_epochs(loop: Loop, data: TrainingData, hooks: Sequence[HookBase]) -> None:
    loop.model.train()
    while loop.epoch < loop.config.optim.epochs and not loop.finished:
        tick = time.perf_counter()
        for batch in data.source.batches(epoch=loop.epoch, skip=loop.batch):
            got = time.perf_counter()
            loop.wait_seconds += got - tick
            loop.loss = train_step(loop, batch)
            loop.step += 1
            loop.batch += 1
            tick = time.perf_counter()
            loop.compute_seconds += tick - got
            run_hooks(hooks, "after_step", loop)
            if loop.finished:
                break
        if loop.finished:
            break
        loop.epoch, loop.batch = loop.epoch + 1, 0
        run_hooks(hooks, "after_epoch", loop)
        loop.model.train()


def train(*, config: TrainConfig, resume: bool = False, quiet: bool = False,
          hooks: Sequence[HookBase] = ()) -> dict:
    """Train from the cache; returns a summary (final loss, steps, timing, validation records).

    ``hooks`` (:class:`~pipeline.training.hooks.HookBase` subclasses) run after the built-in
    ones (metrics log, checkpoints, progress bar) and before the end-of-run files (final
    weights, ``summary.json``, curves); validation on ``config.val_split`` is such a hook,
    supplied by :func:`pipeline.runs.train_and_validate`.
    """
    hooks = check_hooks(hooks)
    _check_run_folder(config, resume=resume)
    data = prepare_data(config)
    config = fit_model_config(config, data)
    _check_resume_identity(config, resume=resume)
    loop = _start(config, data, resume=resume)
    if resume and loop.step >= loop.total_steps and (loop.run / "summary.json").is_file():
        return json.loads((loop.run / "summary.json").read_text())  # finished already: nothing to redo
    loop.run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(loop.run / "config.json", config)
    write_run_inputs(run=loop.run, vision_store=config.data.cache, text_store=config.data.text_store,
                     class_names=data.split.class_names, embeddings=data.text,
                     training_split=getattr(data.split, "split", None))
    everything = [MetricsLog(), Checkpointer(), ProgressBar(quiet=quiet), *hooks,
                  FinalWeights(), SummaryFile(), Curves()]
    run_hooks(everything, "before_train", loop)
    try:
        if loop.optimizer is not None:
            _run_epochs(loop, data, everything)
        loop.completed = True
    finally:
        run_hooks(everything, "after_train", loop)
    return loop.summary
