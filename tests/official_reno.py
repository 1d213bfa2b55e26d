"""ReNO's optimisation loop, transcribed for the parity tests (written from reading ExplainableML/ReNO,
``training/trainer.py``, ``LatentNoiseTrainer.train``, and ``training/optim.py``, ``get_optimizer``).

What ReNO does per iteration, for ONE prompt and one latent tensor (batch 1):

  1. zero the gradient; image = model.apply(latents)
  2. total = sum over the reward losses of loss * weighting;  total_reward_loss = total.item()  (before 3)
  3. regularize: total += reg_weight * (0.5 |z|^2 - (d - 1) log |z|),  d = elements of one latent
  4. keep image / rewards as the best when total_reward_loss < best_loss (strict: the first of equals)
  5. except at the last iteration: total.backward(); torch.nn.utils.clip_grad_norm_(latents, grad_clip); step

The optimiser is ``torch.optim.SGD(lr, momentum=0.9, nesterov=...)`` (``get_optimizer("sgd", ...)``). So n_iters
iterations evaluate n_iters images and take n_iters - 1 steps.

Adapted, and why:
- the model and the rewards are callables (``apply(latents) -> image``, ``loss(image, prompt) -> scalar``), so the
  loop can run on any chain; ReNO's per-iteration ``torch.Generator("cuda").manual_seed(seed)`` feeds its one-step
  pipelines' sampling noise, which a deterministic chain does not draw, and the 224-px CLIP preprocessing belongs
  to its rewards, so neither is here;
- ReNO casts the latent norm to float32 "to avoid overflow" (its latents are float16); here it is cast to at least
  float32, so a float64 run stays float64 (a float32 cast would round the regulariser's gradient to 1e-8);
- what ReNO only logs is returned: every iteration's latents, rewards, total with the regulariser, the gradient
  norm before clipping, and the best iteration's index (ReNO keeps its image and rewards).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor


def reno_optimizer(latents: Tensor, lr: float, nesterov: bool = True) -> torch.optim.Optimizer:
    """``get_optimizer("sgd", latents, lr, nesterov)``: SGD with momentum 0.9, no dampening or weight decay."""
    return torch.optim.SGD([latents], lr=lr, nesterov=nesterov, momentum=0.9)


def reno_train(latents: Tensor, prompt: str, apply: Callable[[Tensor], Tensor],
               reward_losses: Sequence[tuple[str, Callable[[Tensor, str], Tensor], float]],
               optimizer: torch.optim.Optimizer, n_iters: int, regularize: bool = True,
               regularization_weight: float = 0.01, grad_clip: float = 0.1) -> dict:
    """ReNO's ``LatentNoiseTrainer.train`` on the leaf ``latents`` (1, C, h, w); ``reward_losses``: (name, loss,
    weighting). Returns {"best_iteration", "best_image", "initial_rewards", "best_rewards", "latents" (each
    iteration's, before its step), "rewards" (each iteration's dict), "totals" (with the regulariser), "grad_norms"
    (before clipping, one per step)}."""
    best_loss = math.inf
    best_image = best_rewards = initial_rewards = best_iteration = None
    latent_dim = math.prod(latents.shape[1:])
    seen_latents, seen_rewards, totals, grad_norms = [], [], [], []
    for iteration in range(n_iters):
        rewards = {}
        optimizer.zero_grad()
        seen_latents.append(latents.detach().clone())
        image = apply(latents)
        # 2. the weighted reward losses; their sum is recorded before the regulariser joins it
        total_loss = 0
        for name, reward_loss, weighting in reward_losses:
            loss = reward_loss(image, prompt)
            total_loss += loss * weighting
            rewards[name] = loss.item()
        rewards["total"] = total_loss.item()
        total_reward_loss = total_loss.item()
        # 3. the noise-norm regulariser on the whole latent tensor (batch 1: one item)
        if regularize:
            latent_norm = torch.linalg.vector_norm(latents).to(torch.promote_types(latents.dtype, torch.float32))
            log_norm = torch.log(latent_norm)
            regularization = regularization_weight * (0.5 * latent_norm**2 - (latent_dim - 1) * log_norm)
            rewards["norm"] = latent_norm.item()
            total_loss += regularization.to(total_loss.dtype)
        totals.append(total_loss.item())
        seen_rewards.append(rewards)
        if initial_rewards is None:
            initial_rewards = rewards
        # 4. the best iteration: the lowest REWARD loss, strict (the first of equals stays)
        if total_reward_loss < best_loss:
            best_loss, best_image, best_rewards, best_iteration = total_reward_loss, image.detach(), rewards, iteration
        # 5. backward, torch's norm clip over the whole tensor, step; none after the last evaluation
        if iteration != n_iters - 1:
            total_loss.backward()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(latents, grad_clip)))
            optimizer.step()
    return {"best_iteration": best_iteration, "best_image": best_image, "initial_rewards": initial_rewards,
            "best_rewards": best_rewards, "latents": seen_latents, "rewards": seen_rewards, "totals": totals,
            "grad_norms": grad_norms}
