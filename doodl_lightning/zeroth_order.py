"""DNO with black-box rewards: the initial noise optimised with a zeroth-order estimate of d loss / d noise."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .checks import check_counts, check_finite, check_fresh_noise
from .data import step_generator
from .guidance.blackbox import is_black_box
from .module import DOODL
from .objective import Evaluation, weighted_guidance
from .optim import masked_step
from .precision import amp_unscale_cancelled

__all__ = ["DNO", "antithetic_gradient", "check_zeroth_order"]

DIRECTION_STREAM = 8  # ``data.step_generator`` stream of the probe directions (the others: 1-4, 6, 7)


def check_zeroth_order(directions: int, mu: float, hybrid_weight: float) -> None:
    """One-line errors for the estimator's settings, before any model loads."""
    check_counts(directions=directions)
    check_finite(mu=mu, hybrid_weight=hybrid_weight)
    if mu <= 0:
        raise ValueError(f"mu must be > 0 (the probes' distance from the noise, in units of its standard deviation), "
                         f"got {mu}")
    if hybrid_weight < 0:
        raise ValueError(f"hybrid_weight must be >= 0 (0: zeroth order on every term), got {hybrid_weight}")


def antithetic_gradient(f: Callable[[Tensor], Tensor], z: Tensor, u: Tensor, mu: float) -> Tensor:
    """The antithetic (central-difference) Gaussian-smoothing estimate of the gradient of ``f`` at each row of ``z``
    (Nesterov & Spokoiny 2017, "Random gradient-free minimization of convex functions", eq. 2.6 with symmetric
    probes; the zeroth-order estimator of DNO, Tang et al. ICML 2025, Sec. 5)::

        g = 1/q sum_i (f(z + mu u_i) - f(z - mu u_i)) / (2 mu) u_i,      u_i ~ N(0, I)

    E[g] is the gradient of the Gaussian smoothing of f; for a quadratic each term is exactly (grad f . u_i) u_i, so
    E[g] = grad f, and for a smooth f the error of each difference is O(mu^2).

    z: (N, *S) the points; u: (N, q, *S) q directions per point; f: (M, *S) -> (M,), called once on all 2 q N probes
    (probe j of row n at position j N + n; j = 2 i is z + mu u_i, j = 2 i + 1 is z - mu u_i). Returns (N, *S).
    """
    n, q = u.shape[:2]
    probes = torch.stack([z[:, None] + mu * u, z[:, None] - mu * u], dim=2)  # (N, q, 2, *S)
    values = f(probes.permute(1, 2, 0, *range(3, probes.dim())).reshape(2 * q * n, *z.shape[1:]))
    values = values.reshape(q, 2, n).to(torch.float64)
    slope = (values[:, 0] - values[:, 1]) / (2 * mu)  # (q, N): each direction's central difference
    return torch.einsum("qn,nq...->n...", slope.to(u.dtype), u) / q


class DNO(DOODL):
    """Direct noise optimisation with black-box rewards (DNO, Tang et al. ICML 2025, "Inference-time alignment of
    diffusion models with direct noise optimization", Sec. 5): the initial noise of each item is optimised with a
    zeroth-order estimate of d loss / d noise (``antithetic_gradient``), so the reward needs no gradient
    (``guidance.BlackBoxReward``: a VLM judge, a JPEG size, a classifier's verdict), or with the hybrid that adds
    ``hybrid_weight`` x the exact gradient of the differentiable terms through the chain.

    YAML keys, beside DOODL's (items, model, chain, guidance; the update: ``update_rule`` adam / sgd / official with
    its settings, here defaulting to the reference's Adam, lr 0.01, and its gradient-norm clip 1.0 per latent):
        directions: q, the antithetic pairs of probes per item and step (2 q chains without gradient).
        mu: the probes' distance, z +- mu u with u ~ N(0, I) (the reference's ``mu``; in units of the noise's
            standard deviation).
        hybrid_weight: 0 = every guidance term estimated by zeroth order (differentiable or not; nothing is
            back-propagated); > 0 = the black-box terms estimated, the differentiable terms' exact gradient (the
            configured ``backprop``, checkpoint by default) added with this weight.

    One step, per item: (1) evaluate the current noise z (what the item shows; the hybrid's evaluation also
    back-propagates the differentiable terms); (2) draw q directions from the item's own (seed, step) generator
    (stream ``DIRECTION_STREAM``), run the chain without gradient on z +- mu u_i (all with the step's cutouts, so
    the pairs differ by the noise alone); (3) the estimate of the estimated terms' weighted loss, plus the hybrid
    part, becomes ``latents.grad`` and the configured update steps it (renormalisation as DOODL's). An EDICT pair is
    perturbed along the tied direction (u for both latents); the estimate is scaled to what the tied mean of the
    exact pair gradient would be. Compute per item and step: (2 q + 1) chains without gradient, plus, in the hybrid,
    the back-propagated recomputation of one chain (``backprop: checkpoint``); 2 q + 1 guidance evaluations.

    The reference implementation (TZW1998/Direct-Noise-Optimization, ``dno_stable_diffusion_nograd.py``) estimates
    in image space instead (forward differences of the reward against the unperturbed sample, the perturbed
    samples' differences as directions, normalised and back-propagated through the chain): the hybrid of that
    paper needs the chain's gradient at every step; this one spends none when ``hybrid_weight`` is 0.
    """

    def __init__(self, directions: int = 4, mu: float = 0.1, hybrid_weight: float = 0.0, update_rule: str = "adam",
                 lr: float = 0.01, max_grad_norm: float | None = 1.0, **kwargs):
        check_zeroth_order(directions, mu, hybrid_weight)
        check_fresh_noise(kwargs, "DNO")
        super().__init__(update_rule=update_rule, lr=lr, max_grad_norm=max_grad_norm, **kwargs)
        blind = [g for g in self.guidance if is_black_box(g)]
        exact = [g for g in self.guidance if not is_black_box(g)]
        if hybrid_weight > 0 and not blind:
            raise ValueError(f"hybrid_weight is {hybrid_weight} but no guidance term is a black box (every term has a "
                             f"gradient): use DOODL, or set hybrid_weight: 0 to estimate them all by zeroth order")
        if hybrid_weight > 0 and not exact:
            raise ValueError(f"hybrid_weight is {hybrid_weight} but every guidance term is a black box (none has a "
                             f"gradient to mix in): set hybrid_weight: 0, or add a differentiable term")
        if self.chain.start.pair_size > 1 and not self.hparams.tied_latents:
            raise ValueError("DNO perturbs an EDICT pair along the tied direction: set tied_latents: true (or "
                             "sampler: ddim)")
        # the terms the zeroth-order estimate covers (all of them in the pure form) and those back-propagated
        self.estimated = exact + blind if hybrid_weight == 0 else blind
        self.exact = [] if hybrid_weight == 0 else exact

    def loss_fn(self, idx: list[int], stream_step: int):
        """DOODL's weighted loss of items ``idx`` (``idx`` may repeat an item: its probes), with the black-box terms
        scored on the detached images outside the graph, so the hybrid back-propagates the other terms only."""
        items = [self.local_items[i] for i in idx]
        prompts = [it.prompt for it in items]
        generators = [step_generator(it, stream_step, stream=1) for it in items]
        blind = weighted_guidance([g for g in self.guidance if is_black_box(g)], prompts, generators)
        exact = weighted_guidance([g for g in self.guidance if not is_black_box(g)], prompts, generators)

        def fn(images: Tensor, latents: Tensor | None = None):
            with torch.no_grad():
                total, terms = blind(images.detach(), latents)
            more, exact_terms = exact(images, latents)
            return total + more, {g.name: {**terms, **exact_terms}[g.name] for g in self.guidance}

        return fn

    def estimated_loss(self, ev: Evaluation) -> Tensor:
        """(N,) the weighted loss of the terms the zeroth-order estimate covers."""
        return sum((g.weight * ev.terms[g.name] for g in self.estimated), torch.zeros_like(ev.total))

    @torch.no_grad()
    def probe_losses(self, z: Tensor, step: int) -> Tensor:
        """The estimated loss (M,) of probe rows ``z`` (M = 2 q N latent pairs, row j N + n of local item n), the
        probes of each micro-batch of items through the chain in one batch, without gradient (a non-finite loss
        makes the estimate non-finite, which ``refuse_non_finite`` names by its item)."""
        n = len(self.local_items)
        out = torch.empty(len(z), dtype=torch.float64, device=z.device)
        for idx in self.chain.chunks():
            rows = [j * n + i for j in range(len(z) // n) for i in idx]
            items = [i for _ in range(len(z) // n) for i in idx]
            ev = self.chain.evaluate(z[rows], items, self.loss_fn(items, step), backward=False)
            out[rows] = self.estimated_loss(ev).to(out)
        return out

    def directions(self, step: int) -> Tensor:
        """(N, q, C, h, w) the probe directions of every local item at ``step``, from the item's own generator."""
        q = self.hparams.directions
        return torch.stack([torch.randn((q, *self.latent_shape), generator=step_generator(it, step, DIRECTION_STREAM),
                                        dtype=torch.float32) for it in self.local_items])

    def estimate(self, step: int) -> Tensor:
        """The zeroth-order estimate (N, P, C, h, w) at the current latents, scaled as the exact pair gradient's
        ``latents.grad``: the chain's loss is the mean over the scored images of a pair, its gradient their sum."""
        z = self.latents.detach()
        u = self.directions(step).to(z)
        u = u.unsqueeze(2).expand(*u.shape[:2], z.shape[1], *u.shape[2:])  # one direction for both latents of a pair
        g = antithetic_gradient(lambda rows: self.probe_losses(rows, step), z, u, self.hparams.mu)
        scored = 1 if self.chain.config.first_image_only else z.shape[1]
        return g * (scored / z.shape[1])

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        k = self.global_step
        # 1. the current noise: what the item shows; the hybrid back-propagates its differentiable terms here
        with torch.set_grad_enabled(bool(self.exact)):
            ev = self.evaluate_items(backward=bool(self.exact))
        self.refuse_non_finite(ev)
        # 2. the zeroth-order estimate from 2 q probes per item, 3. plus the hybrid's exact part
        grad = self.estimate(k)
        if self.exact:
            grad = grad + self.hparams.hybrid_weight * self.latents.grad
        self.latents.grad = grad.contiguous()
        self.refuse_non_finite(ev, grad)  # before the update: the latents stay the last ones with a finite loss
        self.stepped = self.active.clone()
        with amp_unscale_cancelled(grad, getattr(self.trainer.precision_plugin, "scaler", None)):
            masked_step(opt, self.latents, self.stepped)
        self.last = ev
        self.log_step(ev, grad)
        return None
