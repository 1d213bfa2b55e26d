"""The DDIM time grid and its coefficients, shared by every sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


GRIDS = ("official", "model", "leading", "trailing", "linspace")
SPACINGS = GRIDS[2:]  # diffusers' ``timestep_spacing`` values: override the model's own


def _divisor_near(n: int, steps: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - steps), d))


def _alphas_cumprod64(ddim) -> "torch.Tensor":
    """abar in float64 (as the official code's numpy scheduler); diffusers keeps it in float32, 2e-8 off."""
    import torch

    cfg = ddim.config
    n = cfg.num_train_timesteps
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float64)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:  # other schedules: diffusers' own values
        return ddim.alphas_cumprod.double()
    if cfg.get("rescale_betas_zero_snr"):
        return ddim.alphas_cumprod.double()
    return torch.cumprod(1.0 - betas, dim=0)


def check_steps(steps: int, grid: str | None) -> None:
    """One-line errors for a chain's ``steps`` and ``timestep_grid``, before any model is loaded."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if grid is not None and grid not in GRIDS:
        raise ValueError(f"unknown timestep_grid {grid!r}; choose one of {', '.join(GRIDS)}")


def default_grid(scheduler) -> str:
    """The grid a model samples on when the config names none: the model's own for few-step distilled
    models (a ``trailing`` spacing, e.g. SD-Turbo / SDXL-Lightning, or an LCM scheduler), whose other
    timesteps they were never trained to start from; the official DOODL grid otherwise."""
    cfg = scheduler.config
    if type(scheduler).__name__ == "LCMScheduler" or cfg.get("timestep_spacing") == "trailing":
        return "model"
    return "official"


def _model_sampler(scheduler, steps: int, spacing: str | None):
    """The model's own scheduler class on its config (``spacing`` overriding its timestep_spacing), set to
    ``steps``; None if that class cannot be set up alone."""
    try:
        s = type(scheduler).from_config(scheduler.config, **({"timestep_spacing": spacing} if spacing else {}))
        s.set_timesteps(steps)
        return s
    except Exception:  # noqa: BLE001 - a test double or an exotic scheduler: the DDIM rules alone
        return None


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
    # x_T enters the chain as initial_scale x_T: what the model's own pipeline feeds its first UNet call,
    # init_noise_sigma x the scheduler's input scaling (1 for DDIM; sigma_max / sqrt(sigma_max^2 + 1) for
    # Euler with trailing spacing, e.g. SD-Turbo), so the same noise makes the pipeline's image
    initial_scale: float = 1.0
    # LCM's boundary condition c_skip, c_out = f(timestep_scaling x t) (Song et al. 2023, consistency models)
    timestep_scaling: float = 10.0

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 1:
            raise ValueError("a schedule needs at least 1 step (got 0); ask for steps >= 1")
        if not (len(self.alphas_cumprod) == len(self.alphas_cumprod_prev) == n):
            raise ValueError("timesteps, alphas_cumprod and alphas_cumprod_prev must have the same length")

    @classmethod
    def from_scheduler(cls, scheduler, steps: int, grid: str | None = "official") -> "Schedule":
        """The DDIM grid of ``steps`` steps on any diffusers scheduler's noise schedule.

        ``grid="official"``: the official DOODL grid (its own DDIMScheduler, ``set_timesteps(steps)``
        with offset 0): t = T - T/steps, ..., T/steps, 0; each step moves to t - T/steps and the last one
        to abar_0 (``set_alpha_to_one=False``), so it is the identity. 10 steps: 900, 800, ..., 0.
        ``grid="model"``: the model's own scheduler config (SD-1.x: ``steps_offset`` 1, 901, ..., 1;
        SD-Turbo: trailing, 999 for one step; LCM: its skipping-step grid). ``leading`` / ``trailing`` /
        ``linspace``: the model's config with that ``timestep_spacing``. None: ``default_grid``. Off the
        official grid the last step moves to abar = 1 when the model's scheduler ends at sigma = 0 (Euler)
        and ``initial_scale`` is what that scheduler feeds its first UNet call per unit of x_T.
        """
        grid = default_grid(scheduler) if grid is None else grid
        check_steps(steps, grid)
        from diffusers import DDIMScheduler  # the sampling math is ours; diffusers only gives the grid

        ddim = DDIMScheduler.from_config(scheduler.config)
        n_train = ddim.config.num_train_timesteps
        if steps > n_train:
            raise ValueError(f"steps={steps} exceeds the model's {n_train} training timesteps")
        abar = _alphas_cumprod64(ddim)
        extra = {"timestep_scaling": float(scheduler.config.get("timestep_scaling", 10.0))}
        if grid == "official":
            if n_train % steps:
                raise ValueError(f"timestep_grid 'official' needs steps dividing {n_train} (the official grid "
                                 f"is then exact), got steps={steps}; use e.g. {_divisor_near(n_train, steps)} "
                                 "or timestep_grid: model")
            # 1. t_i = T - (i + 1) T / N ; 2. t_prev = t_i - T / N, abar_0 past the end (official offset 0)
            k = n_train // steps
            ts = list(range(n_train - k, -1, -k))
            prev = [float(abar[t - k]) if t - k >= 0 else float(abar[0]) for t in ts]
            return cls(tuple(ts), tuple(float(abar[t]) for t in ts), tuple(prev), **extra)
        spacing = grid if grid in SPACINGS else None
        own = _model_sampler(scheduler, steps, spacing)
        if own is not None and type(scheduler).__name__ == "LCMScheduler":
            ts = [int(t) for t in own.timesteps]  # LCM's own grid: not a DDIM spacing
        else:
            if spacing:
                ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing=spacing)
            ddim.set_timesteps(steps)
            ts = [int(t) for t in ddim.timesteps]
        final = 1.0 if ddim.config.set_alpha_to_one else float(abar[0])
        scale = 1.0
        if own is not None:
            sigmas = getattr(own, "sigmas", None)
            if sigmas is not None and float(sigmas[-1]) == 0.0:
                final = 1.0  # an Euler-type chain ends at sigma = 0: the clean latent
            c_in = own.scale_model_input(torch.ones(()), own.timesteps[0])
            scale = float(own.init_noise_sigma) * float(c_in)
            if abs(scale - 1.0) < 1e-6:  # Euler with leading spacing: sqrt(s^2 + 1) / sqrt(s^2 + 1), float32-rounded
                scale = 1.0
        prev = [float(abar[t]) for t in ts[1:]] + [final]
        return cls(tuple(ts), tuple(float(abar[t]) for t in ts), tuple(prev), initial_scale=scale, **extra)

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, start: int) -> "Schedule":
        """The chain from step ``start`` on (partial optimisation, ``opt_t``)."""
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in [0, {len(self) - 1}], got {start}")
        # the tail starts from a latent already inside the chain: no initial scaling
        return Schedule(self.timesteps[start:], self.alphas_cumprod[start:], self.alphas_cumprod_prev[start:],
                        timestep_scaling=self.timestep_scaling)

    def head(self, stop: int) -> "Schedule":
        """The chain's first ``stop`` steps (the unoptimised prefix of ``opt_t``)."""
        if not 1 <= stop <= len(self):
            raise ValueError(f"stop must be in [1, {len(self)}], got {stop}")
        return Schedule(self.timesteps[:stop], self.alphas_cumprod[:stop], self.alphas_cumprod_prev[:stop],
                        self.initial_scale, self.timestep_scaling)

    def ddim_coefficients(self, i: int) -> tuple[float, float]:
        """(a, b) of the DDIM step x_{t_prev} = a x_t + b eps (eta = 0).

        a = sqrt(abar_prev / abar_t),  b = sqrt(1 - abar_prev) - a sqrt(1 - abar_t)
        """
        abar_t, abar_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        a = math.sqrt(abar_prev / abar_t)
        return a, math.sqrt(1.0 - abar_prev) - a * math.sqrt(1.0 - abar_t)
