"""EDICT: exactly invertible coupled DDIM (Wallace, Gokul & Naik 2023, arXiv 2211.12446)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from ..precision import autocast_state, restored_autocast
from .chains import cotangent_scaled, vjp
from .denoiser import Eps
from .registry import Sampler, register_sampler
from .schedule import Schedule


class ReversibleDriftWarning(UserWarning):
    """The exact inverse drifted (low precision or an ill-conditioned model); the gradient was recomputed."""


def check_mix_weight(mix_weight: float) -> float:
    if not 0.0 < mix_weight <= 1.0:
        raise ValueError(f"mix_weight must be in (0, 1] (the paper uses 0.93), got {mix_weight}")
    return float(mix_weight)


def leapfrog_order(i: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    # "leapfrog": which latent takes the first half-step alternates with the step (even: x, odd: y).
    # Only the half-steps alternate; the mixing layer always mixes x first (official doodl.py,
    # SteppingLayer.forward's offset = i % 2 against MixingLayer.forward).
    return (x, y) if i % 2 == 0 else (y, x)


def mix(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """EDICT mixing layer (eqs. 12-13): x' = p x + (1-p) y ;  y' = p y + (1-p) x'."""
    x = p * x + (1 - p) * y
    return x, p * y + (1 - p) * x


def unmix(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`mix`, the last assignment undone first."""
    y = (y - (1 - p) * x) / p
    return (x - (1 - p) * y) / p, y


def edict_step(eps: Eps, x: Tensor, y: Tensor, schedule: Schedule, i: int, mix_weight: float) -> tuple[Tensor, Tensor]:
    """One EDICT denoising step (eq. 14 of the EDICT paper) at t_i -> t_{i+1}."""
    a, b = schedule.ddim_coefficients(i)
    t = schedule.timesteps[i]
    u, v = leapfrog_order(i, x, y)
    # 1. first latent: DDIM step with eps predicted from the other one
    u = a * u + b * eps(v, t)
    # 2. second latent: DDIM step with eps predicted from the NEW first one
    v = a * v + b * eps(u, t)
    # 3. mixing layer, x first whatever the step's order
    return mix(*leapfrog_order(i, u, v), mix_weight)


def edict_step_inverse(eps: Eps, x: Tensor, y: Tensor, schedule: Schedule, i: int, mix_weight: float) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`edict_step` (eq. 15): rebuilds the step's inputs from its outputs."""
    a, b = schedule.ddim_coefficients(i)
    t = schedule.timesteps[i]
    # 3'. undo the mixing layer
    u, v = leapfrog_order(i, *unmix(x, y, mix_weight))
    # 2'. the second latent's eps came from the (now rebuilt) first one
    v = (v - b * eps(u, t)) / a
    # 1'. the first latent's eps came from the (now rebuilt) second one
    u = (u - b * eps(v, t)) / a
    return leapfrog_order(i, u, v)


def sample_edict(eps: Eps, x: Tensor, y: Tensor, schedule: Schedule, mix_weight: float = 0.93) -> tuple[Tensor, Tensor]:
    """EDICT sampling of the coupled pair (x_T, y_T) -> (x_0, y_0) (EDICT paper, Algorithm 2)."""
    p = check_mix_weight(mix_weight)
    if schedule.initial_scale != 1.0:
        x, y = x * schedule.initial_scale, y * schedule.initial_scale
    for i in range(len(schedule)):
        x, y = edict_step(eps, x, y, schedule, i, p)
    return x, y


class Inversion(NamedTuple):
    x: Tensor
    y: Tensor
    round_trip_error: float | None  # max relative error of regenerated latents vs the source


@torch.no_grad()
def edict_invert(eps: Eps, x0: Tensor, schedule: Schedule, mix_weight: float = 0.93, check: bool = True) -> Inversion:
    """Invert a clean latent to the pair (x_T, y_T) that EDICT maps back to it (EDICT paper, Algorithm 1)."""
    p = check_mix_weight(mix_weight)
    x, y = x0, x0
    for i in reversed(range(len(schedule))):
        x, y = edict_step_inverse(eps, x, y, schedule, i, p)
    if schedule.initial_scale != 1.0:  # the chain starts from initial_scale x_T: undo it
        x, y = x / schedule.initial_scale, y / schedule.initial_scale
    error = None
    if check:
        rx, ry = sample_edict(eps, x, y, schedule, p)
        error = max(relative_error(rx, x0), relative_error(ry, x0))
    return Inversion(x, y, error)


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||, the whole batch at once."""
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-30))


# -- EDICT's chain gradients: per-step checkpoint and the exact-inverse (reversible) backward -----------------

def _checkpoint_backward(eps, schedule, p, xs, ys, gx, gy):
    for i in reversed(range(len(schedule))):
        xi, yi = xs[i].detach().requires_grad_(), ys[i].detach().requires_grad_()
        with torch.enable_grad():
            u, v = edict_step(eps, xi, yi, schedule, i, p)
        gx, gy = vjp((u, v), (xi, yi), (gx, gy))
    return gx, gy


@torch.no_grad()
def _trajectory(eps, schedule, p, x, y):
    xs, ys = [x], [y]
    for i in range(len(schedule)):
        x, y = edict_step(eps, x, y, schedule, i, p)
        xs.append(x)
        ys.append(y)
    return xs, ys


class EDICTCheckpoint(torch.autograd.Function):
    """The coupled chain keeping each step's input pair; backward recomputes each step with grad.
    ``EDICTCheckpoint.apply(x, y, eps, schedule, p)`` (schedule: anything with ``timesteps``, ``len`` and
    ``ddim_coefficients``; x, y already scaled by ``initial_scale``)."""

    @staticmethod
    def forward(ctx, x, y, eps, schedule, p):
        xs, ys = _trajectory(eps, schedule, p, x, y)
        n = len(schedule)
        ctx.save_for_backward(*xs[:n], *ys[:n])
        ctx.eps, ctx.schedule, ctx.p, ctx.autocast = eps, schedule, p, autocast_state(x.device.type)
        return xs[-1], ys[-1]

    @staticmethod
    def backward(ctx, gx, gy):
        saved, n = ctx.saved_tensors, len(ctx.schedule)
        with restored_autocast(ctx.autocast):
            gx, gy = _checkpoint_backward(ctx.eps, ctx.schedule, ctx.p, saved[:n], saved[n:], gx, gy)
        return gx, gy, None, None, None


class EDICTReversible(torch.autograd.Function):
    """The coupled chain keeping nothing per step: backward rebuilds each step's inputs by the exact inverse,
    fused with the recomputation (2 forwards-with-graph + 2 VJPs per step). The rebuilt x_T is compared with
    the true one; past ``drift_tolerance`` the gradient is recomputed with the checkpoint (``ReversibleDriftWarning``):
    never a silently wrong gradient. ``EDICTReversible.apply(x, y, eps, schedule, p, drift_tolerance, info)``
    (schedule's ``initial_scale`` must be 1: x, y are the chain's first inputs)."""

    @staticmethod
    def forward(ctx, x, y, eps, schedule, p, drift_tolerance, info):
        x0, y0 = sample_edict(eps, x, y, schedule, p)
        # the true x_T is kept only to measure the drift of the rebuilt one: constant in steps
        ctx.save_for_backward(x, y, x0, y0)
        ctx.eps, ctx.schedule, ctx.p = eps, schedule, p
        ctx.tol, ctx.info, ctx.autocast = drift_tolerance, info, autocast_state(x.device.type)
        return x0, y0

    @staticmethod
    def backward(ctx, gx, gy):
        x_T, y_T, x, y = ctx.saved_tensors
        eps, schedule, p = ctx.eps, ctx.schedule, ctx.p
        with restored_autocast(ctx.autocast):
            gx0, gy0 = gx, gy
            for i in reversed(range(len(schedule))):
                x, y, gx, gy = _reversible_step_backward(eps, schedule, i, p, x, y, gx, gy)
            drift = max(relative_error(x, x_T), relative_error(y, y_T))
            fallback = not drift <= ctx.tol  # a NaN drift falls back too
            if fallback:
                warnings.warn(
                    f"EDICT reversible backward: rebuilt x_T drifted by {drift:.3g} (relative) > "
                    f"drift_tolerance={ctx.tol:g}; recomputing this gradient with 'checkpoint'. "
                    "Use backprop='checkpoint' (exact) for this model/precision.",
                    ReversibleDriftWarning,
                    stacklevel=2,
                )
                xs, ys = _trajectory(eps, schedule, p, x_T, y_T)
                gx, gy = _checkpoint_backward(eps, schedule, p, xs, ys, gx0, gy0)
        if ctx.info is not None:
            ctx.info["reversible_drift"] = drift
            ctx.info["reversible_fallback"] = fallback
        return gx, gy, None, None, None, None, None


def _reversible_step_backward(eps, schedule, i, p, x, y, gx, gy):
    """Rebuild step i's inputs from its outputs and carry the cotangents back, in one sweep.

    Each UNet call that inverts a half-step is the one whose graph that half-step's VJP needs, so
    the step costs exactly 2 forwards-with-graph and 2 VJPs.
    """
    a, b = schedule.ddim_coefficients(i)
    t = schedule.timesteps[i]
    # 3'. mixing layer x2 = p x1 + (1-p) y1 ; y2 = p y1 + (1-p) x2 (x first at every step): invert it
    #     and carry its cotangents (x2 feeds y2, so x2's total cotangent is gx + (1-p) gy)
    x1, y1 = unmix(x, y, p)
    gx = gx + (1 - p) * gy
    gx1, gy1 = p * gx, p * gy + (1 - p) * gx
    # in the step's order: u went first, v second (leapfrog)
    u1, v1 = leapfrog_order(i, x1, y1)
    gu1, gv1 = leapfrog_order(i, gx1, gy1)
    # 2'. v1 = a v + b eps(u1): the UNet call at u1 rebuilds v and gives the VJP for u1
    u1 = u1.detach().requires_grad_()
    with torch.enable_grad():
        e = eps(u1, t)
    v = (v1 - b * e.detach()) / a
    gu1 = gu1 + b * vjp((e,), (u1,), (gv1,))[0]
    gv = a * gv1
    # 1'. u1 = a u + b eps(v): the UNet call at v rebuilds u and gives the VJP for v
    v = v.detach().requires_grad_()
    with torch.enable_grad():
        e = eps(v, t)
    u = (u1.detach() - b * e.detach()) / a
    gv = gv + b * vjp((e,), (v,), (gu1,))[0]
    gu = a * gu1
    x, y = leapfrog_order(i, u.detach(), v.detach())
    gx, gy = leapfrog_order(i, gu, gv)
    return x, y, gx, gy


def coupled_chain(eps, x: Tensor, y: Tensor | None, schedule, backprop: str, mix_weight: float,
                  drift_tolerance: float, info: dict | None) -> tuple[Tensor, Tensor]:
    """The coupled chain from (x, y) (default y = x) with one of the three gradients; ``schedule`` is any
    affine-step schedule (a DDIM ``Schedule``, or the flow chain's Euler steps seen as affine ones)."""
    p = check_mix_weight(mix_weight)
    y = x if y is None else y
    if backprop == "autograd":  # sample_edict scales its own input
        return cotangent_scaled(lambda x, y: sample_edict(eps, x, y, schedule, p), x, y)
    s = schedule.initial_scale
    if s != 1.0:
        x, y = x * s, y * s
    if backprop == "checkpoint":
        return EDICTCheckpoint.apply(x, y, eps, schedule, p)
    # x and y are scaled above: the Function's own sample_edict must not scale them again
    unscaled = dataclasses.replace(schedule, initial_scale=1.0) if s != 1.0 else schedule
    return EDICTReversible.apply(x, y, eps, unscaled, p, float(drift_tolerance), info)


@register_sampler
class EDICT(Sampler):
    """``edict``: the coupled pair (x, y), two UNet calls per step, exactly invertible (the official DOODL chain)."""

    name, schedule_type, latents, invertible = "edict", Schedule, 2, True
    paper = "Wallace, Gokul & Naik 2023, EDICT, Algorithm 2 (eq. 14)"

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return sample_edict(model, x, x if y is None else y, schedule, mix_weight)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        return coupled_chain(model, x, y, schedule, backprop, mix_weight, drift_tolerance, info)

    def invert(self, model, x0, schedule, mix_weight=0.93):
        return edict_invert(model, x0, schedule, mix_weight)
