"""Rescale each latent of every pair to the norm of its x_T after every step (official renormalize_latents)."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback


class LatentRenormalization(Callback):
    """Keep every latent on the sphere of its initial norm, where Gaussian noise of that size lives.

    Without it the optimiser drifts the latents off the typical set of N(0, I) and the diffusion model
    stops producing images. Applies only to the items the latest step changed (stopped items stay
    bit-identical). On by default through ``DOODL(renormalize_latents=...)``; off for editing real images.
    """

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = pl_module.stepped
        if rows is None or not bool(rows.any()):
            return
        z = pl_module.latents  # (N, P, C, h, w): each latent of the pair rescaled on its own
        norm = z[rows].flatten(2).norm(dim=2).clamp_min(1e-12)
        scale = (pl_module.initial_norm[rows, None] / norm).to(z.dtype)
        z[rows] = z[rows] * scale.view(*norm.shape, *[1] * (z.dim() - 2))
