"""Compute as a reader compares it: UNet evaluations (with and without back-propagation) and guidance evaluations."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class UNetCounter:
    """Counts a model's forward calls with a forward hook: rows evaluated, with and without autograd recording
    (a forward recorded with grad is later back-propagated: a VJP). Checkpoint recomputations count too."""

    def __init__(self, model: nn.Module):
        self.handle = model.register_forward_hook(self._hook)
        self.reset()

    def _hook(self, module, args, output):
        x = args[0] if args else None
        rows = int(x.shape[0]) if isinstance(x, Tensor) else 0
        if torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
            self.grad_calls += 1
            self.grad_rows += rows
        else:
            self.calls += 1
            self.rows += rows

    def reset(self) -> None:
        self.calls = self.rows = self.grad_calls = self.grad_rows = 0

    def remove(self) -> None:
        self.handle.remove()

    def per_image(self, n_items: int, cfg_rows: int) -> dict:
        """UNet evaluations per image: each eps of an item is one evaluation (``cfg_rows`` rows when the
        classifier-free-guidance pair is batched into one call)."""
        total = (self.rows + self.grad_rows) / cfg_rows / n_items
        grad = self.grad_rows / cfg_rows / n_items
        return {"unet_forward_per_image": round(total, 2), "unet_backward_per_image": round(grad, 2),
                "batched_unet_calls": self.calls + self.grad_calls}
