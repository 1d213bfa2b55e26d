"""Per-item early stopping: an item that stopped improving (or reached a target) stops changing."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback

from doodl_lightning.checks import check_finite


class ItemEarlyStopping(Callback):
    """Stop optimising an item after ``patience`` steps without a ``min_delta`` improvement of its
    loss, or once its loss is <= ``stop_at``. Stopped items keep their latents bit-identical (their
    updates are masked); the fit ends when every item on every rank has stopped. Local per rank:
    one rank's items never stop another's (unlike Lightning's EarlyStopping, which stops all ranks).

    The loss watched is the one the best iteration is chosen by (``Evaluation.reward``): the total loss, or with a
    regulariser the reward terms alone, so an item stops when the result it would keep stops improving.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, stop_at: float | None = None):
        check_finite(min_delta=min_delta, stop_at=stop_at)
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta, self.stop_at = patience, min_delta, stop_at
        self.best: torch.Tensor | None = None
        self.wait: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = pl_module.last
        loss = getattr(last, "reward", last.total).detach().cpu()
        if self.best is None:
            self.best, self.wait = loss.clone(), torch.zeros(len(loss), dtype=torch.long)
        else:
            improved = loss < self.best - self.min_delta
            self.best = torch.where(improved, loss, self.best)
            self.wait = torch.where(improved, torch.zeros_like(self.wait), self.wait + 1)
        stop = self.wait >= self.patience
        if self.stop_at is not None:
            stop |= loss <= self.stop_at
        active = pl_module.active
        active &= ~stop.to(active.device)
        all_stopped = not bool(active.any())
        if trainer.strategy.reduce_boolean_decision(all_stopped, all=True):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.wait = state_dict["best"], state_dict["wait"]
