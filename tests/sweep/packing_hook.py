"""Hooks for the packed-sweep tests, loaded in the sweep's run processes through ``FUSIONER_HOOKS``.

``RecordSpan`` (``FUSIONER_SPANS=DIR``): each run process writes when its training started and
ended to ``DIR/<pid>.json`` and sleeps ``FUSIONER_SPAN_SLEEP`` seconds after each step, so that
runs last long enough for their overlap (or its absence) to show; with ``FUSIONER_SPAN_EXPECT=N`` a run
waits after its first step (a minute at most) until N runs have started, so that a second run whose
launcher is slow to load still starts while the first one lives, where the sweep lets it.

``OutOfMemory`` (``FUSIONER_OOM=DIR``): every run process leaves a file ``DIR/live-<pid>`` (alive while
that process is). A run of variant ``oom-first`` raises ``torch.OutOfMemoryError`` after its first step
on its first attempt, and on any later attempt as soon as another run process is alive beside it,
as a GPU too small for both would; a run of variant ``oom-always`` raises it at every attempt; a
run of variant ``slow`` sleeps a second after each step, to be alive when a retry could start beside it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from helpers import alive

from pipeline.training.hooks import HookBase


class RecordSpan(HookBase):
    def __init__(self) -> None:
        self.folder = Path(os.environ["FUSIONER_SPANS"])
        self.path = self.folder / f"{os.getpid()}.json"
        self.pause = float(os.environ.get("FUSIONER_SPAN_SLEEP", "0"))
        self.expect = int(os.environ.get("FUSIONER_SPAN_EXPECT", "0"))

    def before_train(self, loop) -> None:
        self.start = time.time()
        (self.folder / f"started-{os.getpid()}").touch()

    def after_step(self, loop) -> None:
        time.sleep(self.pause)
        if loop.step == 1 and self.expect:  # a launcher slow to load under load must not hide an overlap
            deadline = time.monotonic() + 60
            while len(list(self.folder.glob("started-*"))) < self.expect and time.monotonic() < deadline:
                time.sleep(0.05)

    def after_train(self, loop) -> None:
        self.path.write_text(json.dumps({"run": str(loop.run), "start": self.start, "end": time.time()}))


class OutOfMemory(HookBase):
    def __init__(self) -> None:
        self.folder = Path(os.environ["FUSIONER_OOM"])
        self.live = self.folder / f"live-{os.getpid()}"

    def before_train(self, loop) -> None:
        self.variant = json.loads((Path(loop.run) / "run.json").read_text())["labels"]["variant"]
        self.first = self.folder / f"oomed-{Path(loop.run).name}"
        self.live.write_text(str(loop.run))

    def _others(self) -> list[str]:
        return [p.read_text() for p in self.folder.glob("live-*")
                if p != self.live and alive(int(p.name.split("-")[1]))]

    def after_step(self, loop) -> None:
        if self.variant == "slow":
            time.sleep(1.0)
        if self.variant == "oom-always":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test hook)")
        if self.variant != "oom-first":
            return
        if not self.first.exists():
            self.first.write_text("1")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test hook, first attempt)")
        others = self._others()
        if others:
            raise torch.OutOfMemoryError(f"CUDA out of memory beside {others} (test hook)")
