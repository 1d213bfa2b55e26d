"""A test-only callback that signals its own process mid-run, like a pre-empted or interrupted job."""
from __future__ import annotations

import os
import signal as signals

from lightning.pytorch import Callback


class KillAfter(Callback):
    """Send ``signal`` (SIGKILL, SIGTERM or SIGINT) ``times`` times to this process once ``step`` steps have
    finished: at the end of that step, or with ``mid_step`` at the start of the next, so that it lands while a
    step is being computed. ``rank``: only in the process of that global rank (several processes), as when one
    task of a job is signalled; every process by default."""

    def __init__(self, step: int, signal: str = "SIGKILL", mid_step: bool = False, times: int = 1,
                 rank: int | None = None):
        self.step, self.signum, self.mid_step, self.times = step, getattr(signals, signal), mid_step, times
        self.rank = rank

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mid_step:
            self._send(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.mid_step:
            self._send(trainer)


class KillAt(Callback):
    """Send ``signal`` to this process from the Lightning hook ``hook`` once ``step`` steps have finished, to land
    at a chosen moment between two steps: ``on_train_epoch_end`` (each epoch is one step here) comes after every
    callback of step ``step`` has written its outputs, ``on_train_epoch_start`` before step ``step + 1`` begins,
    ``on_train_end`` while the final outputs are written (after those of the callbacks listed before this one).
    ``rank``: only in the process of that global rank, as ``KillAfter``."""

    HOOKS = ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end",
             "on_train_end")

    def __init__(self, step: int, hook: str, signal: str = "SIGTERM", rank: int | None = None):
        if hook not in self.HOOKS:
            raise ValueError(f"hook must be one of {self.HOOKS}, got {hook}")
        self.step, self.hook, self.signum, self.rank = step, hook, getattr(signals, signal), rank

    def _send(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._send(trainer, "on_train_epoch_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer, "on_train_batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._send(trainer, "on_train_batch_end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._send(trainer, "on_train_epoch_end")

    def on_train_end(self, trainer, pl_module) -> None:
        self._send(trainer, "on_train_end")
