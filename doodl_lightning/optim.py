"""The DOODL update rule (official doodl.py, ``gen()``'s traversal loop) as a torch.optim.Optimizer."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .checks import check_finite


def check_update(grad_scale: float, clip_grad_val: float | None, momentum: float, perturb_grad_scale: float) -> None:
    """One-line errors for the update's settings, raised before any model is loaded."""
    check_finite(grad_scale=grad_scale, clip_grad_val=clip_grad_val, momentum=momentum,
                 perturb_grad_scale=perturb_grad_scale)
    if grad_scale <= 0:
        raise ValueError(f"grad_scale must be > 0 (it multiplies the loss), got {grad_scale}")
    if clip_grad_val is not None and clip_grad_val <= 0:
        raise ValueError(f"clip_grad_val must be > 0 or null (no clipping), got {clip_grad_val}")
    if perturb_grad_scale < 0:
        raise ValueError(f"perturb_grad_scale must be >= 0, got {perturb_grad_scale}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1) (official 0.9), got {momentum}")


class DOODLOptimizer(torch.optim.Optimizer):
    """The official hand-written update of the EDICT latent pair, under the official names.

    The parameter holds each item's latent pair, shape (N, P, C, h, w) with P = 2 for EDICT (x_T, y_T)
    and P = 1 for DDIM; its ``.grad`` is d S / d pair, S the sum of the UNSCALED losses of the images
    that are optimised (both EDICT images, or the first only). Per step, per item:

      1. g = -0.5 grad_scale dS/dpair        (``loss_fn`` returns loss * grad_scale; grad = -0.5 pair.grad)
      2. tied_latents: g = mean of g over the pair
      3. g = clip(g, -clip_grad_val, clip_grad_val)                  (element-wise)
      4. use_momentum: b = g at the first step, else b = momentum b + g;  g = b  (use_nesterov: g + momentum b)
      5. pair = pair + g + perturb_grad_scale N(0, I)                 (one draw, shared by the pair)
      6. tied_latents: both latents = their mean
    Renormalisation to the norm of x_T follows (``renormalize_latents``; the module applies it after any optimiser).

    There is no learning rate besides ``grad_scale``; multiplying the gradient by it equals multiplying
    the loss, since back-propagation is linear in its cotangent. The perturbation of row r (one item) at
    step k is drawn in float32 from ``noise_generator(r, k)`` when the module sets it, so it repeats
    across ranks, resumes and precisions.
    """

    def __init__(self, params, grad_scale: float = 1.0, clip_grad_val: float | None = 1e-3, use_momentum: bool = True,
                 momentum: float = 0.9, use_nesterov: bool = False, perturb_grad_scale: float = 1e-4,
                 tied_latents: bool = True):
        check_update(grad_scale, clip_grad_val, momentum, perturb_grad_scale)
        defaults = dict(grad_scale=grad_scale, clip_grad_val=clip_grad_val, use_momentum=use_momentum or use_nesterov,
                        momentum=momentum, use_nesterov=use_nesterov, perturb_grad_scale=perturb_grad_scale,
                        tied_latents=tied_latents)
        super().__init__(params, defaults)
        self.noise_generator: Callable[[int, int], torch.Generator] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() < 2:
                    raise ValueError(f"DOODLOptimizer needs latent pairs of shape (N, P, ...), got {tuple(p.shape)}")
                state = self.state[p]
                k = int(state.get("step", 0))
                # 1. the official gradient: -0.5 d(grad_scale * S)/d pair
                g = p.grad.to(p.dtype) * (-0.5 * group["grad_scale"])
                # 2. tied latents share one gradient, the pair's mean
                if group["tied_latents"]:
                    g = g.mean(dim=1, keepdim=True).expand_as(p)
                # 3. element-wise clipping, before momentum
                if group["clip_grad_val"] is not None:
                    g = g.clamp(-group["clip_grad_val"], group["clip_grad_val"])
                # 4. heavy-ball momentum without dampening (b = g at the first step)
                if group["use_momentum"]:
                    buf = state.get("momentum_buffer")
                    buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                    state["momentum_buffer"] = buf
                    g = g + group["momentum"] * buf if group["use_nesterov"] else buf
                # 5. step and perturbation (one draw per item, shared by its pair)
                p.add_(g)
                if group["perturb_grad_scale"] > 0:
                    p.add_(self._noise(p, k).unsqueeze(1), alpha=group["perturb_grad_scale"])
                # 6. tie the pair again
                if group["tied_latents"]:
                    p.copy_(p.mean(dim=1, keepdim=True).expand_as(p))
                state["step"] = torch.tensor(k + 1)
        return loss

    def _noise(self, p: Tensor, k: int) -> Tensor:
        shape = p.shape[2:]
        if self.noise_generator is None:
            return torch.randn(p.shape[0], *shape, dtype=torch.float32).to(p.device, p.dtype)
        rows = [torch.randn(shape, generator=self.noise_generator(r, k), dtype=torch.float32) for r in range(p.shape[0])]
        return torch.stack(rows).to(p.device, p.dtype)


def masked_step(optimizer: torch.optim.Optimizer, latents: Tensor, active: Sequence[bool] | Tensor) -> None:
    """Step ``optimizer`` but leave the rows of stopped items (and their optimiser state) untouched."""
    active = torch.as_tensor(active, dtype=torch.bool, device=latents.device)
    if bool(active.all()):
        optimizer.step()
        return
    keep = latents.detach()[~active].clone()
    state = optimizer.state.get(latents, {})
    saved = {k: v[~active].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape[:1] == latents.shape[:1]}
    optimizer.step()
    with torch.no_grad():
        latents[~active] = keep
        for k, v in saved.items():
            optimizer.state[latents][k][~active] = v


@torch.no_grad()
def renormalize_latents(latents: Tensor, target_norm: Tensor, rows: Tensor) -> None:
    """Rescale each latent of the pairs in ``rows`` to its item's norm of x_T (official ``renormalize_latents``).

    Gaussian noise of dimension d lives near the sphere of radius sqrt(d); off it the diffusion model
    stops producing images. Rows that did not step (stopped items) stay bit-identical.
    """
    if not bool(rows.any()):
        return
    norm = latents[rows].flatten(2).norm(dim=2).clamp_min(1e-12)  # (n, P): each latent on its own
    scale = (target_norm[rows, None] / norm).to(latents.dtype)
    latents[rows] = latents[rows] * scale.view(*norm.shape, *[1] * (latents.dim() - 2))


# -- the other updates of a noise search (issue 14's optimiser variants; ReNO's recipe is SGD-Nesterov with
#    per-item gradient-norm clipping) --------------------------------------------------------------------------
UPDATES = ("official", "adam", "sgd")


def check_alternative_update(update_rule: str, lr: float, max_grad_norm: float | None) -> None:
    """One-line errors for ``update_rule`` and the settings of the non-official updates."""
    if update_rule not in UPDATES:
        raise ValueError(f"unknown update_rule {update_rule!r}; choose one of {', '.join(UPDATES)}")
    check_finite(lr=lr, max_grad_norm=max_grad_norm)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or null (no clipping), got {max_grad_norm}")


class _PerItem:
    """Mixin for a torch optimiser over latent pairs (N, P, ...): before its step, the pair's gradient is
    tied (its mean, when ``tied_latents``) and the gradient norm of each item's latent clipped to
    ``max_grad_norm`` (per item: one item's large gradient must not shrink the others' steps); after it, the pair is tied.
    The clip is ``torch.nn.utils.clip_grad_norm_``'s on each latent alone, g * min(1, max_grad_norm / (|g| + 1e-6)):
    for one item it is ReNO's clip exactly (``tests/test_reno_recipe.py`` runs ReNO's loop beside it)."""

    def _prepare(self, max_grad_norm: float | None, tied_latents: bool) -> None:
        self.max_grad_norm, self.tied_latents = max_grad_norm, tied_latents

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(p.dtype)
                if self.tied_latents:
                    g = g.mean(dim=1, keepdim=True).expand_as(p)
                if self.max_grad_norm is not None:
                    # torch.nn.utils.clip_grad_norm_'s factor, max_norm / (norm + 1e-6) capped at 1, as ReNO clips
                    # (training/trainer.py), per latent of each pair (N, P) instead of over the whole tensor; the
                    # 1e-6 also keeps a zero gradient finite
                    norm = g.flatten(2).norm(dim=2)
                    g = g * (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).view(*norm.shape, *[1] * (g.dim() - 2))
                p.grad = g.contiguous()
        loss = super().step(closure)
        if self.tied_latents:
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(p.mean(dim=1, keepdim=True).expand_as(p))
        return loss


class PerItemAdam(_PerItem, torch.optim.Adam):
    """Adam on d loss / d pair, with per-item gradient-norm clipping and tied pairs."""

    def __init__(self, params, lr: float, max_grad_norm: float | None = None, tied_latents: bool = True):
        super().__init__(params, lr=lr)
        self._prepare(max_grad_norm, tied_latents)


class PerItemSGD(_PerItem, torch.optim.SGD):
    """SGD with (Nesterov) momentum on d loss / d pair, with per-item gradient-norm clipping and tied pairs."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True,
                 max_grad_norm: float | None = None, tied_latents: bool = True):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        self._prepare(max_grad_norm, tied_latents)
