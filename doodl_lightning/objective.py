"""One DOODL evaluation: chain -> decode -> guidance losses -> gradient into the initial latents.

Plain torch (no Lightning), so the LightningModule and the benchmarks run exactly the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .sampling import Schedule, sample

LossFn = Callable[[Tensor], "tuple[Tensor, dict[str, Tensor]]"]  # images -> (total (N,), {name: (N,)})


def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """VAE-decode float32 latents to images in [-1, 1], running the VAE in its own dtype."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    dtype = next(vae.parameters()).dtype
    return vae.decode(z.to(dtype)).sample.float()


@dataclass
class Evaluation:
    total: Tensor                      # (N,) weighted loss per item, averaged over the EDICT pair
    terms: dict[str, Tensor]           # name -> (N,) unweighted per-item guidance losses
    images: Tensor                     # (N, 3, H, W) in [-1, 1], detached: the image the item shows
    info: dict = field(default_factory=dict)


def evaluate(
    eps: Callable[[Tensor, int], Tensor],
    z: Tensor,
    schedule: Schedule,
    decode: Callable[[Tensor], Tensor],
    loss_fn: LossFn,
    *,
    sampler: str = "ddim",
    backprop: str = "checkpoint",
    mix_weight: float = 0.93,
    y: Tensor | None = None,
    drift_tolerance: float = 1e-3,
    backward: bool = True,
) -> Evaluation:
    """Sample from z, decode, score; with ``backward`` accumulate d(sum of totals)/dz into z.grad.

    Each final latent (one for DDIM, the pair for EDICT) is decoded and back-propagated on its own
    graph before the next is decoded, so only one VAE-decoder graph is alive at a time; then the
    cotangents of all final latents go back through the chain together. For EDICT the loss is the
    mean over the pair (the official code's 0.5 * sum).
    """
    info: dict = {}
    with torch.set_grad_enabled(backward):
        finals = sample(eps, z, schedule, sampler=sampler, backprop=backprop, y=y, mix_weight=mix_weight,
                        drift_tolerance=drift_tolerance, info=info)
    finals = finals if isinstance(finals, tuple) else (finals,)
    k = len(finals)
    total, terms, images, cotangents = 0.0, {}, None, []
    for final in finals:
        leaf = final.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            img = decode(leaf)
            item_total, item_terms = loss_fn(img)
        if backward:
            (g,) = torch.autograd.grad(item_total.sum() / k, leaf)
            cotangents.append(g)
        total = total + item_total.detach() / k
        for name, v in item_terms.items():
            terms[name] = terms.get(name, 0.0) + v.detach() / k
        if images is None:
            images = img.detach()
    if backward:
        torch.autograd.backward(finals, cotangents)
    return Evaluation(total, terms, images, info)
