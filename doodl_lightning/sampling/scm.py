"""Multistep continuous-time consistency sampling (sCM: Lu & Song 2024, arXiv 2410.11081, TrigFlow multistep
sampling; SANA-Sprint: Chen et al. 2025, arXiv 2503.09641, diffusers' ``SCMScheduler``), in flow-matching coordinates.

TrigFlow (in units of sigma_data): x_t = cos(t) x_0 + sin(t) z, t from pi/2 (noise) to 0; the consistency function is
f(x_t, t) = cos(t) x_t - sin(t) F(x_t, t) and multistep sampling re-noises its output to the next time,
x_{t'} = cos(t') f + sin(t') z'. With sigma = sin t / (cos t + sin t) and x_sigma = x_t / (cos t + sin t) this is the
straight flow path x_sigma = (1 - sigma) x_0 + sigma z, and SANA-Sprint's conversion of its flow transformer into F
(``SanaSprintPipeline``: input x_t sqrt(sigma^2 + (1 - sigma)^2), output mixed back) makes f exactly the flow model's
x_0 prediction x_sigma - sigma v(x_sigma, sigma) (by sigma^2 + (1 - sigma)^2 = 1 / (cos t + sin t)^2 and
(cos t - sin t (1 - 2 sigma)) (cos t + sin t) = 1).
So the sampler runs on a ``FlowSchedule`` (sigma_i, and the timestep the model is handed) with a velocity callable:

    x <- x_T sqrt(sigma_0^2 + (1 - sigma_0)^2)           (TrigFlow noise at t_0 as the flow input; 1 at sigma_0 = 1)
    x_0_hat = x - sigma_i v(x, t_i)                       (the consistency function)
    x <- (1 - sigma_{i+1}) x_0_hat + sigma_{i+1} z_i      (re-noised; after the last step x_0_hat is the output)

``z_i``: the noise the scheduler draws after step i, fixed per item (``noises``, as LCM's: the chain is a deterministic
function of x_T; the pipeline's own draws give its chain), or, when none are given, the chain's own estimate of the
noise z_hat = x + (1 - sigma_i) v (the deterministic, DDIM-like multistep of the same consistency function).
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from .chains import ChainCheckpoint, cotangent_scaled
from .flow import FlowSchedule, Velocity
from .registry import Sampler, register_sampler


def scm_step(velocity: Velocity, x: Tensor, schedule: FlowSchedule, i: int, noise: Tensor | None) -> Tensor:
    """One sCM step at sigma_i: the consistency function's x_0 prediction, re-noised to sigma_{i+1} with ``noise``
    (None: the chain's own noise estimate); the last step returns the prediction itself."""
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    v = velocity(x, schedule.timesteps[i]).to(x.dtype)
    # 1. f(x_t, t) = cos t x_t - sin t F(x_t, t)  ==  x_sigma - sigma v  (flow coordinates)
    x0 = x - sigma * v
    if i == len(schedule) - 1:
        return x0
    # 2. z: the scheduler's draw, or the noise the model implies, x_sigma = (1 - sigma) x_0 + sigma z
    z = noise if noise is not None else x + (1.0 - sigma) * v
    # 3. x_{sigma'} = (1 - sigma') x_0_hat + sigma' z   (x_{t'} = cos t' f + sin t' z, divided by cos t' + sin t')
    return (1.0 - sigma_next) * x0 + sigma_next * z.to(x.dtype)


def initial_scale(schedule: FlowSchedule) -> float:
    """x_T (TrigFlow noise at t_0, unit variance) as the flow input at sigma_0: 1 / (cos t_0 + sin t_0)."""
    s = schedule.sigmas[0]
    return math.sqrt(s * s + (1.0 - s) ** 2)


def check_scm_noises(noises: Sequence[Tensor] | None, schedule: FlowSchedule, x: Tensor) -> list[Tensor | None]:
    """The noise each step re-noises with: none (the chain's own estimate), or ``len(schedule) - 1`` tensors shaped
    like x (none after the last step)."""
    need = len(schedule) - 1
    if noises is None:
        return [None] * (need + 1)
    noises = list(noises)
    if len(noises) != need or any(z.shape != x.shape for z in noises):
        raise ValueError(f"the scm sampler needs {need} noise tensors shaped {tuple(x.shape)} (one per step but the "
                         f"last), or none, got {len(noises)}")
    return noises + [None]


def sample_scm(velocity: Velocity, x: Tensor, schedule: FlowSchedule, noises: Sequence[Tensor] | None = None) -> Tensor:
    """sCM multistep sampling from x_T (Lu & Song 2024, TrigFlow; SANA-Sprint's SCMScheduler) in flow coordinates."""
    zs = check_scm_noises(noises, schedule, x)
    c = initial_scale(schedule)
    x = x * c if c != 1.0 else x
    for i in range(len(schedule)):
        x = scm_step(velocity, x, schedule, i, zs[i])
    return x


@register_sampler
class SCM(Sampler):
    """``scm``: continuous-time consistency steps (x_0 prediction, re-noised in between with ``noises`` fixed per item,
    or the chain's own noise estimate) on a flow grid: SANA-Sprint's sampler; one latent; not invertible."""

    name, schedule_type = "scm", FlowSchedule
    paper = "Lu & Song 2024, sCM (TrigFlow multistep sampling); Chen et al. 2025, SANA-Sprint"
    renoises = True

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return (sample_scm(model, x, schedule, noises),)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        zs = check_scm_noises(noises, schedule, x)
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_scm(model, x, schedule, zs[:-1] if noises is not None else None),
                                     x),)
        c = initial_scale(schedule)
        # chains.ChainCheckpoint: one latent per step, each step's velocity call recomputed with grad in backward
        return (ChainCheckpoint.apply(x * c if c != 1.0 else x, lambda x, i: scm_step(model, x, schedule, i, zs[i]),
                                      len(schedule)),)
