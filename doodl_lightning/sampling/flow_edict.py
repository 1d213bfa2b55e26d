"""EDICT's exactly invertible coupling on the rectified-flow Euler step (SD3 / FLUX): ``flow_edict``.

EDICT (Wallace et al. 2023) couples two latents with affine steps x' = a x + b eps(x, t); the flow chain's
Euler step is the affine step a = 1, b = sigma_{i+1} - sigma_i with the velocity in eps's place, so EDICT's
steps, inverse and gradients (``edict.py``) run on it unchanged through ``EulerAsAffine``.
"""
from __future__ import annotations

from torch import Tensor

from .edict import coupled_chain, edict_invert, edict_step, edict_step_inverse, sample_edict
from .flow import FlowSchedule, Velocity
from .registry import BACKPROPS, Sampler, register_sampler


class EulerAsAffine:
    """A FlowSchedule seen as the affine steps x' = a x + b v(x, t) that EDICT couples: the Euler step
    is a = 1, b = sigma_{i+1} - sigma_i. edict.py and backprop.py's EDICT chains only ask a schedule for
    ``timesteps``, ``len``, ``ddim_coefficients(i)`` (= (a, b)) and ``initial_scale`` (x_1 enters the
    flow chain unscaled), so they run on it unchanged."""

    __slots__ = ("flow",)
    initial_scale = 1.0

    def __init__(self, flow: FlowSchedule):
        self.flow = flow

    @property
    def timesteps(self) -> tuple[float, ...]:
        return self.flow.timesteps

    def __len__(self) -> int:
        return len(self.flow)

    def ddim_coefficients(self, i: int) -> tuple[float, float]:
        return 1.0, self.flow.step_size(i)


def flow_edict_step(velocity: Velocity, x: Tensor, y: Tensor, schedule: FlowSchedule, i: int,
                    mix_weight: float = 0.93) -> tuple[Tensor, Tensor]:
    """One coupled Euler step (EDICT eq. 14 with a = 1, b = h_i), x and y taking turns to go first.

    u' = u + h v(w, t_i) ;  w' = w + h v(u', t_i) ;  then the mixing layer (EDICT eqs. 12-13).
    """
    return edict_step(velocity, x, y, EulerAsAffine(schedule), i, mix_weight)


def flow_edict_step_inverse(velocity: Velocity, x: Tensor, y: Tensor, schedule: FlowSchedule, i: int,
                            mix_weight: float = 0.93) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`flow_edict_step` (EDICT eq. 15 with a = 1): w = w' - h v(u'), u = u' - h v(w)."""
    return edict_step_inverse(velocity, x, y, EulerAsAffine(schedule), i, mix_weight)


def sample_flow_edict(velocity: Velocity, x: Tensor, y: Tensor, schedule: FlowSchedule,
                      mix_weight: float = 0.93) -> tuple[Tensor, Tensor]:
    """Exactly invertible coupled Euler sampling (x_1, y_1) -> (x_0, y_0): EDICT (Wallace et al. 2023,
    Algorithm 2) with the DDIM step replaced by the flow's Euler step. Two velocity calls per step."""
    return sample_edict(velocity, x, y, EulerAsAffine(schedule), mix_weight)


def flow_edict_invert(velocity: Velocity, x0: Tensor, schedule: FlowSchedule, mix_weight: float = 0.93,
                      check: bool = True):
    """Invert a clean latent to the pair (x_1, y_1) the coupled chain maps back to it (EDICT Algorithm 1);
    an ``edict.Inversion`` (x, y, round_trip_error)."""
    return edict_invert(velocity, x0, EulerAsAffine(schedule), mix_weight, check)


def sample_flow_edict_differentiable(velocity: Velocity, x: Tensor, schedule: FlowSchedule, *,
                                     backprop: str = "checkpoint", y: Tensor | None = None,
                                     mix_weight: float = 0.93, drift_tolerance: float = 1e-3,
                                     info: dict | None = None) -> tuple[Tensor, Tensor]:
    """The coupled chain from (x_1, y_1) (default y_1 = x_1) to (x_0, y_0), differentiable three ways.

    ``reversible`` keeps no latent per step: backward rebuilds each step's inputs by the exact inverse
    (edict.py's reversible gradient, drift checked against the true x_1, y_1 and, past
    ``drift_tolerance``, recomputed with ``checkpoint``; ``info`` receives the drift).
    """
    if backprop not in BACKPROPS:
        raise ValueError(f"unknown backprop {backprop!r}; choose one of {', '.join(BACKPROPS)}")
    return coupled_chain(velocity, x, y, EulerAsAffine(schedule), backprop, mix_weight, drift_tolerance, info)


@register_sampler
class FlowEDICT(Sampler):
    """``flow_edict``: EDICT's coupled pair on the flow's Euler steps; two velocity calls per step; exactly invertible."""

    name, schedule_type, latents, invertible = "flow_edict", FlowSchedule, 2, True
    paper = "Wallace et al. 2023 (EDICT, Algorithm 2) with the Euler step of the flow ODE"

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return sample_flow_edict(model, x, x if y is None else y, schedule, mix_weight)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        return sample_flow_edict_differentiable(model, x, schedule, backprop=backprop, y=y, mix_weight=mix_weight,
                                                drift_tolerance=drift_tolerance, info=info)

    def invert(self, model, x0, schedule, mix_weight=0.93):
        return flow_edict_invert(model, x0, schedule, mix_weight)
