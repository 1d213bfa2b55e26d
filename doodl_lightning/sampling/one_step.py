"""Guidance on eps at every sampler step: the baselines of ``latent_traversal=False`` (official doodl.py).

The official ``SteppingLayer`` adds a gradient to the CFG noise prediction of each half-step
(``noise_pred - sqrt(1 - abar_t) * clip_grad`` with ``clip_grad = -d(grad_scale * loss)/dx_t``); the
gradient is either the one-step estimate (``one_step_baseline``, after diffusers' CLIP-guided
community pipeline) or the gradient through the rest of the chain.

Its rectified-flow counterpart (SD3 / FLUX, x_sigma = (1 - sigma) x_0 + sigma eps, v = eps - x_0): the one-step
estimate x0_hat = x - sigma v from the unconditional velocity (``FlowOneStepGradient``), its gradient added to the
velocity of every Euler step (``GuidedVelocity``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..checks import check_finite
from .denoiser import Eps
from .flow import FlowSchedule, Velocity
from .schedule import Schedule

GradFn = Callable[[Tensor, int], Tensor]  # (x_t, t) -> d(grad_scale * loss)/dx_t


def _check_grad_scale(grad_scale: float) -> None:
    check_finite(grad_scale=grad_scale)
    if grad_scale < 0:
        raise ValueError(f"grad_scale must be >= 0, got {grad_scale}")


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
        _check_grad_scale(grad_scale)
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


class GuidedVelocity:
    """v'(x, t) = v(x, t) + sigma grad(x, t): the flow counterpart of ``GuidedEps``.

    The one-step estimate x0_hat = x - sigma v' moves by -sigma^2 grad, downhill on the loss, as ``GuidedEps``'s
    eps + sqrt(1 - abar) grad moves DDIM's x0_hat by -(1 - abar) / sqrt(abar) grad; carrying that rule over exactly
    (the score shift of classifier guidance) would give v + sigma / (1 - sigma) grad, infinite at the chain's first
    sigma = 1, so the flow form keeps the noise scale sigma and drops the 1 / (1 - sigma). Wraps any velocity
    callable (``flow``, ``flow_edict``); run the sampler under ``torch.no_grad()``, ``grad`` takes its gradient inside.
    """

    def __init__(self, velocity: Velocity, grad: GradFn, schedule: FlowSchedule):
        self.velocity, self.grad = velocity, grad
        self.sigma = dict(zip(schedule.timesteps, schedule.sigmas))

    def __call__(self, x: Tensor, t: float) -> Tensor:
        v = self.velocity(x, t)
        return v + self.sigma[t] * self.grad(x, t).to(v.dtype)


class FlowOneStepGradient:
    """The one-step baseline's gradient on a rectified-flow chain (``OneStepGradient``'s counterpart).

    1. v_u = v(x_sigma) with the UNCONDITIONAL (negative prompt's) velocity, as the official code's eps_u
    2. x0_hat = x_sigma - sigma v_u          (x_sigma = (1 - sigma) x_0 + sigma eps and v = eps - x_0)
    3. returns d(grad_scale * loss(x0_hat))/dx_sigma, through the velocity call
    ``loss_fn`` maps latents (N, C, h, w) to per-item losses (N,) (decode + guidance).
    """

    def __init__(self, velocity_uncond: Velocity, loss_fn: Callable[[Tensor], Tensor], schedule: FlowSchedule,
                 grad_scale: float):
        _check_grad_scale(grad_scale)
        self.velocity_uncond, self.loss_fn, self.grad_scale = velocity_uncond, loss_fn, float(grad_scale)
        self.sigma = dict(zip(schedule.timesteps, schedule.sigmas))

    def __call__(self, x: Tensor, t: float) -> Tensor:
        sigma = self.sigma[t]
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            x0_hat = xr - sigma * self.velocity_uncond(xr, t).to(xr.dtype)
            (g,) = torch.autograd.grad(self.loss_fn(x0_hat).sum() * self.grad_scale, xr)
        return g
