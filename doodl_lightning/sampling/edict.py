"""EDICT: exactly invertible coupled DDIM (Wallace, Gokul & Naik 2023, arXiv 2211.12446)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .denoiser import Eps
from .schedule import Schedule



def check_mix_weight(mix_weight: float) -> float:
    if not 0.0 < mix_weight <= 1.0:
        raise ValueError(f"mix_weight must be in (0, 1] (the paper uses 0.93), got {mix_weight}")
    return float(mix_weight)


def _order(i: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
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
    u, v = _order(i, x, y)
    # 1. first latent: DDIM step with eps predicted from the other one
    u = a * u + b * eps(v, t)
    # 2. second latent: DDIM step with eps predicted from the NEW first one
    v = a * v + b * eps(u, t)
    # 3. mixing layer, x first whatever the step's order
    return mix(*_order(i, u, v), mix_weight)


def edict_step_inverse(eps: Eps, x: Tensor, y: Tensor, schedule: Schedule, i: int, mix_weight: float) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`edict_step` (eq. 15): rebuilds the step's inputs from its outputs."""
    a, b = schedule.ddim_coefficients(i)
    t = schedule.timesteps[i]
    # 3'. undo the mixing layer
    u, v = _order(i, *unmix(x, y, mix_weight))
    # 2'. the second latent's eps came from the (now rebuilt) first one
    v = (v - b * eps(u, t)) / a
    # 1'. the first latent's eps came from the (now rebuilt) second one
    u = (u - b * eps(v, t)) / a
    return _order(i, u, v)


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
