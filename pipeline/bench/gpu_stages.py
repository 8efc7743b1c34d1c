"""Training stages of ``python -m pipeline.bench gpu``, each one ordinary :func:`~pipeline.training.loop.train`.

- :func:`profiled_cached_steps`: the preset trained from the store (``read_mode stream``, one class
  per sample, as released), its steps profiled by ``torch.profiler`` and then timed
  (:class:`~pipeline.bench.steps.StepWindow`): top operators, samples/s, achieved TFLOP/s;
- :func:`online_steps`: the same preset and batch in online mode (``data.online``): every step
  decodes and augments fresh views in DataLoader workers and runs the frozen encoder on them
  (:class:`~pipeline.training.online.OnlineBatches`), then the same training step; timed alike.

Both runs take the same number of steps, so they log (and wait for the device) equally often.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.bench.steps import StepWindow


def train_overrides(*, work: Path, size: dict, device: torch.device, novel: list[str], steps: int, out: str,
                    classes_per_sample: str = "1", batch_size: int | None = None) -> list[str]:
    """The settings every bench run shares: the bench's store, its held-out shapes, streaming, ``steps`` steps."""
    return [f"data.cache={work / 'cache'}", "data.split=folder/train", "data.protocol=custom",
            "data.novel=[" + ",".join(json.dumps(n) for n in novel) + "]",
            f"data.classes_per_sample={classes_per_sample}", "data.read_mode=stream", f"optim.max_steps={steps}",
            f"optim.batch_size={batch_size or size['batch_size']}", "optim.epochs=1000", "optim.warmup_epochs=1",
            f"out={work / out}", f"device={device}", "log_every=50"]


def _run(*, overrides: list[str], preset: str, window: StepWindow) -> None:
    from pipeline.training.config import build_config
    from pipeline.training.loop import train

    train(config=build_config(preset=preset, overrides=overrides), quiet=True, hooks=[window])


def profiled_cached_steps(*, work: Path, size: dict, device: torch.device, novel: list[str]) -> dict:
    """After ``step_warm`` cached steps, profile ``profile_steps``, then time ``step_timed`` more."""
    window = StepWindow(warm=size["step_warm"], profile=size["profile_steps"], timed=size["step_timed"])
    _run(overrides=train_overrides(work=work, size=size, device=device, novel=novel, steps=window.total_steps,
                                   out="step-cached"), preset=size["preset"], window=window)
    return {"cached": window.record(), "profile": window.operators()}


def online_steps(*, work: Path, root: Path, size: dict, device: torch.device, novel: list[str]) -> dict:
    """Time ``step_timed`` online steps after as many untimed ones as the cached run warms and profiles."""
    window = StepWindow(warm=size["step_warm"] + size["profile_steps"], timed=size["step_timed"])
    online = ["data.online.enabled=true", f"data.online.backbone={size['backbone']}",
              f"data.online.data_root={root}", "data.online.dataset=folder", "data.online.random_init=true",
              f"data.online.workers={size['render_workers']}"]
    if size["input_size"]:
        online.append(f"data.online.input_size={size['input_size']}")
    _run(overrides=train_overrides(work=work, size=size, device=device, novel=novel, steps=window.total_steps,
                                   out="step-online") + online, preset=size["preset"], window=window)
    return window.record()


def online_against_cached(*, work: Path, root: Path, size: dict, device: torch.device, novel: list[str]) -> dict:
    """The profiled cached run and the online run, and how many times faster the cached step is."""
    cached = profiled_cached_steps(work=work, size=size, device=device, novel=novel)
    online = online_steps(work=work, root=root, size=size, device=device, novel=novel)
    return {"profile": cached["profile"], "cached_step": cached["cached"], "online_step": online,
            "cached_over_online": cached["cached"]["samples_per_s"] / online["samples_per_s"]}
