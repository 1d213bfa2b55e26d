"""One DOODL evaluation: chain -> decode -> guidance losses -> gradient into the initial latents.

Plain torch (no Lightning), so the LightningModule and the benchmarks run exactly the same code.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .sampling import Schedule, sample
from .sampling.chains import cotangent_scaled
from .precision import at_least_float32, to_module_dtype

# (images, latents=None) -> (total (N,), {name: (N,)}); latents: each image's initial latent, for the objectives
# with ``needs_latents`` (the noise-norm regulariser)
LossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]


def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """VAE-decode float32 latents to images in [-1, 1], running the VAE in its own dtype."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    # the loss's gradient per pixel is ~1e-6 at 512 px, below float16's normal range: run the decoder's
    # VJP on a cotangent brought to O(1) by a power of two (undone at the latent), as chains.vjp does per UNet call
    return cotangent_scaled(lambda z: at_least_float32(vae.decode(to_module_dtype(z, vae)).sample), z)


@dataclass
class Evaluation:
    total: Tensor                      # (N,) weighted loss per item, averaged over the optimised images
    terms: dict[str, Tensor]           # name -> (N,) unweighted per-item guidance losses
    images: Tensor                     # (N, 3, H, W) in [-1, 1], detached: the image the item shows
    info: dict = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name -> (N,) held-out metrics of ``images``, never optimised
    # (N,) the weighted loss of the reward terms alone, regularisers excluded (``reward_loss``): what the best
    # iteration, best-of-N and early stopping go by. None: no regulariser, so it is ``total`` itself
    reward: Tensor | None = None

    def __post_init__(self):
        if self.reward is None:
            self.reward = self.total


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
    noises: list[Tensor] | None = None,
) -> Evaluation:
    """Sample from z (and y, EDICT's second latent), decode, score; with ``backward`` accumulate
    dS/dz (and dS/dy) into their ``.grad``, S = the sum over items of the losses of the optimised images.

    As the official code: the loss is taken on the decoded image of BOTH EDICT latents and summed
    (``first_image_only``: on x_0's image only, the official ``optimize_first_edict_image_only``).
    Each final latent is decoded and back-propagated on its own graph before the next is decoded, so
    only one VAE-decoder graph is alive at a time; then the cotangents of all final latents go back
    through the chain together. ``Evaluation.total`` is the mean over the optimised images.

    Objectives of the latents (``needs_latents``, e.g. the noise-norm regulariser) see each scored image's own
    initial latent (x_0's image: z; y_0's: y) as ``loss_fn(img, latents=...)``, on a detached leaf like the image's:
    their gradient goes to z (and y) directly, not through the chain, and joins the chain's in the one
    ``backward`` below, so it is added exactly once. For an objective of images only it changes nothing.
    """
    info: dict = {}
    with torch.set_grad_enabled(backward):
        finals = sample(eps, z, schedule, sampler=sampler, backprop=backprop, y=y, mix_weight=mix_weight,
                        drift_tolerance=drift_tolerance, info=info, noises=noises)
    scored = finals[:1] if first_image_only else finals
    starts = [z, z if y is None else y]  # the initial latent of each final's chain (EDICT without y: y_T = x_T)
    k = len(scored)
    total, terms, images, cotangents, direct = 0.0, {}, None, [], []
    for j, final in enumerate(scored):
        leaf = final.detach().requires_grad_(backward)
        start = starts[j].detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            img = decode(leaf)
            item_total, item_terms = loss_fn(img, latents=start)
        if backward:
            g, g_start = torch.autograd.grad(item_total.sum(), (leaf, start), allow_unused=True)
            cotangents.append(g)
            if g_start is not None:  # an objective of the latents: its gradient, straight to z (or y)
                direct.append((starts[j], g_start))
        total = total + item_total.detach() / k
        for name, v in item_terms.items():
            terms[name] = terms.get(name, 0.0) + v.detach() / k
        if images is None:
            images = img.detach()
    if backward:
        cotangents += [torch.zeros_like(f) for f in finals[k:]]
        torch.autograd.backward(list(finals) + [t for t, _ in direct], cotangents + [g for _, g in direct])
    return Evaluation(total, terms, images, info)


def check_guidance(guidance, metrics=None, renormalize: bool = False) -> None:
    """At least one guidance module that is a reward (not regularisers only), with unique names (they are log keys);
    held-out ``metrics`` named apart from them and from each other; measurement-only modules only as metrics; the
    noise-norm regulariser only with ``renormalize`` off (the hard renormalisation would cancel it)."""
    from .guidance.noise_norm import NoiseNormRegularizer

    if not guidance:
        raise ValueError("no guidance modules: give model.guidance: [{class_path: ...}] (nothing to optimise)")
    names = [g.name for g in guidance]
    if all(getattr(g, "regularizer", False) for g in guidance):
        # the best iteration is the lowest reward loss (``reward_loss``): with regularisers alone it is always 0
        raise ValueError(f"model.guidance has only regularisers ({', '.join(names)}), no reward to choose the best "
                         f"iteration by: add a reward term (e.g. doodl_lightning.guidance.SymmetryGuidance)")
    if len(set(names)) != len(names):
        raise ValueError(f"guidance names must be unique (they are log keys), got {names}; set name: ...")
    for g in guidance:
        if getattr(g, "metric_only", False):
            raise ValueError(f"{g.name} ({type(g).__name__}) is a measurement only, never optimised: "
                             f"list it under model.metrics, not model.guidance")
        if isinstance(g, NoiseNormRegularizer) and renormalize:
            raise ValueError(f"{g.name} (NoiseNormRegularizer) is the soft alternative to renormalize_latents, which "
                             f"would cancel it every step: set renormalize_latents: false")
    metric_names = [m.name for m in metrics or []]
    clash = sorted(set(metric_names) & set(names))
    if clash:
        raise ValueError(f"metric name {clash[0]!r} is also a guidance name (both are log keys): give the metric "
                         f"another name: ...")
    if len(set(metric_names)) != len(metric_names):
        raise ValueError(f"metric names must be unique (they are log keys), got {metric_names}; set name: ...")
    for m in metrics or []:
        if getattr(m, "needs_latents", False):
            raise ValueError(f"metric {m.name} scores latents; metrics are measured on the images: "
                             f"move it to model.guidance")
    check_weights(guidance)


def check_weights(guidance) -> None:
    """The guidance weights (each already a finite number, ``Guidance.__init__``): a loss of weight 0 alone (or with
    only regularisers beside it) optimises nothing and ran to exit 0 with best loss 0.0, so it is refused; a
    negative weight steers AWAY from that term's target (the optimiser maximises its loss), which is allowed, as
    negative prompts are, but said once as a warning, since a minus sign is an easy slip."""
    rewards = [g for g in guidance if not getattr(g, "regularizer", False)]
    if rewards and all(g.weight == 0 for g in rewards):
        raise ValueError(f"every guidance term has weight 0 ({', '.join(g.name for g in rewards)}): nothing to "
                         f"optimise; give the term a non-zero weight (e.g. weight: 1.0)")
    for g in guidance:
        if g.weight < 0:
            warnings.warn(f"guidance {g.name} has weight {g.weight:g} < 0: it steers AWAY from its target (the "
                          f"optimisation maximises its loss); give a positive weight to steer toward it", stacklevel=2)


def weighted_guidance(guidance, prompts: list[str], generators: list[torch.Generator]) -> LossFn:
    """(images, latents=None) -> (sum of weight x loss over the guidance modules, {name: loss}), per item;
    ``latents`` (each image's initial latent) go to the modules with ``needs_latents`` only."""

    def loss_fn(images: Tensor, latents: Tensor | None = None):
        terms = {g.name: g(images, prompts=prompts, generators=generators,
                           **({"latents": latents} if getattr(g, "needs_latents", False) else {}))
                 for g in guidance}
        total = sum((g.weight * terms[g.name] for g in guidance), torch.zeros(len(prompts), device=images.device))
        return total, terms

    return loss_fn


def reward_loss(guidance, total: Tensor, terms: dict[str, Tensor]) -> Tensor:
    """(N,) the weighted sum of the guidance terms that are rewards, the regularisers (``Guidance.regularizer``, e.g.
    the noise-norm prior) left out: ReNO (ExplainableML/ReNO, ``training/trainer.py``, ``LatentNoiseTrainer.train``)
    keeps the iteration of the lowest ``total_reward_loss``, the reward losses summed before its regulariser is added.
    Without a regulariser it is ``total`` itself (the same tensor), so a DOODL run's best iteration is unchanged.
    The terms are summed in guidance order from zero, as ``weighted_guidance`` (and ReNO) sum them."""
    rewards = [g for g in guidance if not getattr(g, "regularizer", False)]
    if len(rewards) == len(guidance):
        return total
    return sum((g.weight * terms[g.name] for g in rewards), torch.zeros_like(total))


def concat_evaluations(outs: list[Evaluation]) -> Evaluation:
    """Micro-batch evaluations -> one over all their items (info: the worst value of each entry)."""
    info: dict = {}
    for o in outs:
        for k, v in o.info.items():
            info[k] = max(info.get(k, v), v)
    return Evaluation(total=torch.cat([o.total for o in outs]),
                      terms={k: torch.cat([o.terms[k] for o in outs]) for k in outs[0].terms},
                      images=torch.cat([o.images for o in outs]), info=info,
                      metrics={k: torch.cat([o.metrics[k] for o in outs]) for k in outs[0].metrics},
                      reward=None if all(o.reward is o.total for o in outs) else torch.cat([o.reward for o in outs]))


@torch.no_grad()
def held_out_metrics(metrics, images: Tensor, prompts: list[str], generators: list[torch.Generator]) -> dict[str, Tensor]:
    """{name: (N,)} of each metric module on the detached ``images``, under no_grad: logged, never optimised
    (the metric modules' own loss convention: lower is better unless the module says otherwise)."""
    images = images.detach()
    return {m.name: m.metric_value(images, prompts=prompts, generators=generators).detach() for m in metrics}
