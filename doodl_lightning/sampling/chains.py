"""The generic machinery of a differentiable chain: VJPs with power-of-two cotangent scaling, and the
per-step checkpoint of a chain of single-latent steps (DDIM, LCM, Euler flow).

EDICT's two gradients of its coupled pair (checkpoint and reversible) are EDICT's own (``edict.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..precision import autocast_state, restored_autocast


def power_of_two_scale(*grads: Tensor) -> Tensor:
    """One power of two s bringing the largest |cotangent| to O(1), on the device (no host sync per VJP).

    The VJP is linear in its cotangent: dividing by s (exact in any float format) keeps half-precision UNet
    backward passes from underflowing on tiny loss gradients; the result is multiplied by s again."""
    m = torch.stack([g.detach().abs().max().float() for g in grads]).max()
    ok = (m > 0) & torch.isfinite(m)
    return torch.where(ok, torch.exp2(torch.round(torch.log2(torch.where(ok, m, torch.ones_like(m))))), torch.ones_like(m))


def vjp(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The vector-Jacobian product of ``outputs`` w.r.t. ``inputs``, its cotangents scaled by ``power_of_two_scale``."""
    s = power_of_two_scale(*cotangents)
    grads = torch.autograd.grad(outputs, inputs, tuple(c / s.to(c.dtype) for c in cotangents), allow_unused=True)
    return tuple(torch.zeros_like(i) if g is None else g * s.to(g.dtype) for g, i in zip(grads, inputs))


class _PowerOfTwoScale(torch.autograd.Function):
    """Identity in forward. In backward, at a sub-graph's outputs (``outputs=True``): divide their
    cotangents by one power of two s that brings their max to O(1) (as ``vjp`` does) and leave s in ``box``;
    at its inputs: multiply their gradients by that s again."""

    @staticmethod
    def forward(ctx, box, outputs, *tensors):
        ctx.box, ctx.outputs = box, outputs
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.outputs:
            ctx.box["s"] = power_of_two_scale(*grads)
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


class ChainCheckpoint(torch.autograd.Function):
    """A chain of single-latent steps x <- step(x, i), i = 0..n-1 (DDIM, LCM, Euler flow): keep each step's
    input, recompute the step with grad in backward. ``ChainCheckpoint.apply(x, step, n)``."""

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
                (g,) = vjp((out,), (xi,), (g,))
        return g, None, None
