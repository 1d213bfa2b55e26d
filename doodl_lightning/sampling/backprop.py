"""d(loss)/d(x_T) through a whole sampling chain, three interchangeable ways, for any registered sampler.

``autograd``    plain autograd through every step: the reference; memory grows with the steps.
``checkpoint``  keep each step's input latents only, recompute the step's UNet calls with grad in
                backward: exact in any precision, memory one latent (pair) per step (``chains.ChainCheckpoint``,
                ``edict.EDICTCheckpoint``).
``reversible``  exactly invertible samplers only (EDICT): keep nothing per step; rebuild each step's inputs by the
                exact inverse, fused with the recomputation (2 forwards-with-graph + 2 VJPs per step). The rebuilt
                x_T is compared with the true one and, past ``drift_tolerance``, the gradient is recomputed with
                ``checkpoint``: never a silently wrong gradient (``edict.EDICTReversible``).

Gradients flow to the latents only; the denoiser's weights are frozen.
"""
from __future__ import annotations

from torch import Tensor

from .denoiser import Eps
from .registry import check_sampler


def sample(
    eps: Eps,
    x: Tensor,
    schedule,
    *,
    sampler: str = "ddim",
    backprop: str = "checkpoint",
    y: Tensor | None = None,
    mix_weight: float = 0.93,
    drift_tolerance: float = 1e-3,
    info: dict | None = None,
    noises: list[Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Run ``sampler`` (a registered name) from x_T (and y_T for the coupled samplers; default y_T = x_T) with a
    differentiable chain.

    Returns the final latents as a tuple: (x_0,) for ``ddim``, ``lcm`` and ``flow``, (x_0, y_0) for ``edict`` and
    ``flow_edict``. ``noises``: the noise LCM adds after each step but the last (fixed per item). ``info`` (a dict)
    receives ``reversible_drift`` and ``reversible_fallback`` once backward has run. The flow samplers take a
    velocity callable and a ``FlowSchedule`` (SD3 / FLUX).
    """
    s = check_sampler(sampler, backprop)
    if not isinstance(schedule, s.schedule_type):
        raise ValueError(f"sampler {sampler!r} runs on a {s.schedule_type.__name__}, not a {type(schedule).__name__}: "
                         "the flow samplers (flow, flow_edict) are for rectified-flow models (SD3 / FLUX) and their "
                         "FlowSchedule, ddim / edict / lcm for diffusion UNets and their Schedule")
    return s.differentiable(eps, x, schedule, backprop, y=y, mix_weight=mix_weight, noises=noises,
                            drift_tolerance=drift_tolerance, info=info)
