"""Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0)."""
from __future__ import annotations

from torch import Tensor

from .denoiser import Eps
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
