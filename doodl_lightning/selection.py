"""What the gradient-free searches share (best-of-N, zero-order search, FK steering): each training step proposes
something for every item without back-propagating, and each item keeps the best proposal seen so far."""
from __future__ import annotations

import torch
from torch import Tensor

from .lightning_compat import attached_trainer
from .objective import Evaluation
from .search import NoiseSearch


class SelectionSearch(NoiseSearch):
    """A ``NoiseSearch`` that keeps, per item, the proposal of the lowest reward loss (``Evaluation.reward``:
    regularisers excluded, as ReNO's ``imageselect``), in ``best_loss`` (a buffer, so a resumed search compares
    later proposals with the best found before the interruption).

    ``rounds``: the training steps the search needs (``trainer.max_steps`` must allow them; None = as many as the
    trainer runs). A subclass proposes in ``training_step`` and ends it with ``finish_step``."""

    rounds: int | None = None

    def setup(self, stage: str) -> None:
        fresh = not self.local_items
        super().setup(stage)
        if fresh:
            self.register_buffer("best_loss", torch.full((len(self.local_items),), float("inf"), dtype=torch.float64))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        trainer = attached_trainer(self)
        max_steps = trainer.max_steps if trainer is not None else -1
        if self.rounds is not None and 0 <= max_steps < self.rounds:
            raise ValueError(f"trainer.max_steps ({max_steps}) is below {self.rounds_key} ({self.rounds}), the steps this "
                             f"search needs: set --trainer.max_steps {self.rounds} or lower {self.rounds_key}")

    @property
    def rounds_key(self) -> str:
        """The setting that fixes ``rounds`` (for error messages)."""
        return "model.candidates"

    def configure_optimizers(self):
        # nothing is back-propagated; stepping an optimiser with no gradients changes nothing but advances
        # Lightning's step counter (global_step, checkpoints, max_steps) as it does for DOODL
        return torch.optim.SGD([self.latents], lr=0.0)

    def loss_fn(self, idx: list[int], stream_step: int):
        return super().loss_fn(idx, 0)  # one set of cutouts for every proposal: they are compared on one measure

    @torch.no_grad()
    def keep_better(self, loss: Tensor, z: Tensor) -> Tensor:
        """Keep latent pairs ``z`` (N, P, C, h, w) where their reward loss ``loss`` (N,) beats the best so far (active
        items only; strict, so the first of equal proposals stays); the mask of the items that changed."""
        loss = loss.detach().to(self.best_loss)
        better = self.active & (loss < self.best_loss)
        self.latents[better] = z[better].to(self.latents)
        self.best_loss[better] = loss[better]
        return better

    def finish_step(self, ev: Evaluation) -> None:
        """Advance the step counter, record ``ev`` as the step's evaluation, log, and stop after ``rounds``."""
        self.stepped = self.active.clone()
        self.optimizers().step()
        self.last = ev
        self.log_step(ev, None)
        if self.rounds is not None and self.global_step >= self.rounds:
            self.trainer.should_stop = True
