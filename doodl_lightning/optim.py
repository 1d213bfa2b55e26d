"""The DOODL update rule (official doodl.py) as a torch.optim.Optimizer."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


class DOODLOptimizer(torch.optim.Optimizer):
    """SGD with momentum on element-wise clipped gradients plus a small Gaussian perturbation.

    Per step, for each latent z with gradient g:
      1. g <- clamp(g, -clip, clip)                       (element-wise, as the official code)
      2. m <- momentum * m + g ;  z <- z - lr * m         (torch SGD, nesterov off)
      3. z <- z + perturbation * N(0, I)                  (keeps the search from stalling)
    ``lr`` plays the official ``grad_scale``. The perturbation of row r (one item) at step k is drawn
    from ``noise_generator(r, k)`` when the module sets it, so it repeats across ranks and resumes.
    Renormalisation to the initial norm is a callback (``callbacks.LatentRenormalization``).
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, clip: float = 1e-3, perturbation: float = 1e-4):
        if lr <= 0 or clip <= 0 or perturbation < 0 or not 0 <= momentum < 1:
            raise ValueError("need lr > 0, clip > 0, perturbation >= 0 and 0 <= momentum < 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, clip=clip, perturbation=perturbation))
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
                state = self.state[p]
                k = int(state.get("step", 0))
                g = p.grad.clamp(-group["clip"], group["clip"])
                buf = state.get("momentum_buffer")
                buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                state["momentum_buffer"] = buf
                p.add_(buf, alpha=-group["lr"])
                if group["perturbation"] > 0:
                    p.add_(self._noise(p, k), alpha=group["perturbation"])
                state["step"] = torch.tensor(k + 1)
        return loss

    def _noise(self, p: Tensor, k: int) -> Tensor:
        if self.noise_generator is None:
            return torch.randn_like(p)
        rows = [torch.randn(p.shape[1:], generator=self.noise_generator(r, k)) for r in range(p.shape[0])]
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
