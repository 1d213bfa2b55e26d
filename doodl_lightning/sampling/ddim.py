"""Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0)."""
from __future__ import annotations

from torch import Tensor

from .chains import ChainCheckpoint, cotangent_scaled
from .denoiser import Eps
from .registry import Sampler, register_sampler
from .schedule import Schedule


def ddim_step(eps: Eps, x: Tensor, schedule: Schedule, i: int) -> Tensor:
    """One DDIM step t_i -> t_{i+1}: x' = a x + b eps(x, t_i)."""
    a, b = schedule.ddim_coefficients(i)
    return a * x + b * eps(x, schedule.timesteps[i])


def sample_ddim(eps: Eps, x: Tensor, schedule: Schedule) -> Tensor:
    """DDIM sampling from x_T to x_0 (Song et al. 2021, Algorithm of eq. 12, eta = 0)."""
    x = x * schedule.initial_scale if schedule.initial_scale != 1.0 else x
    for i in range(len(schedule)):
        x = ddim_step(eps, x, schedule, i)
    return x


@register_sampler
class DDIM(Sampler):
    """``ddim``: one latent, one UNet call per step; not exactly invertible (its inversion is approximate)."""

    name, schedule_type, paper = "ddim", Schedule, "Song et al. 2021, DDIM, eq. 12 (eta = 0)"

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return (sample_ddim(model, x, schedule),)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_ddim(model, x, schedule), x),)
        s = schedule.initial_scale
        return (ChainCheckpoint.apply(x * s if s != 1.0 else x, lambda x, i: ddim_step(model, x, schedule, i),
                                      len(schedule)),)
