"""Hooks: checked at registration, end-of-run files as hooks, and a training step that never waits for the device."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic_data import train_overrides
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.training.config import build_config
from pipeline.training.hooks import HookBase, check_hooks
from pipeline.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(HookBase):
    def __init__(self) -> None:
        self.calls = {"before_train": 0, "after_step": 0, "after_epoch": 0, "after_train": 0}

    def before_train(self, loop) -> None:
        self.calls["before_train"] += 1

    def after_step(self, loop) -> None:
        self.calls["after_step"] += 1

    def after_epoch(self, loop) -> None:
        self.calls["after_epoch"] += 1

    def after_train(self, loop) -> None:
        self.calls["after_train"] += 1
        self.files_then = sorted(p.name for p in loop.run.iterdir())


class Misspelt(HookBase):
    def after_stepp(self, loop) -> None:  # never called by the loop: refused
        pass


class NotAHook:
    def after_step(self, loop) -> None:
        pass


def test_a_misspelt_method_or_a_plain_object_is_refused_at_registration():
    with pytest.raises(TypeError, match=r"Misspelt.after_stepp is not a hook method"):
        check_hooks([Misspelt()])
    with pytest.raises(TypeError, match="NotAHook is not a training hook: subclass"):
        check_hooks([NotAHook()])
    base = HookBase()
    assert check_hooks([base]) == [base]  # every method a no-op


def test_user_hooks_run_before_the_end_of_run_files(gen, tmp_path):
    hook = Counting()
    summary = train(config=build_config(preset="tiny", overrides=train_overrides(
        gen, tmp_path / "run", "optim.epochs=2")), quiet=True, hooks=[hook])
    assert hook.calls == {"before_train": 1, "after_step": summary["steps"], "after_epoch": 2, "after_train": 1}
    assert "model.safetensors" not in hook.files_then and "summary.json" not in hook.files_then
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == summary and (tmp_path / "run" / "curves.png").is_file()


class Failing(HookBase):
    def after_step(self, loop) -> None:
        if loop.step == 2:
            raise RuntimeError("disk gone")


def test_a_failed_run_writes_no_final_weights_or_summary(gen, tmp_path):
    with pytest.raises(RuntimeError, match="disk gone"):
        train(config=build_config(preset="tiny", overrides=train_overrides(gen, tmp_path / "run")), quiet=True,
              hooks=[Failing()])
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "summary.json").exists()


# --------------------------------------------------------------------------- #
# No host synchronisation inside the step
# --------------------------------------------------------------------------- #

# Operations that make the host wait for the device: reading a value (item, float, bool, int),
# and results whose size depends on the values (boolean indexing, nonzero, masked_select, unique).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class SyncCounter(TorchDispatchMode):
    """Counts syncing aten calls (a boolean-mask index counts too) while ``counting`` is on."""

    def __init__(self) -> None:
        super().__init__()
        self.counting, self.seen = True, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) if i is not None)
        if self.counting and (name in SYNCING or bool_index):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class Window(HookBase):
    """Switches the counter on after the first step and records the counts of each later step."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter, self.per_step = counter, []

    def after_step(self, loop) -> None:
        self.per_step.append(list(self.counter.seen))
        self.counter.seen.clear()


def test_training_steps_between_logs_never_synchronise(gen, tmp_path, monkeypatch):
    """Between log steps a step reads no device value. The optimiser's own step counters are host
    scalars by design (on CUDA the fused AdamW keeps them on the device), so its step is not counted.
    Every seen class of a view in one sample (padded class slots, the attention mask) is the path
    with the most to read; one class per sample runs the same code without the mask."""
    counter = SyncCounter()
    step = torch.optim.AdamW.step

    def uncounted(self, *args, **kwargs):
        counter.counting = False
        try:
            return step(self, *args, **kwargs)
        finally:
            counter.counting = True

    monkeypatch.setattr(torch.optim.AdamW, "step", uncounted)
    window = Window(counter)
    config = build_config(preset="tiny", overrides=train_overrides(
        gen, tmp_path / "run", "log_every=2", "optim.max_steps=40", "optim.epochs=20", "optim.grad_clip=1.0",
        "data.classes_per_sample=all"))
    with counter:
        train(config=config, quiet=False, hooks=[window])
    # every second step (and the first and last) is logged and reads the loss; the steps between read nothing
    assert len(window.per_step) == 40
    unlogged = [seen for step, seen in enumerate(window.per_step, start=1) if step % 2 and step not in (1, 40)]
    assert len(unlogged) == 19 and all(seen == [] for seen in unlogged), unlogged
    assert "_local_scalar_dense" in window.per_step[1]  # the counter does see a logged read
