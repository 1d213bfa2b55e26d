"""FK steering's reference code, transcribed for the parity tests (written from reading
zacharyhorvitz/Fk-Diffusion-Steering: ``text_to_image/fkd_diffusers/fkd_class.py``, class ``FKD``, and the denoising
loop of ``text_to_image/fkd_diffusers/fkd_pipeline_sd.py``, ``FKDStableDiffusion.__call__``, whose launcher
``launch_eval_runs.py`` keeps the best final particle by the guidance reward).

What the reference does, per prompt with ``num_particles`` copies of it in one batch:

  for i, t in enumerate(timesteps):
      eps = CFG(unet(latents, t))
      out = DDIMScheduler.step(eps, t, latents, eta)          # eta = 1 in the launcher
      latents, x0_preds = out.prev_sample, out.pred_original_sample
      latents = fkd.resample(sampling_idx=i, latents=latents, x0_preds=x0_preds)

``FKD.resample``: at the steps ``arange(t_start, t_end + 1, frequency)`` plus the last one, score the decoded
``x0_preds`` (rewards r), weight the particles by the potential (``diff``: exp(lambda (r - r_prev)); ``max``:
exp(lambda max(r, r_prev)); ``add``: exp(lambda (r + r_prev)); ``rt``: exp(lambda r); at the last step the
max / add / rt weights are exp(lambda r~) / product_of_potentials), clamp to [0, 1e10], zero NaNs, and resample
multinomially (with replacement); adaptively (and always at the last step) only when the effective sample size
is below half the particles.

Adapted, and why: the multinomial draws from a ``generator`` argument (the reference uses torch's global RNG), and
the scheduler's stochastic noise is passed in (``variance_noise``), so the test can give the reference the same
random numbers as the framework; the reward and decoder are callables; prints are dropped. Nothing else changed.
"""
from __future__ import annotations

import numpy as np
import torch


class FKD:
    """``fkd_class.FKD`` with the multinomial's generator injected."""

    def __init__(self, *, potential_type: str, lmbda: float, num_particles: int, adaptive_resampling: bool,
                 resample_frequency: int, resampling_t_start: int, resampling_t_end: int, time_steps: int,
                 reward_fn, reward_min_value: float = 0.0, latent_to_decode_fn=lambda x: x, device="cpu",
                 generator: torch.Generator | None = None):
        self.potential_type = potential_type
        self.lmbda = lmbda
        self.num_particles = num_particles
        self.adaptive_resampling = adaptive_resampling
        self.resample_frequency = resample_frequency
        self.resampling_t_start = resampling_t_start
        self.resampling_t_end = resampling_t_end
        self.time_steps = time_steps
        self.reward_fn = reward_fn
        self.latent_to_decode_fn = latent_to_decode_fn
        self.device = device
        self.generator = generator
        self.population_rs = torch.ones(self.num_particles, device=self.device) * reward_min_value
        self.product_of_potentials = torch.ones(self.num_particles).to(self.device)

    def resample(self, *, sampling_idx: int, latents: torch.Tensor, x0_preds: torch.Tensor):
        resampling_interval = np.arange(self.resampling_t_start, self.resampling_t_end + 1, self.resample_frequency)
        resampling_interval = np.append(resampling_interval, self.time_steps - 1)
        if sampling_idx not in resampling_interval:
            return latents, None

        population_images = self.latent_to_decode_fn(x0_preds)
        rs_candidates = self.reward_fn(population_images)

        if self.potential_type == "max":
            rs_candidates = torch.max(rs_candidates, self.population_rs)
            w = torch.exp(self.lmbda * rs_candidates)
        elif self.potential_type == "add":
            rs_candidates = rs_candidates + self.population_rs
            w = torch.exp(self.lmbda * rs_candidates)
        elif self.potential_type == "diff":
            diffs = rs_candidates - self.population_rs
            w = torch.exp(self.lmbda * diffs)
        elif self.potential_type == "rt":
            w = torch.exp(self.lmbda * rs_candidates)
        else:
            raise ValueError(f"potential_type {self.potential_type} not recognized")

        if sampling_idx == self.time_steps - 1:
            if self.potential_type in ("max", "add", "rt"):
                w = torch.exp(self.lmbda * rs_candidates) / self.product_of_potentials

        w = torch.clamp(w, 0, 1e10)
        w[torch.isnan(w)] = 0.0

        if self.adaptive_resampling or sampling_idx == self.time_steps - 1:
            normalized_w = w / w.sum()
            ess = 1.0 / (normalized_w.pow(2).sum())
            if ess < 0.5 * self.num_particles:
                indices = torch.multinomial(w, num_samples=self.num_particles, replacement=True,
                                            generator=self.generator)
                resampled_latents = latents[indices]
                self.population_rs = rs_candidates[indices]
                resampled_images = population_images[indices]
                self.product_of_potentials = self.product_of_potentials[indices] * w[indices]
            else:
                resampled_images = population_images
                resampled_latents = latents
                self.population_rs = rs_candidates
        else:
            indices = torch.multinomial(w, num_samples=self.num_particles, replacement=True, generator=self.generator)
            resampled_latents = latents[indices]
            self.population_rs = rs_candidates[indices]
            resampled_images = population_images[indices]
            self.product_of_potentials = self.product_of_potentials[indices] * w[indices]

        return resampled_latents, resampled_images


@torch.no_grad()
def fk_denoising_loop(unet, scheduler, cond, uncond, guidance_scale: float, latents: torch.Tensor, eta: float,
                      variance_noise, fkd: FKD) -> torch.Tensor:
    """``FKDStableDiffusion.__call__``'s denoising loop for one prompt's particles (``latents``: num_particles rows;
    ``cond`` / ``uncond``: one row each); ``variance_noise(i)``: the scheduler's noise at step i. The final latents."""
    n = len(latents)
    embeds = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
    for i, t in enumerate(scheduler.timesteps):
        noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        step = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=variance_noise(i), return_dict=True)
        latents, x0_preds = step.prev_sample, step.pred_original_sample
        latents, _ = fkd.resample(sampling_idx=i, latents=latents, x0_preds=x0_preds)
    return latents
