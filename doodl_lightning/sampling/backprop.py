"""d(loss)/d(x_T) through a whole sampling chain, three interchangeable ways.

``autograd``    plain autograd through every step: the reference; memory grows with the steps.
``checkpoint``  keep each step's input latents only, recompute the step's UNet calls with grad in
                backward: exact in any precision, memory one latent (pair) per step.
``reversible``  EDICT only: keep nothing per step; rebuild each step's inputs by the exact inverse,
                fused with the recomputation (2 forwards-with-graph + 2 VJPs per step). The rebuilt x_T
                is compared with the true one and, past ``drift_tolerance``, the gradient is recomputed
                with ``checkpoint``: never a silently wrong gradient.

Gradients flow to the latents only; the denoiser's weights are frozen.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from ..precision import autocast_state, restored_autocast
from .ddim import ddim_step, sample_ddim
from .edict import _order, check_mix_weight, edict_step, relative_error, sample_edict, unmix
from .denoiser import Eps
from .lcm import check_lcm_noises, lcm_step, sample_lcm
from .schedule import Schedule

SAMPLERS = ("ddim", "edict", "lcm", "flow", "flow_edict")
BACKPROPS = ("autograd", "checkpoint", "reversible")
FLOW_SAMPLERS = ("flow", "flow_edict")  # rectified flow (SD3 / FLUX): Euler, and EDICT's coupling on it (flow.py)
COUPLED_SAMPLERS = ("edict", "flow_edict")  # two latents (x, y), exactly invertible


class ReversibleDriftWarning(UserWarning):
    """The exact inverse drifted (low precision or an ill-conditioned model); the gradient was recomputed."""


def check_sampler(sampler: str, backprop: str, first_image_only: bool = False) -> None:
    if first_image_only and sampler not in COUPLED_SAMPLERS:
        raise ValueError(f"optimize_first_edict_image_only needs sampler 'edict' or 'flow_edict' ({sampler} makes one image)")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if backprop not in BACKPROPS:
        raise ValueError(f"unknown backprop {backprop!r}; choose one of {', '.join(BACKPROPS)}")
    if backprop == "reversible" and sampler not in COUPLED_SAMPLERS:
        raise ValueError(f"backprop 'reversible' needs sampler 'edict' (or 'flow_edict') ({sampler} is not exactly "
                         f"invertible); use 'checkpoint' or 'autograd' with '{sampler}'")


def sample(
    eps: Eps,
    x: Tensor,
    schedule: Schedule,
    *,
    sampler: str = "ddim",
    backprop: str = "checkpoint",
    y: Tensor | None = None,
    mix_weight: float = 0.93,
    drift_tolerance: float = 1e-3,
    info: dict | None = None,
    noises: list[Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Run ``sampler`` from x_T (and y_T for EDICT; default y_T = x_T) with a differentiable chain.

    Returns the final latents as a tuple: (x_0,) for ``ddim``, ``lcm`` and ``flow``, (x_0, y_0) for ``edict`` and
    ``flow_edict``. ``noises``: the noise LCM adds after each step but the last (fixed per item). ``info`` (a dict)
    receives ``reversible_drift`` and ``reversible_fallback`` once backward has run. The flow samplers take a
    velocity callable and a ``FlowSchedule`` (SD3 / FLUX; ``sampling/flow.py``).
    """
    check_sampler(sampler, backprop)
    from .flow import FlowSchedule, sample_flow_differentiable, sample_flow_edict_differentiable

    if (sampler in FLOW_SAMPLERS) != isinstance(schedule, FlowSchedule):
        raise ValueError(f"sampler {sampler!r} does not run on a {type(schedule).__name__}: the flow samplers (flow, "
                         "flow_edict) are for rectified-flow models (SD3 / FLUX) and their FlowSchedule, ddim / edict / "
                         "lcm for diffusion UNets and their Schedule")
    if sampler == "flow":
        return (sample_flow_differentiable(eps, x, schedule, backprop),)
    if sampler == "flow_edict":
        return sample_flow_edict_differentiable(eps, x, schedule, backprop=backprop, y=y, mix_weight=mix_weight,
                                                drift_tolerance=drift_tolerance, info=info)
    s = schedule.initial_scale
    if sampler == "ddim":
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_ddim(eps, x, schedule), x),)
        return (_ChainCheckpoint.apply(x * s if s != 1.0 else x, lambda x, i: ddim_step(eps, x, schedule, i),
                                       len(schedule)),)
    if sampler == "lcm":
        zs = check_lcm_noises(noises, schedule, x)
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_lcm(eps, x, schedule, zs[:-1]), x),)
        return (_ChainCheckpoint.apply(x * s if s != 1.0 else x,
                                       lambda x, i: lcm_step(eps, x, schedule, i, zs[i]), len(schedule)),)
    p = check_mix_weight(mix_weight)
    y = x if y is None else y
    if s != 1.0 and backprop != "autograd":  # sample_edict scales its own input
        x, y = x * s, y * s
    if backprop == "autograd":
        return cotangent_scaled(lambda x, y: sample_edict(eps, x, y, schedule, p), x, y)
    if backprop == "checkpoint":
        return _EDICTCheckpoint.apply(x, y, eps, schedule, p)
    # x and y are scaled above: the Function's own sample_edict must not scale them again
    return _EDICTReversible.apply(x, y, eps, dataclasses.replace(schedule, initial_scale=1.0), p,
                                  float(drift_tolerance), info)


# -- helpers ---------------------------------------------------------------------------------------

def _power_of_two_scale(*grads: Tensor) -> Tensor:
    # The VJP is linear in its cotangent: bringing it to O(1) by a power of two (exact in any float
    # format) keeps half-precision UNet backward passes from underflowing on tiny loss gradients.
    # Computed on the device: no host sync per VJP.
    m = torch.stack([g.detach().abs().max().float() for g in grads]).max()
    ok = (m > 0) & torch.isfinite(m)
    return torch.where(ok, torch.exp2(torch.round(torch.log2(torch.where(ok, m, torch.ones_like(m))))), torch.ones_like(m))


def _vjp(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    s = _power_of_two_scale(*cotangents)
    grads = torch.autograd.grad(outputs, inputs, tuple(c / s.to(c.dtype) for c in cotangents), allow_unused=True)
    return tuple(torch.zeros_like(i) if g is None else g * s.to(g.dtype) for g, i in zip(grads, inputs))


class _PowerOfTwoScale(torch.autograd.Function):
    """Identity in forward. In backward, at a sub-graph's outputs (``outputs=True``): divide their
    cotangents by one power of two s that brings their max to O(1) (as _vjp does) and leave s in ``box``;
    at its inputs: multiply their gradients by that s again."""

    @staticmethod
    def forward(ctx, box, outputs, *tensors):
        ctx.box, ctx.outputs = box, outputs
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.outputs:
            ctx.box["s"] = _power_of_two_scale(*grads)
            return (None, None, *(g / ctx.box["s"].to(g.dtype) for g in grads))
        s = ctx.box.get("s")
        return (None, None, *(g if s is None else g * s.to(g.dtype) for g in grads))


def cotangent_scaled(fn, *inputs):
    """fn(*inputs), its backward run on cotangents brought to O(1) by one power of two (exact in any float
    format) and undone at the inputs: half-precision VJPs inside fn do not underflow on tiny loss gradients."""
    box: dict = {}
    out = fn(*_PowerOfTwoScale.apply(box, False, *inputs))
    outs = _PowerOfTwoScale.apply(box, True, *(out if isinstance(out, tuple) else (out,)))
    return outs if isinstance(out, tuple) else outs[0]


def _edict_checkpoint_backward(eps, schedule, p, xs, ys, gx, gy):
    for i in reversed(range(len(schedule))):
        xi, yi = xs[i].detach().requires_grad_(), ys[i].detach().requires_grad_()
        with torch.enable_grad():
            u, v = edict_step(eps, xi, yi, schedule, i, p)
        gx, gy = _vjp((u, v), (xi, yi), (gx, gy))
    return gx, gy


@torch.no_grad()
def _edict_trajectory(eps, schedule, p, x, y):
    xs, ys = [x], [y]
    for i in range(len(schedule)):
        x, y = edict_step(eps, x, y, schedule, i, p)
        xs.append(x)
        ys.append(y)
    return xs, ys


# -- the three chains as autograd Functions --------------------------------------------------------

class _ChainCheckpoint(torch.autograd.Function):
    """A chain of single-latent steps x <- step(x, i), i = 0..n-1 (DDIM, LCM): keep each step's input,
    recompute the step with grad in backward."""

    @staticmethod
    def forward(ctx, x, step, n):
        xs = [x]
        for i in range(n):
            xs.append(step(xs[-1], i))
        ctx.save_for_backward(*xs[:-1])  # one latent per step: the whole memory cost
        ctx.step, ctx.n, ctx.autocast = step, n, autocast_state(x.device.type)
        return xs[-1]

    @staticmethod
    def backward(ctx, g):
        xs = ctx.saved_tensors
        with restored_autocast(ctx.autocast):
            for i in reversed(range(ctx.n)):
                xi = xs[i].detach().requires_grad_()
                with torch.enable_grad():
                    out = ctx.step(xi, i)
                (g,) = _vjp((out,), (xi,), (g,))
        return g, None, None


class _EDICTCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, eps, schedule, p):
        xs, ys = _edict_trajectory(eps, schedule, p, x, y)
        n = len(schedule)
        ctx.save_for_backward(*xs[:n], *ys[:n])
        ctx.eps, ctx.schedule, ctx.p, ctx.autocast = eps, schedule, p, autocast_state(x.device.type)
        return xs[-1], ys[-1]

    @staticmethod
    def backward(ctx, gx, gy):
        saved, n = ctx.saved_tensors, len(ctx.schedule)
        with restored_autocast(ctx.autocast):
            gx, gy = _edict_checkpoint_backward(ctx.eps, ctx.schedule, ctx.p, saved[:n], saved[n:], gx, gy)
        return gx, gy, None, None, None


class _EDICTReversible(torch.autograd.Function):
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
                x, y, gx, gy = _edict_reversible_step_backward(eps, schedule, i, p, x, y, gx, gy)
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
                xs, ys = _edict_trajectory(eps, schedule, p, x_T, y_T)
                gx, gy = _edict_checkpoint_backward(eps, schedule, p, xs, ys, gx0, gy0)
        if ctx.info is not None:
            ctx.info["reversible_drift"] = drift
            ctx.info["reversible_fallback"] = fallback
        return gx, gy, None, None, None, None, None


def _edict_reversible_step_backward(eps, schedule, i, p, x, y, gx, gy):
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
    u1, v1 = _order(i, x1, y1)
    gu1, gv1 = _order(i, gx1, gy1)
    # 2'. v1 = a v + b eps(u1): the UNet call at u1 rebuilds v and gives the VJP for u1
    u1 = u1.detach().requires_grad_()
    with torch.enable_grad():
        e = eps(u1, t)
    v = (v1 - b * e.detach()) / a
    gu1 = gu1 + b * _vjp((e,), (u1,), (gv1,))[0]
    gv = a * gv1
    # 1'. u1 = a u + b eps(v): the UNet call at v rebuilds u and gives the VJP for v
    v = v.detach().requires_grad_()
    with torch.enable_grad():
        e = eps(v, t)
    u = (u1.detach() - b * e.detach()) / a
    gv = gv + b * _vjp((e,), (v,), (gu1,))[0]
    gu = a * gu1
    x, y = _order(i, u.detach(), v.detach())
    gx, gy = _order(i, gu, gv)
    return x, y, gx, gy
