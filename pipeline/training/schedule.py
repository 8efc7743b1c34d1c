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


def param_groups(model) -> list[dict]:
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
