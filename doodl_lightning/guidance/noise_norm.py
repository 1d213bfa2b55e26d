"""ReNO's noise-norm regulariser: a soft prior keeping the initial noise where Gaussian noise lives."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Guidance

__all__ = ["NoiseNormRegularizer", "chi_nll"]


def chi_nll(latents: Tensor) -> Tensor:
    """Per item (N,): the negative log-density of the chi distribution with d = C*h*w degrees of freedom at the
    latent's norm r, without the constants, shifted to be 0 at the mode r^2 = d - 1::

        R(z) = 0.5 r^2 - (d - 1) log r  -  (d - 1)/2 (1 - log(d - 1))  =  (d - 1)/2 (u - 1 - log u),  u = r^2 / (d - 1)
        dR/dz = z (1 - (d - 1) / r^2)

    ReNO (ExplainableML/ReNO, ``training/trainer.py``, ``LatentNoiseTrainer.train``) adds
    ``reg_weight * (0.5 * latent_norm**2 - (latent_dim - 1) * log(latent_norm))`` with latent_dim the elements of
    one latent: the same gradient; the shift only keeps the logged value readable (ReNO's is about -7e2 at SD-1.5
    size, dominated by the constant). Computed in at least float32, as ReNO does ("to avoid overflow").
    """
    z = latents.flatten(1)
    z = z if z.dtype == torch.float64 else z.float()
    d = z.shape[1]
    if d < 2:
        raise ValueError(f"the noise-norm prior needs latents of at least 2 elements per item, got {d}")
    u = z.pow(2).sum(1) / (d - 1)
    return 0.5 * (d - 1) * (u - 1 - torch.log(u))


class NoiseNormRegularizer(Guidance):
    """ReNO's regulariser on the initial latents (not the images): ``weight`` x ``chi_nll`` of each image's initial
    latent x_T, pulling its norm toward the mode sqrt(d - 1) of the chi distribution that the norm of d-dimensional
    standard Gaussian noise follows. ``weight``: ReNO's ``reg_weight`` (default 0.01, ReNO's).

    The soft alternative to the official hard renormalisation (which rescales every step back to the norm of
    x_T and so cancels this radial gradient): a config using it sets ``renormalize_latents: false``. Its gradient
    reaches the latents directly, added once to the chain's (``objective.evaluate``). With EDICT each image's
    own initial latent is scored (x_0's image with x_T, y_0's with y_T), as the official code renormalises both
    latents of the pair; tied pairs then get exactly the gradient of R(x_T).
    """

    default_name = "noise_norm"
    needs_latents = True
    regularizer = True  # a prior, not a reward: left out of the best-iteration choice (``Evaluation.reward``)

    def __init__(self, weight: float = 0.01, name: str | None = None):
        super().__init__(weight, name)
        if self.weight < 0:
            raise ValueError(f"{self.name}: weight must be >= 0 (ReNO's reg_weight, 0.01), got {weight}")
        self.freeze()

    def loss(self, images: Tensor, prompts: Sequence[str] | None, generators: Sequence[torch.Generator] | None,
             latents: Tensor | None = None) -> Tensor:
        """Per-item ``chi_nll`` of ``latents`` (N, C, h, w); the images are not looked at."""
        if latents.shape[0] != images.shape[0]:
            raise ValueError(f"{self.name}: {latents.shape[0]} latents for {images.shape[0]} images")
        return chi_nll(latents)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight} (on the initial latents)"
