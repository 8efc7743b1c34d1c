"""A fault hook for the killed-sweep test, loaded in the sweep's run processes through ``FUSIONER_HOOKS``.

``FUSIONER_FREEZE_AT=STEP:CLAIM``: the first run process to create the file CLAIM (atomically)
writes its pid and run folder into it and stops itself (SIGSTOP) right after step STEP and its
checkpoint, so the test can kill the sweep with that run frozen there; the other runs go on.
"""

from __future__ import annotations

import os
import signal

from pipeline.training.hooks import HookBase


class FreezeAfterStep(HookBase):
    def __init__(self) -> None:
        step, _, self.claim = os.environ["FUSIONER_FREEZE_AT"].partition(":")
        self.step = int(step)

    def after_step(self, loop) -> None:
        if loop.step != self.step:
            return
        try:
            handle = os.open(self.claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        os.write(handle, f"{os.getpid()} {loop.run}\n".encode())
        os.close(handle)
        os.kill(os.getpid(), signal.SIGSTOP)
