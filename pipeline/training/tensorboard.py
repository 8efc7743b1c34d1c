"""TensorBoard event files of a training run, beside ``metrics.jsonl`` (which stays the record).

:class:`TensorBoardWriter` is one more training hook: it writes the training loss,
learning rate and data-wait fraction at the steps the metrics log records, and each
validation score when it is recorded, into ``<run>/tensorboard/``. Every run of a sweep
writes its own folder, so ``tensorboard --logdir runs/`` (or the sweep's output folder)
shows one run or all of them side by side. The writer is ``tensorboardX`` (the
``fusioner[tensorboard]`` extra: protobuf and numpy only, no TensorFlow); the viewer
is the ``tensorboard`` package, installed wherever the files are looked at.
"""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.training.hooks import HookBase, Loop, log_interval

EVENTS_FOLDER = "tensorboard"  # inside the run folder
VALIDATION_SCORES = ("miou", "fb_iou")


def summary_writer(logdir: str, *, purge_step: int | None):
    """A tensorboardX ``SummaryWriter``; a one-line error naming the extra when it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise UserError("train.tensorboard needs the tensorboard extra: pip install 'fusioner[tensorboard]'") from err
    return SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30)


class TensorBoardWriter(HookBase):
    """``train/loss``, ``train/lr``, ``train/data_wait_fraction`` at the logged steps; ``val/miou`` and
    ``val/fb_iou`` at the step of each validation; a resumed run drops the events after its checkpoint."""

    def before_train(self, loop: Loop) -> None:
        self.writer = summary_writer(str(loop.run / EVENTS_FOLDER), purge_step=loop.step if loop.resumed else None)
        self.every = log_interval(log_every=loop.config.log_every, total_steps=loop.total_steps)
        self.validations = len(loop.records.get("val", []))

    def after_step(self, loop: Loop) -> None:
        if loop.step % self.every == 0 or loop.step == 1 or loop.step >= loop.total_steps:
            self.writer.add_scalar("train/loss", loop.loss_value(), loop.step)
            self.writer.add_scalar("train/lr", loop.lr, loop.step)
            self.writer.add_scalar("train/data_wait_fraction", loop.wait_fraction, loop.step)

    def after_epoch(self, loop: Loop) -> None:
        records = loop.records.get("val", [])
        for record in records[self.validations:]:
            for key in VALIDATION_SCORES:
                self.writer.add_scalar(f"val/{key}", record[key], loop.step)
        self.validations = len(records)
        self.writer.flush()

    def after_train(self, loop: Loop) -> None:
        self.writer.close()
