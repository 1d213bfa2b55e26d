"""Flow-matching transformers (SD3 / FLUX) built from configs with random weights: tests and benchmarks.

``tiny``           a few-hundred-thousand-parameter ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` with
                   16 latent channels (as the real VAEs) and the real models' features (SD3.5's dual attention
                   and RMS q/k norm; FLUX's guidance embedding for ``flux-dev``) for CPU tests.
``sd35-medium``    Stable Diffusion 3.5 Medium's transformer / VAE / scheduler configs.
``flux-dev``       FLUX.1-dev (guidance-distilled, dynamic shifting) and ``flux-schnell`` (timestep-distilled,
                   shift 1): same transformer apart from ``guidance_embeds``, same VAE.

The real configs are the published ``config.json`` / ``scheduler_config.json`` values of the hub repos
(stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell),
as far as they could be checked without the gated repos; see the comment on each. A module built here is
what ``from_pretrained`` builds before loading weights: the right size for speed and memory
measurements (``device='cuda'`` creates the weights on the GPU directly).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

__all__ = [
    "FLOW_ARCHITECTURES", "build_flow_scheduler", "build_flow_transformer", "build_flow_vae", "flow_scheduler_config",
    "flow_transformer_config", "flow_vae_config", "sd3_velocity", "tiny_flux_transformer", "tiny_sd3_transformer",
]

FLOW_ARCHITECTURES = ("tiny-sd3", "tiny-flux-dev", "tiny-flux-schnell", "sd35-medium", "flux-dev", "flux-schnell")

# -- transformers ----------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium transformer/config.json. Checked against diffusers'
# scripts/convert_sd3_to_diffusers.py (SD3.5: dual attention (attn2) on layers 0-12, qk_norm "rms_norm",
# "sd3.5 2b use pos_embed_max_size=384", num_attention_heads = num_layers = 24, caption_projection_dim =
# 24 * 64 = 1536, sample_size 128, patch 2, 16 channels, joint_attention_dim 4096) and against two
# independent copies of the config (the diffusers default pooled_projection_dim 2048 = CLIP-L 768 + CLIP-G 1280).
_SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json (= diffusers' FluxTransformer2DModel defaults, which
# scripts/convert_flux_to_diffusers.py builds: 19 double + 38 single blocks, 24 heads x 128, 64 = 16 latent
# channels x 2x2 packing, rope axes 16/56/56, pooled CLIP-L 768, T5-XXL 4096), guidance_embeds true.
_FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-schnell: the same transformer without the guidance embedding.
_FLUX_SCHNELL = dict(_FLUX_DEV, guidance_embeds=False)

_TINY_SD3 = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
)
_TINY_FLUX = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as FLUX's 16 + 56 + 56 = 128
)

_TRANSFORMER = {
    "tiny-sd3": ("SD3Transformer2DModel", _TINY_SD3),
    "tiny-flux-dev": ("FluxTransformer2DModel", _TINY_FLUX),
    "tiny-flux-schnell": ("FluxTransformer2DModel", dict(_TINY_FLUX, guidance_embeds=False)),
    "sd35-medium": ("SD3Transformer2DModel", _SD35_MEDIUM),
    "flux-dev": ("FluxTransformer2DModel", _FLUX_DEV),
    "flux-schnell": ("FluxTransformer2DModel", _FLUX_SCHNELL),
}

# -- VAEs (16 latent channels, no quant convs) -----------------------------------------------------

_VAE_16 = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)
# SD3/SD3.5 vae/config.json: the SDXL VAE layout with 16 latent channels, scaling_factor 1.5305, shift_factor
# 0.0609 (diffusers' convert_sd3_to_diffusers.py builds exactly this).
_SD3_VAE = dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609)
# FLUX.1 vae/config.json (the "ae.safetensors" autoencoder): same layout, scaling_factor 0.3611, shift_factor
# 0.1159 (diffusers' remote_utils documents these two for Flux).
_FLUX_VAE = dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)
_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
)

_VAE = {
    "tiny-sd3": dict(_TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609),
    "tiny-flux-dev": dict(_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
    "tiny-flux-schnell": dict(_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
    "sd35-medium": _SD3_VAE,
    "flux-dev": _FLUX_VAE,
    "flux-schnell": _FLUX_VAE,
}

# -- schedulers (FlowMatchEulerDiscreteScheduler) --------------------------------------------------

# SD3 / SD3.5 scheduler_config.json: {"num_train_timesteps": 1000, "shift": 3.0} (static shift; written from
# the published file as remembered -- one third-party copy claims use_dynamic_shifting for SD3.5, which
# StableDiffusion3Pipeline would then need mu for; not verifiable here without the gated repo).
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# FLUX.1-dev scheduler_config.json: dynamic (resolution-dependent) shifting, mu from 0.5 at 256 tokens to
# 1.15 at 4096 tokens (several independent copies agree).
_FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# FLUX.1-schnell scheduler_config.json: no shift (as remembered; not verified against the gated repo).
_FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

_SCHEDULER = {
    "tiny-sd3": _SD3_SCHEDULER, "sd35-medium": _SD3_SCHEDULER,
    "tiny-flux-dev": _FLUX_DEV_SCHEDULER, "flux-dev": _FLUX_DEV_SCHEDULER,
    "tiny-flux-schnell": _FLUX_SCHNELL_SCHEDULER, "flux-schnell": _FLUX_SCHNELL_SCHEDULER,
}


def _check(name: str) -> str:
    if name not in FLOW_ARCHITECTURES:
        raise ValueError(f"unknown flow architecture {name!r}; choose one of {', '.join(FLOW_ARCHITECTURES)}")
    return name


def flow_transformer_config(name: str) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of architecture ``name``'s transformer."""
    cls, cfg = _TRANSFORMER[_check(name)]
    return cls, copy.deepcopy(cfg)


def flow_vae_config(name: str) -> dict:
    return copy.deepcopy(_VAE[_check(name)])


def flow_scheduler_config(name: str) -> dict:
    return copy.deepcopy(_SCHEDULER[_check(name)])


def _building(device, seed: int):
    torch.manual_seed(seed)
    return torch.device(device) if device is not None else nullcontext()


def _frozen(module: torch.nn.Module, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def build_flow_transformer(name: str, *, device=None, dtype=torch.float32, seed: int = 0):
    """``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` of architecture ``name``, random weights, frozen."""
    import diffusers

    cls, cfg = flow_transformer_config(name)
    with _building(device, seed):
        model = getattr(diffusers, cls)(**cfg)
    return _frozen(model, dtype)


def build_flow_vae(name: str, *, device=None, dtype=torch.float32, seed: int = 1):
    """``AutoencoderKL`` with 16 latent channels (scaling_factor and shift_factor in its config), random weights."""
    from diffusers import AutoencoderKL

    with _building(device, seed):
        vae = AutoencoderKL(**flow_vae_config(name))
    return _frozen(vae, dtype)


def build_flow_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler_config(name))


def tiny_sd3_transformer(dtype=torch.float32, seed: int = 0):
    """The tiny SD3.5-style transformer (16-channel 8x8 latents, 2x2 patches, dual attention, RMS q/k norm)."""
    return build_flow_transformer("tiny-sd3", dtype=dtype, seed=seed)


def tiny_flux_transformer(dtype=torch.float32, seed: int = 0, guidance_embeds: bool = True):
    """The tiny FLUX-style transformer (packed 16-channel latents; guidance embedding like FLUX.1-dev unless
    ``guidance_embeds=False``, FLUX.1-schnell)."""
    return build_flow_transformer("tiny-flux-dev" if guidance_embeds else "tiny-flux-schnell", dtype=dtype, seed=seed)


def sd3_velocity(transformer, prompt_embeds, pooled_prompt_embeds):
    """velocity(x, t) of an SD3 transformer as StableDiffusion3Pipeline calls it (no CFG): timestep t
    broadcast to the batch, latents (B, 16, H, W) in the transformer's dtype."""
    dtype = next(transformer.parameters()).dtype

    def velocity(x, t):
        timestep = torch.tensor(float(t), dtype=torch.float32, device=x.device).expand(x.shape[0])
        return transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled_prompt_embeds, return_dict=False)[0]

    return velocity
