"""Timing and profiling steps of the ordinary training loop, from a hook.

:class:`StepWindow` is a training hook (:class:`~pipeline.training.hooks.HookBase`):
after ``warm`` steps it profiles ``profile`` steps with ``torch.profiler``, then times
``timed`` steps with the device synchronised at both ends, counting the samples those
steps held (an epoch's last batch may be short). What the window measured comes back
as :meth:`StepWindow.record`: samples/s, and with the FLOPs per sample of the run's
model (:func:`pipeline.training.flops.training_flops_per_sample`) the achieved
TFLOP/s and its fraction of the card's dense bf16 peak (:func:`card_peak`).
"""

from __future__ import annotations

import time

import torch

from pipeline.sweep.estimate import PEAK_TFLOPS
from pipeline.training.flops import training_flops_per_sample
from pipeline.training.hooks import HookBase, Loop

# Dense bf16 TFLOP/s by a substring of the card's name (lower case), most specific first.
# The SXM parts share the study estimator's figures; PCIe and NVL parts run at lower clocks.
CARD_PEAKS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h200 nvl", 835.0),
    ("h100", PEAK_TFLOPS["h100"]), ("h200", PEAK_TFLOPS["h200"]),
    ("a100", PEAK_TFLOPS["a100"]), ("l40s", PEAK_TFLOPS["l40s"]),
)
TOP_OPERATORS = 12


def card_peak(name: str | None) -> tuple[float | None, str]:
    """The dense bf16 peak TFLOP/s of a card by its name, and where the figure comes from (or why none)."""
    if not name:
        return None, "no GPU: a CPU has no peak in the table"
    lowered = name.lower()
    for pattern, peak in CARD_PEAKS:
        if pattern in lowered:
            return peak, f"dense bf16 vendor figure for '{pattern}'"
    return None, f"{name}: not in the table of peaks (pipeline/bench/steps.py CARD_PEAKS); fraction not computed"


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepWindow(HookBase):
    """Profile steps (warm, warm + profile], then time steps (warm + profile, warm + profile + timed]."""

    def __init__(self, *, warm: int, timed: int, profile: int = 0, classes: int = 1):
        if warm < 1 or timed < 1 or profile < 0:
            raise ValueError("a step window needs warm >= 1, timed >= 1 and profile >= 0")
        self.warm, self.timed, self.profile, self.classes = warm, timed, profile, classes
        self.profiler, self.events, self.profile_seconds = None, None, None
        self.started = self.seconds = None
        self.start_wall = self.stop_wall = None
        self.samples = 0

    @property
    def total_steps(self) -> int:
        return self.warm + self.profile + self.timed

    def before_train(self, loop: Loop) -> None:
        self.device, self.batch_size = loop.device, loop.config.optim.batch_size
        self.flops = training_flops_per_sample(loop.config.model, grid=tuple(loop.split.grid), classes=self.classes)

    def after_step(self, loop: Loop) -> None:
        begin = self.warm + self.profile
        if self.profile and loop.step == self.warm:
            sync(loop.device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if loop.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.profile_started = time.perf_counter()
        if self.profiler is not None and loop.step == begin:
            self._stop_profiler()
        if loop.step == begin:
            sync(loop.device)
            self.started, self.start_wall = time.perf_counter(), time.time()
        elif self.started is not None and self.seconds is None:
            # The step just done was batch number loop.batch of its epoch; an epoch's last may be short.
            self.samples += min(self.batch_size, loop.samples - (loop.batch - 1) * self.batch_size)
            if loop.step == begin + self.timed:
                sync(loop.device)
                self.seconds, self.stop_wall = time.perf_counter() - self.started, time.time()

    def after_train(self, loop: Loop) -> None:
        if self.profiler is not None:  # the run ended inside the profiled steps
            self._stop_profiler()

    def _stop_profiler(self) -> None:
        sync(self.device)
        self.profile_seconds = time.perf_counter() - self.profile_started
        self.profiler.__exit__(None, None, None)
        self.events, self.profiler = self.profiler.key_averages(), None

    def record(self) -> dict:
        """samples/s of the timed steps, the achieved TFLOP/s and its fraction of the card's peak."""
        if self.seconds is None:
            raise RuntimeError(f"the run ended before its timed steps ({self.total_steps} steps needed)")
        rate = self.samples / self.seconds
        tflops = rate * self.flops / 1e12
        peak, source = card_peak(device_name(self.device))
        return {"timed_steps": self.timed, "samples": self.samples, "seconds": self.seconds, "samples_per_s": rate,
                "steps_per_s": self.timed / self.seconds, "gflop_per_sample": self.flops / 1e9,
                "achieved_tflops": tflops, "peak_tflops": peak, "peak_fraction": tflops / peak if peak else None,
                "peak_note": source, "start_wall": self.start_wall, "stop_wall": self.stop_wall}

    def operators(self, count: int = TOP_OPERATORS) -> dict | None:
        """The profiled steps' top operators by device time (CPU time on a CPU), each with its share."""
        if self.events is None:
            return None
        return top_operators(self.events, device=self.device.type == "cuda", count=count,
                             seconds=self.profile_seconds, steps=self.profile)


def top_operators(events, *, device: bool, count: int, seconds: float, steps: int) -> dict:
    """Operators sorted by their own device time (kernels they launched; CPU time without a device).

    A share is the operator's time over all kernel time (all operator CPU time without a
    device), so shares sum to at most 1. ``device_busy_fraction`` is the kernel time over the
    profiled steps' wall time: how much of the time the card computed at all.
    """
    from torch.autograd import DeviceType

    def own(event) -> float:
        return event.self_device_time_total if device else event.self_cpu_time_total

    operators = [e for e in events if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    if device:
        kernels = sum(e.self_device_time_total for e in events
                      if e.device_type != DeviceType.CPU and not e.is_user_annotation)
    else:
        kernels = 0.0
    total = max(kernels, sum(own(e) for e in operators), 1e-9)  # microseconds
    ranked = sorted((e for e in operators if own(e) > 0), key=own, reverse=True)[:count]
    rows = [{"name": e.key, "ms": own(e) / 1e3, "share": own(e) / total, "calls": int(e.count)} for e in ranked]
    return {"time": "device" if device else "cpu", "steps": steps, "wall_seconds": seconds,
            "total_ms": total / 1e3, "device_busy_fraction": kernels / 1e6 / seconds if device and seconds else None,
            "top": rows}
