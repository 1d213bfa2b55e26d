"""The official non-optimising baselines (``latent_traversal=False``): guidance added to eps at every step (to the
velocity of every Euler step on a rectified-flow model, SD3 / FLUX: the one-step baseline's counterpart)."""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .checks import check_finite
from .objective import Evaluation, concat_evaluations, evaluate
from .sampling import FlowSchedule, GuidedEps, OneStepGradient
from .sampling.one_step import FlowOneStepGradient, GuidedVelocity

ESTIMATES = ("one_step", "chain")


@torch.no_grad()
def guided_sampling(doodl, grad_scale: float, estimate: str = "one_step") -> Evaluation:
    """Sample each item of a prepared ``DOODL`` module once (its initial latents, no optimisation), adding to
    eps at every step sqrt(1 - abar_t) times the gradient of grad_scale * loss (official doodl.py, ``gen()``
    with ``latent_traversal=False``, the ``SteppingLayer`` guidance):

    - ``one_step`` (``one_step_baseline=True``): the loss of the one-step x0 estimate from the
      UNCONDITIONAL eps (``OneStepGradient``);
    - ``chain``: 0.5 x the gradient through the rest of the chain from (x_t, x_t), both EDICT images
      scored (official ``cond_fn``). Its chain is EDICT whatever the sampler: with ``sampler: ddim`` (the
      official ``single_variable=True``) only the sampling is DDIM; ``get_generic_cond_fn`` builds its own
      stepping layer without ``single_variable``, so the gradient still goes through EDICT.

    The module's sampler, steps, grid, CFG scale and guidance are used; ``Evaluation.images`` are the
    first latent's images. Cutouts are fresh at every guidance call (one generator stream per call).

    On a rectified-flow model (samplers ``flow`` / ``flow_edict``) only ``one_step`` exists: x0_hat = x - sigma v
    from the negative prompt's velocity (``FlowBackbone.unconditional_velocity``), its loss's gradient added to the
    velocity as sigma * grad (``FlowOneStepGradient``, ``GuidedVelocity``).

    The sampling starts at x_T and guides every step: ``opt_t`` and ``source_image`` are refused (see the
    fidelity narrative, "Baselines and the result image").
    """
    if estimate not in ESTIMATES:
        raise ValueError(f"unknown estimate {estimate!r}; choose one of {', '.join(ESTIMATES)}")
    check_finite(grad_scale=grad_scale)
    if grad_scale < 0:
        raise ValueError(f"grad_scale must be >= 0, got {grad_scale}")
    flow = doodl.chain.sampler.schedule_type is FlowSchedule  # a rectified-flow chain (SD3 / FLUX)
    if doodl.chain.name not in (("flow", "flow_edict") if flow else ("ddim", "edict")):
        raise ValueError(f"guided sampling (the official baselines) guides eps on the DDIM / EDICT chains (the velocity "
                         f"on the flow / flow_edict ones); sampler {doodl.chain.name!r} has no such baseline here: use "
                         f"sampler {'flow' if flow else 'ddim or edict'}")
    if flow and estimate != "one_step":
        raise ValueError(f"estimate {estimate!r} is the official EDICT cond_fn of the DDIM / EDICT chains; a "
                         "rectified-flow model (SD3 / FLUX) has the one-step baseline: use estimate one_step")
    if doodl.chain.start.opt_t is not None:
        # the official baseline reads opt_t only when editing; ours would guide a tail the user did not ask for
        raise ValueError("guided sampling guides every step from x_T (the official baseline ignores opt_t without a "
                         "source image): drop opt_t for the baselines")
    if doodl.chain.start.source_image is not None:
        raise ValueError("guided sampling does not edit a source_image (the official baseline's inversion skips "
                         "EDICT's mixing inverse, so even unguided it does not give the source back): drop "
                         "source_image for the baselines, or optimise the edit with fit")
    if not doodl.local_items or not doodl.chain.bound:
        raise RuntimeError("guided_sampling needs a prepared module: call doodl.prepare(device) first")
    latent = next((g for g in doodl.guidance if getattr(g, "needs_latents", False)), None)
    if latent is not None:
        raise ValueError(f"guided sampling optimises no latents, so {latent.name} (a loss on the initial latents) has "
                         f"nothing to act on: drop it from guidance for the baselines")
    chain = doodl.chain
    calls = itertools.count(1)
    outs = []
    for idx in doodl.chain.chunks():
        z = doodl.latents[idx].detach()
        loss_fn = lambda: doodl.loss_fn(idx, next(calls))  # noqa: E731 - a fresh cutout stream per call
        if flow:
            velocity_uncond = doodl.backbone.unconditional_velocity(chain.uncond, chain.config.guidance_scale)
            grad = FlowOneStepGradient(velocity_uncond, lambda z: loss_fn()(doodl.backbone.decode(z))[0],
                                       chain.schedule, grad_scale)
        elif estimate == "one_step":
            grad = OneStepGradient(chain.denoiser(idx, guidance_scale=0.0, device=z.device),
                                   lambda z: loss_fn()(doodl.backbone.decode(z))[0], chain.schedule, grad_scale)
        else:
            grad = _chain_gradient(doodl, idx, loss_fn, grad_scale)
        guide = GuidedVelocity if flow else GuidedEps
        final = chain.sample(z, idx, eps=guide(chain.denoiser(idx, device=z.device), grad, chain.schedule))
        images = doodl.backbone.decode(final)
        total, terms = doodl.loss_fn(idx, 0)(images)
        outs.append(Evaluation(total, terms, images))
    return concat_evaluations(outs)


def _chain_gradient(doodl, idx: list[int], loss_fn, grad_scale: float):
    """(x_t, t) -> 0.5 d(grad_scale * S)/dx_t, S = the loss of both images of the EDICT chain from (x_t, x_t)
    over the rest of the grid (official ``cond_fn`` of ``get_generic_cond_fn``): EDICT for either sampler."""
    hp, chain = doodl.hparams, doodl.chain
    index = {t: i for i, t in enumerate(chain.schedule.timesteps)}

    def grad(x: Tensor, t: int) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            # y = x: the pair (x_t, x_t) shares one leaf, so leaf.grad is the sum of both latents' gradients
            evaluate(chain.denoiser(idx, device=x.device), leaf, chain.schedule.tail(index[int(t)]), doodl.backbone.decode, loss_fn(),
                     sampler="edict", backprop=hp.backprop, mix_weight=hp.mix_weight, y=leaf,
                     drift_tolerance=hp.drift_tolerance, backward=True)
        return 0.5 * grad_scale * leaf.grad

    return grad
