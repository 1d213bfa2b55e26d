"""eps(x_t, t) of a diffusers UNet, classifier-free guidance batched into one call."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..precision import module_dtype

Eps = Callable[[Tensor, int], Tensor]  # eps(x_t, t): what every sampler calls; a Denoiser is one


def check_guidance_scale(guidance_scale: float) -> None:
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = conditional only, 0 = unconditional only), got {guidance_scale}")


class Denoiser:
    """Noise prediction with classifier-free guidance (Ho & Salimans 2022) in ONE batched UNet call.

    ``unet`` is a diffusers ``UNet2DConditionModel`` (text-conditioned: give ``cond`` and, for CFG,
    ``uncond``) or ``UNet2DModel`` (unconditional: no embeddings, guidance_scale 1). The latents may be
    float32 while the UNet runs in half precision: inputs are cast to the UNet's dtype and eps is cast
    back, so the sampler's linear algebra stays in the latents' dtype.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        cond: Tensor | None = None,
        uncond: Tensor | None = None,
        guidance_scale: float = 1.0,
        prediction_type: str = "epsilon",
        alphas_cumprod: Tensor | None = None,
    ):
        check_guidance_scale(guidance_scale)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be one of 'epsilon', 'v_prediction', got {prediction_type!r}")
        if prediction_type == "v_prediction" and alphas_cumprod is None:
            raise ValueError("v_prediction needs alphas_cumprod (the scheduler's) to convert v to eps")
        if guidance_scale not in (0.0, 1.0) and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={guidance_scale} needs both cond and uncond embeddings")
        self.unet = unet
        self.cond, self.uncond = cond, uncond
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = prediction_type
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double().cpu()
        self.dtype = module_dtype(unet, torch.float32)
        self.calls = 0  # UNet calls, for honest compute accounting in benchmarks
        self._timesteps: dict = {}

    def _unet(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        self.calls += 1
        if context is None:
            out = self.unet(x, t).sample
        else:
            out = self.unet(x, t, encoder_hidden_states=context.to(x.device, self.dtype)).sample
        return out[:, : x.shape[1]]  # drop a learned-variance half if the model has one

    @staticmethod
    def _expand(context: Tensor, n: int) -> Tensor:
        return context.expand(n, *context.shape[1:]) if context.shape[0] == 1 else context

    def _timestep(self, t: int, device: torch.device) -> Tensor:
        # one device tensor per timestep, made once: no blocking host-to-device copy per UNet call
        key = (t, device)
        if key not in self._timesteps:
            self._timesteps[key] = torch.tensor(t, device=device)
        return self._timesteps[key]

    def __call__(self, x: Tensor, t: int | Tensor) -> Tensor:
        n = x.shape[0]
        t_int = int(t)
        t = self._timestep(t_int, x.device)
        xin = x.to(self.dtype)
        s = self.guidance_scale
        if self.cond is None and self.uncond is None:
            out = self._unet(xin, t, None)
        elif s == 1.0:
            out = self._unet(xin, t, self._expand(self.cond, n))
        elif s == 0.0:
            out = self._unet(xin, t, self._expand(self.uncond, n))
        else:
            # uncond and cond as one batch: one UNet call per eps, never two
            context = torch.cat([self._expand(self.uncond, n), self._expand(self.cond, n)])
            out_uncond, out_cond = self._unet(torch.cat([xin, xin]), t, context).chunk(2)
            out = out_uncond + s * (out_cond - out_uncond)
        out = out.to(x.dtype)
        if self.prediction_type == "v_prediction":
            # v = sqrt(abar) eps - sqrt(1-abar) x0 and x_t = sqrt(abar) x0 + sqrt(1-abar) eps
            #  =>  eps = sqrt(abar) v + sqrt(1-abar) x_t
            abar = float(self.alphas_cumprod[t_int])
            out = abar**0.5 * out + (1.0 - abar) ** 0.5 * x
        return out
