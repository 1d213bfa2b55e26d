"""Zero-order search: hill-climbing on the initial noise with the guide's verdicts only (no gradient)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .best_of_n import candidate_noise
from .checks import check_counts, check_fresh_noise
from .selection import SelectionSearch


def check_radius(radius: float) -> None:
    if not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite number > 0 (the neighbourhood's size), got {radius!r}")


def neighbour(pivot: Tensor, direction: Tensor, radius: float) -> Tensor:
    """A point near ``pivot``: (pivot + radius direction) / sqrt(1 + radius^2), direction ~ N(0, I). The division
    keeps it a draw of N(0, I) when the pivot is one, so every candidate is noise the model knows (as DOODL's
    renormalisation keeps its latents on the sphere); radius -> infinity is a fresh candidate (best-of-N)."""
    return (pivot + radius * direction) / math.sqrt(1.0 + radius * radius)


class ZeroOrderSearch(SelectionSearch):
    """Zero-order search (Ma et al. 2025, "Inference-time scaling for diffusion models beyond scaling denoising
    steps", arXiv 2501.09732): start from a pivot noise, sample ``neighbours`` candidates in its
    neighbourhood (``neighbour``, of ``radius``), run the chain on each without gradient, move the pivot to the best
    noise found, repeat. The gradient-free counterpart of DOODL at the same budget: both move the noise by the
    guide's verdicts, one by finite samples, the other by the chain's gradient.

    Step 0 evaluates the item's own seed noise (the pivot: best-of-1, DOODL's start); step s >= 1 evaluates one
    neighbour of the current pivot for every item, in direction ``best_of_n.candidate_noise(item, s)``; after every
    ``neighbours`` steps the pivot moves to the best noise so far. The paper moves it to the best of the round's
    candidates even when that is worse than the pivot; keeping the best so far (a monotone climb) never loses a
    found image and is what best-of-N and DOODL's best iteration keep too. The run lasts ``trainer.max_steps``:
    compute per item = that many chains (steps UNet evaluations each, none back-propagated) and guidance evaluations.
    """

    def __init__(self, neighbours: int = 4, radius: float = 0.5, **kwargs):
        check_counts(neighbours=neighbours)
        check_radius(radius)
        check_fresh_noise(kwargs, "zero-order search")
        super().__init__(**kwargs)

    def setup(self, stage: str) -> None:
        fresh = not self.local_items
        super().setup(stage)
        if fresh:  # the pivot of the current round (checkpointed: a resume mid-round keeps it)
            self.register_buffer("pivot", self.latents.detach()[:, 0].clone())

    def candidate(self, s: int) -> Tensor:
        """Step ``s``'s latent pairs (N, P, C, h, w): the pivot itself at step 0, else a neighbour of the pivot."""
        if s == 0:
            z = self.pivot
        else:
            d = torch.stack([candidate_noise(it, s, self.latent_shape) for it in self.local_items]).to(self.pivot)
            z = neighbour(self.pivot, d, self.hparams.radius)
        return z.unsqueeze(1).repeat(1, self.chain.start.pair_size, 1, 1, 1).to(self.latents)

    def training_step(self, batch, batch_idx):
        s = self.global_step
        if s > 1 and (s - 1) % self.hparams.neighbours == 0:  # a round ended: move to the best noise so far
            self.pivot.copy_(self.latents.detach()[:, 0])
        z = self.candidate(s)
        with torch.no_grad():
            ev = self.evaluate_items(backward=False, latents=z)
        self.refuse_non_finite(ev)
        self.keep_better(ev.reward, z)
        self.finish_step(ev)
        return None
