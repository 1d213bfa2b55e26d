"""The one-step guidance baseline DOODL is compared against (official ``one_step_baseline``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedule import Schedule

Eps = Callable[[Tensor, int], Tensor]


class OneStepGuidance:
    """eps'(x_t) = eps(x_t) + scale sqrt(1 - abar_t) d loss(x0_hat(x_t)) / d x_t.

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) is the one-step prediction of the clean
    latent; adding the gradient to eps moves x0_hat downhill on the loss (the official code returns
    -g and subtracts it: the same thing). Wraps any eps callable, so it works with both samplers;
    run the sampler under ``torch.no_grad()``, the gradient is taken inside.
    ``loss_fn`` maps predicted clean latents (N, C, h, w) to per-item losses (N,).
    """

    def __init__(self, eps: Eps, loss_fn: Callable[[Tensor], Tensor], schedule: Schedule, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"one-step guidance scale must be >= 0, got {scale}")
        self.eps, self.loss_fn, self.scale = eps, loss_fn, float(scale)
        self.abar = dict(zip(schedule.timesteps, schedule.alphas_cumprod))

    def __call__(self, x: Tensor, t: int) -> Tensor:
        abar = self.abar[int(t)]
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            e = self.eps(xr, t)
            x0_hat = (xr - (1 - abar) ** 0.5 * e) / abar**0.5
            (g,) = torch.autograd.grad(self.loss_fn(x0_hat).sum(), xr)
        return e.detach() + self.scale * (1 - abar) ** 0.5 * g
