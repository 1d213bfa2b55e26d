"""Guidance on eps at every sampler step: the baselines of ``latent_traversal=False`` (official doodl.py).

The official ``SteppingLayer`` adds a gradient to the CFG noise prediction of each half-step
(``noise_pred - sqrt(1 - abar_t) * clip_grad`` with ``clip_grad = -d(grad_scale * loss)/dx_t``); the
gradient is either the one-step estimate (``one_step_baseline``, after diffusers' CLIP-guided
community pipeline) or the gradient through the rest of the chain.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..checks import check_finite
from .denoiser import Eps
from .schedule import Schedule

GradFn = Callable[[Tensor, int], Tensor]  # (x_t, t) -> d(grad_scale * loss)/dx_t


class GuidedEps:
    """eps'(x_t) = eps(x_t) + sqrt(1 - abar_t) grad(x_t, t): classifier guidance on the noise prediction.

    Adding the loss gradient to eps moves the predicted clean latent downhill on the loss. Wraps any
    eps callable, so it works with both samplers; run the sampler under ``torch.no_grad()``, ``grad``
    takes its gradient inside.
    """

    def __init__(self, eps: Eps, grad: GradFn, schedule: Schedule):
        self.eps, self.grad = eps, grad
        self.abar = dict(zip(schedule.timesteps, schedule.alphas_cumprod))

    def __call__(self, x: Tensor, t: int) -> Tensor:
        e = self.eps(x, t)
        return e + (1 - self.abar[int(t)]) ** 0.5 * self.grad(x, t)


class OneStepGradient:
    """The official one-step baseline's gradient (doodl.py ``cond_fn``, ``one_step_baseline=True``).

    1. eps_u = eps(x_t) with the UNCONDITIONAL embedding
    2. x0_hat = (x_t - sqrt(1 - abar_t) eps_u) / sqrt(abar_t)
    3. sample = x0_hat sqrt(1 - abar_t) + x_t (1 - sqrt(1 - abar_t))      (as the official code)
    4. returns d(grad_scale * loss(sample))/dx_t
    ``loss_fn`` maps latents (N, C, h, w) to per-item losses (N,) (decode + guidance).
    """

    def __init__(self, eps_uncond: Eps, loss_fn: Callable[[Tensor], Tensor], schedule: Schedule, grad_scale: float):
        check_finite(grad_scale=grad_scale)
        if grad_scale < 0:
            raise ValueError(f"grad_scale must be >= 0, got {grad_scale}")
        self.eps_uncond, self.loss_fn, self.grad_scale = eps_uncond, loss_fn, float(grad_scale)
        self.abar = dict(zip(schedule.timesteps, schedule.alphas_cumprod))

    def __call__(self, x: Tensor, t: int) -> Tensor:
        abar = self.abar[int(t)]
        fac = (1 - abar) ** 0.5
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            x0_hat = (xr - fac * self.eps_uncond(xr, t)) / abar**0.5
            sample = x0_hat * fac + xr * (1 - fac)
            (g,) = torch.autograd.grad(self.loss_fn(sample).sum() * self.grad_scale, xr)
        return g
