"""Feynman-Kac steering of a diffusion chain (FK steering, Singhal et al. 2025, arXiv 2501.06848): k particles
per item run a stochastic DDIM chain; at chosen steps each particle's predicted clean image x̂0 is scored by the
guide and the particles are resampled in proportion to a potential of those rewards. Gradient-free, so any guide
(a classifier, a reward model, a black box) steers it. Plain torch: ``fk_steering.FKSteering`` is the
LightningModule over it.

Written from reading the reference code (zacharyhorvitz/Fk-Diffusion-Steering, ``fkd_class.py``, ``FKD.resample``,
and its text-to-image launcher: DDIM with eta = 1, potential ``diff``, lambda 10, resampling every 5 steps from
step 5). One deliberate difference, for robustness: the weights are kept as logarithms and shifted by their
maximum before ``exp`` (the reference exponentiates lambda x reward directly and clamps at 1e10). Resampling and the
effective sample size do not change under that shift, nor does the last step's division by the product of
potentials (every particle's product is shifted alike), so the two agree whenever the reference's weights are
finite and unclamped (``tests/test_particles.py`` checks this against a transcription); where lambda x reward
passes ~23 the reference's clamp distorts the weights, and where every weight underflows its multinomial fails.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .checks import check_counts
from .sampling.schedule import Schedule

POTENTIALS = ("diff", "max", "add", "rt")
"""The reference's potentials of the rewards r_s (s = the resampling steps so far, r_t the current one):
``diff`` G_t = exp(lambda (r_t - r_prev)), ``max`` exp(lambda max_s r_s), ``add`` exp(lambda sum_s r_s),
``rt`` exp(lambda r_t)."""


def check_fk(particles: int, potential: str, lmbda: float, eta: float, resample_every: int) -> None:
    """One-line errors for FK steering's settings, before any model loads."""
    check_counts(particles=particles, resample_every=resample_every)
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; choose one of {', '.join(POTENTIALS)}")
    if not math.isfinite(lmbda) or lmbda < 0:
        raise ValueError(f"lmbda must be a finite number >= 0 (0: no steering), got {lmbda!r}")
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (1: DDPM-like, 0: deterministic DDIM, so resampled copies stay "
                         f"identical), got {eta!r}")


def resampling_steps(steps: int, every: int, start: int, end: int | None) -> list[int]:
    """The step indices after which particles are resampled: start, start + every, ... <= end (``end`` None: the
    last step), and always the last step (the reference's ``resampling_interval``, of the steps that exist)."""
    end = steps if end is None else end
    return sorted(i for i in set(range(start, end + 1, every)) | {steps - 1} if 0 <= i < steps)


def ddim_eta_step(eps: Tensor, x: Tensor, schedule: Schedule, i: int, eta: float, noise: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    """One DDIM step t_i -> t_{i+1} with stochasticity eta (Song et al. 2021, eq. 12 and 16), given eps(x, t_i):
    (x_{t_{i+1}}, x̂0). x̂0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t); sigma = eta sqrt((1 - a_prev) / (1 - a_t))
    sqrt(1 - a_t / a_prev); x' = sqrt(a_prev) x̂0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise.
    As diffusers' ``DDIMScheduler.step`` with ``eta`` and ``variance_noise`` (no x̂0 clipping)."""
    a_t, a_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_prev, 0.0))
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        out = out + sigma * noise
    return out, x0


class FKResampler:
    """The particle bookkeeping of n items x k particles: each particle's last reward and (log) product of the
    potentials it was resampled with; ``resample`` returns which particle each new particle copies.

    ``adaptive``: resample only when the effective sample size falls below k / 2 (always checked at the last step,
    as the reference). ``reward_min``: the reward every particle starts with (the reference's 0.0)."""

    def __init__(self, n: int, k: int, potential: str, lmbda: float, steps: int, adaptive: bool = False,
                 reward_min: float = 0.0):
        self.k, self.potential, self.lmbda, self.steps, self.adaptive = k, potential, lmbda, steps, adaptive
        self.rewards = torch.full((n, k), float(reward_min), dtype=torch.float64)
        self.log_product = torch.zeros(n, k, dtype=torch.float64)

    def log_weights(self, i: int, r: Tensor) -> tuple[Tensor, Tensor]:
        """(log w, the rewards the particles carry on) at step ``i`` for current rewards ``r`` (n, k)."""
        lam, prev = self.lmbda, self.rewards
        if self.potential == "max":
            carried = torch.maximum(r, prev)
            logw = lam * carried
        elif self.potential == "add":
            carried = r + prev
            logw = lam * carried
        elif self.potential == "diff":
            carried = r
            logw = lam * (r - prev)
        else:  # rt
            carried = r
            logw = lam * r
        if i == self.steps - 1 and self.potential in ("max", "add", "rt"):
            # the last step's weight undoes the product of the potentials the path was resampled with, so the
            # target is exp(lambda r_0) (the reference: exp(lambda r) / product_of_potentials)
            logw = lam * carried - self.log_product
        return torch.nan_to_num(logw, nan=-math.inf), carried

    def resample(self, i: int, r: Tensor, generators: list[torch.Generator]) -> Tensor:
        """Resample at step ``i`` given rewards ``r`` (n, k; higher is better): (n, k) indices of the particles
        each new particle copies (identity where nothing is resampled); one multinomial draw per item from its
        generator."""
        r = r.detach().double().cpu()
        logw, carried = self.log_weights(i, r)
        shift = logw.max(dim=1, keepdim=True).values
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        w = (logw - shift).exp()  # the reference's weights up to a factor per item, which resampling ignores
        idx = torch.arange(self.k).repeat(len(r), 1)
        for j in range(len(r)):
            if not bool(w[j].sum() > 0):  # every weight zero (NaN rewards): nothing to prefer, keep the particles
                self.rewards[j] = carried[j]
                continue
            if self.adaptive or i == self.steps - 1:
                p = w[j] / w[j].sum()
                if float(1.0 / p.pow(2).sum()) >= 0.5 * self.k:  # enough effective particles: no resampling
                    self.rewards[j] = carried[j]
                    continue
            pick = torch.multinomial(w[j], self.k, replacement=True, generator=generators[j])
            idx[j] = pick
            self.rewards[j] = carried[j][pick]
            self.log_product[j] = self.log_product[j][pick] + logw[j][pick]
        return idx


def fk_sample(eps: Callable[[Tensor, int], Tensor], x: Tensor, schedule: Schedule, reward: Callable[[Tensor], Tensor],
              resampler: FKResampler, at: list[int], eta: float, noise: Callable[[int], Tensor],
              generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """FK steering on a DDIM chain: ``x`` (n k, C, h, w), item-major (item j's particles are rows j k ... j k + k - 1).

    After each step i in ``at`` the particles' x̂0 are scored (``reward``: (n k,) -> higher is better, of the
    latents x̂0) and resampled within each item. ``noise(i)``: step i's DDIM noise (n k, C, h, w). Returns the
    final latents and (n, k) the index of each final particle's ancestor among the initial ones."""
    n, k = len(x) // resampler.k, resampler.k
    x = x * schedule.initial_scale if schedule.initial_scale != 1.0 else x
    ancestor = torch.arange(k).repeat(n, 1)
    rows = (torch.arange(n) * k).unsqueeze(1)
    for i in range(len(schedule)):
        x, x0 = ddim_eta_step(eps(x, schedule.timesteps[i]), x, schedule, i, eta, noise(i) if eta > 0 else None)
        if i in at:
            idx = resampler.resample(i, reward(x0).view(n, k), generators)
            x = x[(rows + idx).flatten().to(x.device)]
            ancestor = torch.gather(ancestor, 1, idx)
    return x, ancestor
