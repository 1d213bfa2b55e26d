"""eps(x_t, t) of a diffusers UNet (+ ControlNets, + an IP-Adapter), classifier-free guidance batched into one call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..checks import check_finite
from ..conditioning import Conditioning
from ..precision import module_dtype

Eps = Callable[[Tensor, int], Tensor]  # eps(x_t, t): what every sampler calls; a Denoiser is one


def check_guidance_scale(guidance_scale: float) -> None:
    check_finite(guidance_scale=guidance_scale)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = conditional only, 0 = unconditional only), got {guidance_scale}")


# added-conditioning keys the UNet takes as a list of one tensor per IP-Adapter (diffusers' ``image_embeds``), and
# which the ControlNets never see (the pipelines give them the text conditioning only)
LISTED_ADDED = ("image_embeds",)


@dataclass
class Control:
    """ControlNets' input to every UNet call: the model, one conditioning image per item (N, 3, H, W) in [0, 1] at
    the output size (as diffusers' control-image processor makes it), and the residuals' scale. Several nets
    (diffusers' ``MultiControlNetModel``): images (N, K, 3, H, W), one per net, and one scale per net (or one for
    all), the residuals summed as ``MultiControlNetModel`` sums them."""

    controlnet: torch.nn.Module
    image: Tensor
    scale: float | list[float] = 1.0

    def __getitem__(self, idx) -> "Control":
        return Control(self.controlnet, self.image[idx], self.scale)

    @property
    def several(self) -> bool:
        return type(self.controlnet).__name__ == "MultiControlNetModel"

    def inputs(self, image: Tensor) -> tuple[Tensor | list[Tensor], float | list[float]]:
        """(controlnet_cond, conditioning_scale) as the net takes them: for several nets a list of each, per net."""
        if not self.several:  # one net: its one scale (a list of one from a config is the same)
            return image, float(self.scale[0] if isinstance(self.scale, (list, tuple)) else self.scale)
        scales = self.scale if isinstance(self.scale, (list, tuple)) else [self.scale] * len(self.controlnet.nets)
        return list(image.unbind(1)), [float(s) for s in scales]


class Denoiser:
    """Noise prediction with classifier-free guidance (Ho & Salimans 2022) in ONE batched UNet call.

    ``unet`` is a diffusers ``UNet2DConditionModel`` (text-conditioned: give ``cond`` and, for CFG,
    ``uncond``, as hidden-state tensors or ``Conditioning``s with a family's added embeddings, e.g. SDXL's)
    or ``UNet2DModel`` (unconditional: no embeddings, guidance_scale 1). ``control`` adds a ControlNet's
    residuals to every call (the same image for the conditional and unconditional halves, as diffusers'
    pipelines do); ``timestep_cond`` is an LCM UNet's guidance-scale embedding. An IP-Adapter's image embeddings
    ride in the conditioning's ``added["image_embeds"]`` (the negative image's in ``uncond``), handed to the UNet
    as ``added_cond_kwargs["image_embeds"] = [embeds]``, as diffusers' pipelines do. The latents may be
    float32 while the UNet runs in half precision: inputs are cast to the UNet's dtype and eps is cast
    back, so the sampler's linear algebra stays in the latents' dtype.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        cond: Tensor | Conditioning | None = None,
        uncond: Tensor | Conditioning | None = None,
        guidance_scale: float = 1.0,
        prediction_type: str = "epsilon",
        alphas_cumprod: Tensor | None = None,
        control: Control | None = None,
        timestep_cond: Tensor | None = None,
    ):
        check_guidance_scale(guidance_scale)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be one of 'epsilon', 'v_prediction', got {prediction_type!r}")
        if prediction_type == "v_prediction" and alphas_cumprod is None:
            raise ValueError("v_prediction needs alphas_cumprod (the scheduler's) to convert v to eps")
        if guidance_scale not in (0.0, 1.0) and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={guidance_scale} needs both cond and uncond embeddings")
        self.unet = unet
        self.cond, self.uncond = Conditioning.of(cond), Conditioning.of(uncond)
        self.control, self.timestep_cond = control, timestep_cond
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = prediction_type
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double().cpu()
        self.dtype = module_dtype(unet, torch.float32)
        self.calls = 0  # UNet calls, for honest compute accounting in benchmarks
        self._timesteps: dict = {}

    def _unet(self, x: Tensor, t: Tensor, context: Conditioning | None, control_image: Tensor | None = None) -> Tensor:
        self.calls += 1
        if context is None:
            return self.unet(x, t).sample[:, : x.shape[1]]
        kwargs = {"encoder_hidden_states": context.hidden.to(x.device, self.dtype)}
        added = {k: v.to(x.device, self.dtype) for k, v in context.added.items()}
        if added:
            kwargs["added_cond_kwargs"] = {k: [v] if k in LISTED_ADDED else v for k, v in added.items()}
        if self.timestep_cond is not None:
            kwargs["timestep_cond"] = self.timestep_cond.to(x.device, self.dtype).expand(x.shape[0], -1)
        if self.control is not None:
            net = self.control.controlnet
            cdtype = module_dtype(net, torch.float32)
            cond, scale = self.control.inputs(control_image.to(x.device, cdtype))
            down, mid = net(x.to(cdtype), t, encoder_hidden_states=kwargs["encoder_hidden_states"].to(cdtype),
                            controlnet_cond=cond, conditioning_scale=scale,
                            added_cond_kwargs={k: v.to(cdtype) for k, v in added.items() if k not in LISTED_ADDED}
                            or None, return_dict=False)
            kwargs["down_block_additional_residuals"] = [r.to(self.dtype) for r in down]
            kwargs["mid_block_additional_residual"] = mid.to(self.dtype)
        out = self.unet(x, t, **kwargs).sample
        return out[:, : x.shape[1]]  # drop a learned-variance half if the model has one

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
        image = None if self.control is None else self.control.image
        if image is not None and image.shape[0] not in (1, n):
            raise ValueError(f"{image.shape[0]} control images for {n} latents: give one per item")
        if image is not None:
            image = image.expand(n, *image.shape[1:])
        if self.cond is None and self.uncond is None:
            out = self._unet(xin, t, None)
        elif s == 1.0:
            out = self._unet(xin, t, self.cond.expand(n), image)
        elif s == 0.0:
            out = self._unet(xin, t, self.uncond.expand(n), image)
        else:
            # uncond and cond as one batch: one UNet call per eps, never two
            context = Conditioning.cat([self.uncond.expand(n), self.cond.expand(n)])
            both = None if image is None else torch.cat([image, image])
            out_uncond, out_cond = self._unet(torch.cat([xin, xin]), t, context, both).chunk(2)
            out = out_uncond + s * (out_cond - out_uncond)
        out = out.to(x.dtype)
        if self.prediction_type == "v_prediction":
            # v = sqrt(abar) eps - sqrt(1-abar) x0 and x_t = sqrt(abar) x0 + sqrt(1-abar) eps
            #  =>  eps = sqrt(abar) v + sqrt(1-abar) x_t
            abar = float(self.alphas_cumprod[t_int])
            out = abar**0.5 * out + (1.0 - abar) ** 0.5 * x
        return out
