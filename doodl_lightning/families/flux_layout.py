"""FLUX's latent layout: 2x2 patches packed into a token sequence, their position ids, and the velocity call.

FLUX.1's transformer sees latents (B, 16, H, W) as (B, (H/2)(W/2), 64) tokens (each 2x2 patch's 16 channels
flattened channel-major), position ids (row, column) per token and zero ids for the text tokens;
``timestep`` is sigma (the pipeline's t / 1000) and FLUX.1-dev adds a guidance embedding; FluxPipeline's true CFG
(``true_cfg_scale``) adds the negative prompt's velocity. The samplers stay
in the unpacked (B, 16, H, W) space -- packing is a permutation, so an Euler step commutes with it -- and
:class:`FluxVelocity` packs on the way in and unpacks on the way out.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FluxVelocity", "latent_image_ids", "pack_latents", "text_ids", "unpack_latents"]


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {height}x{width}")


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C), as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    _check_even(h, w)
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """(B, (H/2)(W/2), 4C) -> (B, C, H, W) for latent size H x W; FluxPipeline._unpack_latents takes the
    pixel size and the VAE factor instead (height = pixel_height // vae_scale_factor)."""
    b, n, c4 = packed.shape
    _check_even(height, width)
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not fit a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids ((H/2)(W/2), 3) of the packed tokens of an H x W latent: (0, row, column), as
    FluxPipeline._prepare_latent_image_ids(batch, H // 2, W // 2, ...)."""
    _check_even(height, width)
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> Tensor:
    """The text tokens' ids (seq_len, 3): all zero (FluxPipeline.encode_prompt)."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


class FluxVelocity:
    """velocity(x, t) of a ``FluxTransformer2DModel`` on unpacked latents x (B, 16, H, W), called as FluxPipeline
    calls it: hidden states packed, ``timestep = t / 1000`` in the model dtype, ``guidance`` = ``guidance_scale``
    for a guidance-distilled transformer (FLUX.1-dev; ignored for FLUX.1-schnell).

    ``prompt_embeds`` (B or 1, L, 4096) and ``pooled_prompt_embeds`` (B or 1, 768) are the T5 / CLIP
    outputs; they are broadcast to the batch of x. True CFG (FluxPipeline's ``true_cfg_scale`` > 1 with a negative
    prompt): v = v_n + s (v_c - v_n), v_n the velocity of ``negative_prompt_embeds`` / ``negative_pooled_prompt_
    embeds`` with the same guidance embedding; the pipeline's two calls batched into one (rows: cond, negative),
    as CFG everywhere here. Half-precision velocities are widened to float32 before the combination.
    """

    def __init__(self, transformer, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor, guidance_scale: float = 3.5,
                 negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
                 true_cfg_scale: float = 1.0):
        self.transformer = transformer
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        self.guidance_scale = float(guidance_scale)
        self.true_cfg_scale = float(true_cfg_scale)
        if self.true_cfg_scale > 1 and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            raise ValueError(f"true_cfg_scale={true_cfg_scale} needs the negative prompt's embeddings "
                             "(negative_prompt_embeds and negative_pooled_prompt_embeds)")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                             f"{tuple(prompt_embeds.shape)} must have the same length and width (one max_sequence_length)")
        self.negative_prompt_embeds, self.negative_pooled_prompt_embeds = negative_prompt_embeds, negative_pooled_prompt_embeds
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def _call(self, x: Tensor, t: float, cond: Tensor, pooled: Tensor, h: int, w: int) -> Tensor:
        b, dtype, device = x.shape[0], self.dtype, x.device
        hidden = pack_latents(x).to(dtype)
        # FluxPipeline: timestep = t.expand(B).to(latents.dtype) / 1000 (t a float32 scheduler timestep)
        timestep = torch.tensor(float(t), dtype=torch.float32, device=device).expand(b).to(dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=device, dtype=torch.float32).expand(b)
        out = self.transformer(  # hidden states positionally: a forward hook (the compute meter) sees the rows
            hidden, timestep=timestep, guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=cond.to(dtype),
            txt_ids=text_ids(cond.shape[1], device, dtype), img_ids=latent_image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        self.calls += 1
        return unpack_latents(out, h, w)

    def __call__(self, x: Tensor, t: float) -> Tensor:
        b, _, h, w = x.shape
        cond = self.prompt_embeds.expand(b, -1, -1)
        pooled = self.pooled_prompt_embeds.expand(b, -1)
        if self.true_cfg_scale <= 1:
            return self._call(x, t, cond, pooled, h, w)
        neg = self.negative_prompt_embeds.to(cond.dtype).expand(b, -1, -1)
        neg_pooled = self.negative_pooled_prompt_embeds.to(pooled.dtype).expand(b, -1)
        v = self._call(torch.cat([x, x]), t, torch.cat([cond, neg]), torch.cat([pooled, neg_pooled]), h, w)
        wide = torch.promote_types(x.dtype, torch.float32)
        v_cond, v_neg = v.to(wide).chunk(2)
        # FluxPipeline: noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        return v_neg + self.true_cfg_scale * (v_cond - v_neg)
