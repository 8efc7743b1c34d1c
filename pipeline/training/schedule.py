"""Learning-rate and weight-decay schedules of the released recipe, and the optimiser's parameter groups."""

from __future__ import annotations

import math

from pipeline.training.config import OptimConfig

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


def param_groups(model, *, optim: OptimConfig | None = None) -> list[dict]:
    """Fusion weights (decayed on the ramp), fusion norms and biases (no decay), decoder.

    With ``optim.decoder_schedule == "constant"`` (the released recipe) the decoder group
    carries ``constant_lr``: it stays at ``decoder_lr`` with no weight decay, which is
    exactly a separate Adam at a constant learning rate (AdamW without decay is Adam).
    """
    decay, no_decay, decoder = [], [], []
    # The released class-type embedding is a 1 x d matrix, so its weight decay applies to it.
    released = getattr(getattr(getattr(model, "config", None), "fusion", None), "init", "product") == "released"
    for name, param in model.named_parameters():
        if name.startswith("decoder."):
            decoder.append(param)
        elif released and name == "fusion.class_type":
            decay.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    decoder_group = {"params": decoder, "weight_decay": 0.0}
    if optim is not None and optim.decoder_schedule == "constant":
        decoder_group["constant_lr"] = optim.decoder_lr
    groups = [{"params": decay, "wd_schedule": True}, {"params": no_decay, "weight_decay": 0.0}, decoder_group]
    return [g for g in groups if g["params"]]


def set_group_rates(optimizer, *, lr: float, wd: float) -> None:
    """This step's learning rates and weight decay on every group."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("constant_lr", lr)
        if group.get("wd_schedule"):
            group["weight_decay"] = wd
