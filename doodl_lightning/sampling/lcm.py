"""Multistep latent-consistency sampling (Luo et al. 2023, LCM, arXiv 2310.04378, Algorithm 1)."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from .chains import ChainCheckpoint, cotangent_scaled
from .denoiser import Eps
from .registry import Sampler, register_sampler
from .schedule import Schedule

SIGMA_DATA = 0.5  # the consistency models' sigma_data (Song et al. 2023), as LCM's scheduler


def boundary_scalings(t: int, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function f(x, t) = c_skip x + c_out x0_hat at timestep t."""
    st = t * timestep_scaling
    return SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / math.sqrt(st**2 + SIGMA_DATA**2)


def lcm_step(eps: Eps, x: Tensor, schedule: Schedule, i: int, noise: Tensor | None) -> Tensor:
    """One LCM step: x_{t_i} -> f(x, t_i), re-noised to t_{i+1} with ``noise`` (the last step returns f)."""
    t, abar = schedule.timesteps[i], schedule.alphas_cumprod[i]
    c_skip, c_out = boundary_scalings(t, schedule.timestep_scaling)
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x0 = (x - math.sqrt(1.0 - abar) * eps(x, t)) / math.sqrt(abar)
    # 2. the consistency function's boundary condition: f(x, t) = c_skip x + c_out x0_hat
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised
    # 3. z ~ N(0, I) fixed per item and seed, so the chain is a deterministic function of x_T:
    #    x_{t_{i+1}} = sqrt(abar_{i+1}) f + sqrt(1 - abar_{i+1}) z
    abar_next = schedule.alphas_cumprod_prev[i]
    return math.sqrt(abar_next) * denoised + math.sqrt(1.0 - abar_next) * noise


def check_lcm_noises(noises: Sequence[Tensor] | None, schedule: Schedule, x: Tensor) -> list[Tensor | None]:
    """The noise each step adds: ``len(schedule) - 1`` tensors shaped like x (none after the last step)."""
    need = len(schedule) - 1
    noises = list(noises or [])
    if len(noises) != need or any(z.shape != x.shape for z in noises):
        raise ValueError(f"the LCM sampler needs {need} noise tensors shaped {tuple(x.shape)} (one per step but "
                         f"the last), got {len(noises)}")
    return noises + [None]


def sample_lcm(eps: Eps, x: Tensor, schedule: Schedule, noises: Sequence[Tensor] | None = None) -> Tensor:
    """LCM multistep sampling from x_T with the given per-step noises (Luo et al. 2023, Algorithm 1)."""
    zs = check_lcm_noises(noises, schedule, x)
    x = x * schedule.initial_scale if schedule.initial_scale != 1.0 else x
    for i in range(len(schedule)):
        x = lcm_step(eps, x, schedule, i, zs[i])
    return x


@register_sampler
class LCM(Sampler):
    """``lcm``: consistency steps that re-noise in between with ``noises`` fixed per item (a deterministic
    function of x_T); one latent; not invertible."""

    name, schedule_type, paper = "lcm", Schedule, "Luo et al. 2023, LCM, Algorithm 1"
    renoises = True

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return (sample_lcm(model, x, schedule, noises),)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        zs = check_lcm_noises(noises, schedule, x)
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_lcm(model, x, schedule, zs[:-1]), x),)
        s = schedule.initial_scale
        return (ChainCheckpoint.apply(x * s if s != 1.0 else x, lambda x, i: lcm_step(model, x, schedule, i, zs[i]),
                                      len(schedule)),)
