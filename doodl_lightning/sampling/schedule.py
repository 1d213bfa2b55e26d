"""The DDIM time grid and its coefficients, shared by every sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Timesteps t_0 > t_1 > ... of a deterministic DDIM chain with abar at each step and the next.

    ``alphas_cumprod[i]`` is abar at ``timesteps[i]`` and ``alphas_cumprod_prev[i]`` abar at the step
    the chain moves to (``final_alpha_cumprod`` after the last one), as in diffusers' DDIMScheduler.
    Coefficients are python floats (float64) so the sampler's linear algebra never loses precision
    to the model's dtype.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    alphas_cumprod_prev: tuple[float, ...]

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 1:
            raise ValueError("a schedule needs at least 1 step (got 0); ask for steps >= 1")
        if not (len(self.alphas_cumprod) == len(self.alphas_cumprod_prev) == n):
            raise ValueError("timesteps, alphas_cumprod and alphas_cumprod_prev must have the same length")

    @classmethod
    def from_scheduler(cls, scheduler, steps: int) -> "Schedule":
        """The DDIM grid of any diffusers scheduler's noise schedule (PNDM/DDIM/Euler configs alike)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        from diffusers import DDIMScheduler  # the sampling math is ours; diffusers only gives the grid

        ddim = DDIMScheduler.from_config(scheduler.config)
        if steps > ddim.config.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds the model's {ddim.config.num_train_timesteps} training timesteps")
        ddim.set_timesteps(steps)
        abar = ddim.alphas_cumprod.double()
        final = float(ddim.final_alpha_cumprod)
        ts = [int(t) for t in ddim.timesteps]
        prev = [float(abar[t]) for t in ts[1:]] + [final]
        return cls(tuple(ts), tuple(float(abar[t]) for t in ts), tuple(prev))

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, start: int) -> "Schedule":
        """The chain from step ``start`` on (partial optimisation, ``opt_t``)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in [0, {len(self) - 1}], got {start}")
        return Schedule(self.timesteps[start:], self.alphas_cumprod[start:], self.alphas_cumprod_prev[start:])

    def ddim_coefficients(self, i: int) -> tuple[float, float]:
        """(a, b) of the DDIM step x_{t_prev} = a x_t + b eps (eta = 0).

        a = sqrt(abar_prev / abar_t),  b = sqrt(1 - abar_prev) - a sqrt(1 - abar_t)
        """
        abar_t, abar_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        a = math.sqrt(abar_prev / abar_t)
        return a, math.sqrt(1.0 - abar_prev) - a * math.sqrt(1.0 - abar_t)
