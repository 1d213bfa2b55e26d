"""Rectified-flow / flow-matching sampling (Liu et al. 2023; Lipman et al. 2023; SD3: Esser et al. 2024).

Notation (SD3 paper, sec. 2): x_sigma = (1 - sigma) x_0 + sigma eps, sigma from 1 (noise) to 0 (data);
the model predicts the velocity v = dx/dsigma (= eps - x_0 for the straight path). Sampling integrates the
ODE dx/dsigma = v(x, sigma) from sigma_0 = 1 down to 0 with Euler steps, exactly as diffusers'
``FlowMatchEulerDiscreteScheduler`` does, on the grid the SD3 / FLUX pipelines build.

Gradients d(loss)/d(x_1) as for the DDIM chain (``backprop``): ``autograd`` (reference) and ``checkpoint``
(one latent per step, each step's velocity call recomputed with grad in backward). The coupled, exactly
invertible variant (EDICT's coupling on the Euler step, with ``reversible``) is ``flow_edict.py``.

Every sampler takes a ``velocity(x, t)`` callable, ``t`` being the value the diffusers pipeline hands
its transformer (sigma * num_train_timesteps; FLUX's transformer wants t / 1000 -- the model callable
converts). Plain torch; gradients flow to the latents only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .chains import ChainCheckpoint, cotangent_scaled
from .registry import Sampler, register_sampler

Velocity = Callable[[Tensor, float], Tensor]  # (x_sigma, t = sigma * num_train_timesteps) -> v
FLOW_BACKPROPS = ("autograd", "checkpoint")  # Euler; the coupled (edict) chain adds "reversible"


def check_flow_steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def flow_shift_mu(image_seq_len: int, config) -> float:
    """FLUX's resolution-dependent shift mu: linear in the packed image sequence length (diffusers'
    ``calculate_shift``), from base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return image_seq_len * m + b


def flux_sigmas(steps: int) -> list[float]:
    """The sigmas FluxPipeline hands the scheduler before shifting: linspace(1, 1/steps, steps)."""
    import numpy as np

    return list(np.linspace(1.0, 1.0 / check_flow_steps(steps), steps))


@dataclass(frozen=True)
class FlowSchedule:
    """sigma_0 > sigma_1 > ... > sigma_n = 0 of a flow-matching Euler chain, and the timesteps its model sees.

    ``sigmas`` has one entry more than ``timesteps`` (the terminal 0, as diffusers appends it);
    ``timesteps[i]`` is what the pipeline passes its transformer at step i (sigma_i * 1000 for every
    published SD3/FLUX config). Values are the scheduler's own float32 numbers held as python floats,
    so the sampler's arithmetic never rounds to the model's dtype.
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 1:
            raise ValueError("a schedule needs at least 1 step (got 0); ask for steps >= 1")
        if len(self.sigmas) != n + 1:
            raise ValueError(f"sigmas must have one entry more than timesteps (got {len(self.sigmas)} and {n})")

    @classmethod
    def from_scheduler(cls, scheduler, steps: int, image_seq_len: int | None = None,
                       sigmas: Sequence[float] | None = None, mu: float | None = None) -> "FlowSchedule":
        """The grid a diffusers flow-matching scheduler uses after the pipeline's ``set_timesteps``.

        Mirrors ``retrieve_timesteps(scheduler, steps, sigmas=sigmas, mu=mu)`` on a copy of ``scheduler``
        (the copy's own numbers are read back, so shift, dynamic shifting, ``shift_terminal`` and
        Karras/exponential/beta grids all match it exactly). With ``use_dynamic_shifting`` (FLUX.1-dev),
        mu comes from ``image_seq_len`` (the packed latent length, (H/2)(W/2) for latents H x W) as
        both pipelines compute it, unless ``mu`` is given. ``sigmas=None`` is StableDiffusion3Pipeline's
        default; FluxPipeline's is :meth:`flux` (``sigmas=flux_sigmas(steps)``).
        """
        check_flow_steps(steps)
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "config"):
            raise TypeError(f"expected a diffusers flow-matching scheduler, got {type(scheduler).__name__}")
        cfg = scheduler.config
        if cfg.get("invert_sigmas") or cfg.get("stochastic_sampling"):
            raise ValueError("invert_sigmas / stochastic_sampling schedulers are not deterministic Euler flow chains")
        kwargs = {}
        if cfg.get("use_dynamic_shifting"):
            if mu is None:
                if image_seq_len is None:
                    raise ValueError("this scheduler shifts its grid with the resolution (use_dynamic_shifting, "
                                     "FLUX.1-dev): pass image_seq_len = (latent_height // 2) * (latent_width // 2)")
                mu = flow_shift_mu(image_seq_len, cfg)
            kwargs["mu"] = mu
        elif mu is not None:
            kwargs["mu"] = mu
        s = copy.deepcopy(scheduler)
        if sigmas is not None:
            sigmas = list(sigmas)
            if len(sigmas) != steps:
                raise ValueError(f"sigmas has {len(sigmas)} entries, steps={steps}")
            s.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            s.set_timesteps(steps, **kwargs)
        out = cls(tuple(float(v) for v in s.sigmas), tuple(float(t) for t in s.timesteps))
        if out.sigmas[-1] != 0.0 or any(a <= b for a, b in zip(out.sigmas, out.sigmas[1:])):
            raise ValueError(f"expected sigmas decreasing to 0, got {out.sigmas}")
        return out

    @classmethod
    def flux(cls, scheduler, steps: int, image_seq_len: int | None = None) -> "FlowSchedule":
        """FluxPipeline's grid: sigmas linspace(1, 1/steps, steps), shifted by the scheduler (mu from
        ``image_seq_len`` for FLUX.1-dev's dynamic shifting; FLUX.1-schnell's shift 1 leaves them)."""
        sigmas = None if scheduler.config.get("use_flow_sigmas") else flux_sigmas(steps)
        return cls.from_scheduler(scheduler, steps, image_seq_len=image_seq_len, sigmas=sigmas)

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, start: int) -> "FlowSchedule":
        """The chain from step ``start`` on (partial optimisation, ``opt_t``)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in [0, {len(self) - 1}], got {start}")
        return FlowSchedule(self.sigmas[start:], self.timesteps[start:])

    def head(self, stop: int) -> "FlowSchedule":
        """The chain's first ``stop`` steps (the unoptimised prefix of ``opt_t``)."""
        if not 1 <= stop <= len(self):
            raise ValueError(f"stop must be in [1, {len(self)}], got {stop}")
        return FlowSchedule(self.sigmas[:stop + 1], self.timesteps[:stop])

    def step_size(self, i: int) -> float:
        """h_i = sigma_{i+1} - sigma_i (negative: the chain runs towards the data)."""
        return self.sigmas[i + 1] - self.sigmas[i]


# -- Euler -----------------------------------------------------------------------------------------

def flow_euler_step(v: Tensor, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler step of dx/dsigma = v: x_{sigma'} = x_sigma + (sigma' - sigma) v (FlowMatchEulerDiscreteScheduler.step)."""
    # v is widened to the latents' dtype first: a half-precision model's velocity never sets the
    # precision of the update (diffusers multiplies in the model dtype; equal in float32)
    return x + (sigma_next - sigma) * v.to(torch.promote_types(x.dtype, v.dtype))


def euler_step(velocity: Velocity, x: Tensor, schedule: FlowSchedule, i: int) -> Tensor:
    return flow_euler_step(velocity(x, schedule.timesteps[i]), x, schedule.sigmas[i], schedule.sigmas[i + 1])


def sample_flow(velocity: Velocity, x: Tensor, schedule: FlowSchedule) -> Tensor:
    """Euler sampling of the flow ODE from x_{sigma_0} to x_0 (rectified flow; SD3 / FLUX pipelines)."""
    for i in range(len(schedule)):
        x = euler_step(velocity, x, schedule, i)
    return x


def sample_flow_differentiable(velocity: Velocity, x: Tensor, schedule: FlowSchedule,
                               backprop: str = "checkpoint") -> Tensor:
    """Euler sampling from x_{sigma_0} to x_0 with a differentiable chain (``autograd`` or ``checkpoint``)."""
    if backprop not in FLOW_BACKPROPS:
        raise ValueError(f"unknown backprop {backprop!r} for the Euler flow chain; choose one of "
                         f"{', '.join(FLOW_BACKPROPS)} ('reversible' needs sample_flow_edict_differentiable)")
    if backprop == "autograd":
        return cotangent_scaled(lambda x: sample_flow(velocity, x, schedule), x)
    # backprop.py's single-latent chain: one latent kept per step, each Euler step (its velocity call)
    # recomputed with grad in backward, cotangents brought to O(1) by powers of two
    return ChainCheckpoint.apply(x, lambda x, i: euler_step(velocity, x, schedule, i), len(schedule))


@register_sampler
class FlowEuler(Sampler):
    """``flow``: Euler steps of the flow ODE (one velocity call per step, as diffusers' FlowMatchEulerDiscreteScheduler);
    one latent; not invertible (``flow_edict`` is)."""

    name, schedule_type = "flow", FlowSchedule
    paper = "Liu et al. 2023 (rectified flow); Esser et al. 2024 (SD3), Euler sampling"

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return (sample_flow(model, x, schedule),)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        return (sample_flow_differentiable(model, x, schedule, backprop),)
