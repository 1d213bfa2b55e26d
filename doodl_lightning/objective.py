"""One DOODL evaluation: chain -> decode -> guidance losses -> gradient into the initial latents.

Plain torch (no Lightning), so the LightningModule and the benchmarks run exactly the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .sampling import Schedule, sample
from .sampling.backprop import cotangent_scaled
from .precision import at_least_float32, to_module_dtype

LossFn = Callable[[Tensor], "tuple[Tensor, dict[str, Tensor]]"]  # images -> (total (N,), {name: (N,)})


def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """VAE-decode float32 latents to images in [-1, 1], running the VAE in its own dtype."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    # the loss's gradient per pixel is ~1e-6 at 512 px, below float16's normal range: run the decoder's
    # VJP on a cotangent brought to O(1) by a power of two (undone at the latent), as _vjp does per UNet call
    return cotangent_scaled(lambda z: at_least_float32(vae.decode(to_module_dtype(z, vae)).sample), z)


@dataclass
class Evaluation:
    total: Tensor                      # (N,) weighted loss per item, averaged over the optimised images
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
    first_image_only: bool = False,
) -> Evaluation:
    """Sample from z (and y, EDICT's second latent), decode, score; with ``backward`` accumulate
    dS/dz (and dS/dy) into their ``.grad``, S = the sum over items of the losses of the optimised images.

    As the official code: the loss is taken on the decoded image of BOTH EDICT latents and summed
    (``first_image_only``: on x_0's image only, the official ``optimize_first_edict_image_only``).
    Each final latent is decoded and back-propagated on its own graph before the next is decoded, so
    only one VAE-decoder graph is alive at a time; then the cotangents of all final latents go back
    through the chain together. ``Evaluation.total`` is the mean over the optimised images.
    """
    info: dict = {}
    with torch.set_grad_enabled(backward):
        finals = sample(eps, z, schedule, sampler=sampler, backprop=backprop, y=y, mix_weight=mix_weight,
                        drift_tolerance=drift_tolerance, info=info)
    scored = finals[:1] if first_image_only else finals
    k = len(scored)
    total, terms, images, cotangents = 0.0, {}, None, []
    for final in scored:
        leaf = final.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            img = decode(leaf)
            item_total, item_terms = loss_fn(img)
        if backward:
            (g,) = torch.autograd.grad(item_total.sum(), leaf)
            cotangents.append(g)
        total = total + item_total.detach() / k
        for name, v in item_terms.items():
            terms[name] = terms.get(name, 0.0) + v.detach() / k
        if images is None:
            images = img.detach()
    if backward:
        cotangents += [torch.zeros_like(f) for f in finals[k:]]
        torch.autograd.backward(finals, cotangents)
    return Evaluation(total, terms, images, info)


def check_guidance(guidance) -> None:
    """At least one guidance module, with unique names (they are log keys)."""
    if not guidance:
        raise ValueError("no guidance modules: give model.guidance: [{class_path: ...}] (nothing to optimise)")
    names = [g.name for g in guidance]
    if len(set(names)) != len(names):
        raise ValueError(f"guidance names must be unique (they are log keys), got {names}; set name: ...")


def weighted_guidance(guidance, prompts: list[str], generators: list[torch.Generator]) -> LossFn:
    """images -> (sum of weight x loss over the guidance modules, {name: loss}), per item."""

    def loss_fn(images: Tensor):
        terms = {g.name: g(images, prompts=prompts, generators=generators) for g in guidance}
        total = sum((g.weight * terms[g.name] for g in guidance), torch.zeros(len(prompts), device=images.device))
        return total, terms

    return loss_fn


def concat_evaluations(outs: list[Evaluation]) -> Evaluation:
    """Micro-batch evaluations -> one over all their items (info: the worst value of each entry)."""
    info: dict = {}
    for o in outs:
        for k, v in o.info.items():
            info[k] = max(info.get(k, v), v)
    return Evaluation(total=torch.cat([o.total for o in outs]),
                      terms={k: torch.cat([o.terms[k] for o in outs]) for k in outs[0].terms},
                      images=torch.cat([o.images for o in outs]), info=info)
