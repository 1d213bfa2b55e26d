"""Where the chain starts: each item's initial latent pair, from its seed, an inverted image, or a partial chain."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .data import Item, initial_noise, load_source_image
from .sampling import Eps, Schedule, get_sampler


class ChainStart:
    """The pair (x_T, y_T) the optimisation starts from, and the chain it optimises (official ``gen()``).

    - seeds (always first): x_T from each item's seed, the pair (x_T, x_T) (official
      ``latent_pair = [latent, latent]``); its norm is the renormalisation target.
    - ``source_image`` (editing): a VAE posterior sample (each item's seed draws it, not the mean, as the
      official code), EDICT-inverted over the whole chain; the pair is untied.
    - ``opt_t``: the first steps - opt_t steps run once without gradient and the last ``opt_t`` are
      optimised; the pair is then tied (its mean) if ``tied_latents``; the renormalisation target stays
      the norm of x_T.
    """

    @staticmethod
    def check(steps: int, sampler: str | None, opt_t: int | None = None, source_image: str | None = None,
              renormalize_latents: bool | None = None) -> None:
        """One-line errors for where the chain starts, before any model loads (``ChainConfig`` calls it once; with
        ``sampler`` None, the model's own, ``check_editable`` runs once the sampler is known)."""
        if opt_t is not None and not 1 <= opt_t <= steps:
            raise ValueError(f"opt_t must be in [1, steps={steps}] or null, got {opt_t}")
        if source_image is None:
            return
        if not os.path.isfile(source_image):
            raise FileNotFoundError(f"source_image {source_image} does not exist")
        if sampler is not None:
            ChainStart.check_editable(sampler, source_image)
        if opt_t is not None:
            raise ValueError("opt_t cannot be combined with source_image (the official code optimises an edit "
                             "at x_T): drop opt_t")
        if renormalize_latents:
            raise ValueError("renormalize_latents must be off when editing a source_image (the inverted pair is "
                             "not Gaussian noise; the official code asserts it): drop renormalize_latents")

    @staticmethod
    def check_editable(sampler: str, source_image: str | None) -> None:
        """Editing a source image needs an exactly invertible sampler."""
        if source_image is not None and not get_sampler(sampler).invertible:
            raise ValueError("editing a source_image needs sampler 'edict' (or 'flow_edict' for SD3 / FLUX): "
                             "exact inversion")

    def __init__(self, steps: int, sampler: str, mix_weight: float, opt_t: int | None = None,
                 source_image: str | None = None, tied_latents: bool = True, renormalize_latents: bool | None = None):
        # the settings are checked by ChainStart.check (ChainConfig), once
        self.steps, self.sampler, self.mix_weight = steps, sampler, mix_weight
        self.opt_t, self.source_image, self.tied_latents = opt_t, source_image, tied_latents
        self.pair_size = get_sampler(sampler).latents
        # renormalisation to the norm of x_T: on for seed noise, off for an inverted image
        self.renormalize = (source_image is None) if renormalize_latents is None else renormalize_latents
        self.round_trip_error: float | None = None  # of the inversion, when editing

    def noise(self, items: list[Item], latent_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The seeds' pairs (N, P, C, h, w) in float32 and the norms of their x_T in float64 (exact under 64-true)."""
        z = torch.stack([initial_noise(it, latent_shape) for it in items])
        return z.unsqueeze(1).repeat(1, self.pair_size, 1, 1, 1), z.double().flatten(1).norm(dim=1)

    def optimised(self, full: Schedule) -> Schedule:
        """The chain that is optimised: all of it, or its last ``opt_t`` steps, a chain of its own (its
        leapfrog order restarts: official ``enumerate(timesteps)`` over the shortened list)."""
        return full if self.opt_t is None else full.tail(len(full) - self.opt_t)

    @torch.no_grad()
    def prepare(self, pair: Tensor, eps: Eps, full: Schedule, backbone, items: list[Item]) -> Tensor:
        """The pair after editing's inversion or opt_t's prefix (unchanged when neither is set)."""
        if self.source_image is not None:
            return self._invert(pair, eps, full, backbone, items).to(pair.dtype)
        start = len(full) - (self.opt_t or len(full))
        if start == 0:
            return pair
        head = full.head(start)
        out = torch.stack(get_sampler(self.sampler).sample(eps, pair[:, 0], head, y=pair[:, 1] if self.pair_size == 2
                                                           else None, mix_weight=self.mix_weight), dim=1)
        if self.pair_size == 1:
            return out.to(pair.dtype)
        if self.tied_latents:
            out = out.mean(dim=1, keepdim=True).expand_as(out)
        return out.to(pair.dtype).contiguous()

    def _invert(self, pair: Tensor, eps: Eps, full: Schedule, backbone, items: list[Item]) -> Tensor:
        _, h, w = pair.shape[2:]
        f = backbone.vae_scale_factor
        x = load_source_image(self.source_image, (w * f, h * f)).to(pair.device)
        gens = [torch.Generator().manual_seed(it.seed) for it in items]
        z0 = backbone.encode_images(x.expand(len(gens), -1, -1, -1), generators=gens)
        inv = get_sampler(self.sampler).invert(eps, z0, full, self.mix_weight)
        self.round_trip_error = inv.round_trip_error
        return torch.stack([inv.x, inv.y], dim=1)
