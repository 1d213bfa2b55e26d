"""Model components built from architecture configs with random weights: no download, no checkpoint.

``tiny``  a few-thousand-parameter UNet / VAE / text encoder for tests and CPU benchmarks.
``sd15``  the REAL Stable Diffusion 1.5 architecture (same configs as the released checkpoint:
          UNet 320/640/1280/1280, VAE 128/256/512/512, CLIP ViT-L/14 text tower, scaled-linear
          schedule), random weights: the right size for speed and memory measurements.
``sd21``  the SD-2.1 (768-v) architecture: linear-projection attention with 64-dim heads, 1024-dim
          OpenCLIP-H text tower, v-prediction.
``sd-turbo``    SD-Turbo: SD-2.1-base (512 px, epsilon) with Euler on trailing timesteps, no CFG.
``tiny-sdxl``   a tiny SDXL-layout UNet (text_time added conditioning, two text towers) for tests.
``sdxl``        the REAL SDXL-base architecture (UNet 320/640/1280 with 1/2/10 transformer layers, 2048-dim
                context = CLIP-L 768 + OpenCLIP-bigG 1280, text_time micro-conditioning, 1024 px; VAE with
                scaling 0.13025 and force_upcast), Euler with leading spacing as released.
``sdxl-turbo``  SDXL-Turbo: the SDXL architecture at 512 px, Euler on trailing timesteps, no CFG.

Everything here is a plain config dict handed to the diffusers / transformers constructors, so a
component built here is exactly what ``from_pretrained`` would build before loading weights. With
``device='cuda'`` the weights are created on the GPU directly (no host-side init of 1B parameters).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

# Stable Diffusion 1.x's noise schedule is spelt once, in the shapes world that trains with it (the core
# never imports testing/, so the constant cannot live here); re-exported for the architectures below.
from ..shapes.schedule import SD1_SCHEDULER_CONFIG

__all__ = [
    "ARCHITECTURES", "DEFAULT_RESOLUTION", "SD1_SCHEDULER_CONFIG", "build_components", "build_scheduler",
    "build_controlnet", "build_text_encoder", "build_text_encoder_2", "build_unet", "text_encoder_2_config", "build_vae", "latent_size", "parameter_count", "scheduler_config",
    "text_encoder_config", "unet_config", "vae_config", "vae_scale_factor",
]

ARCHITECTURES = ("tiny", "sd15", "sd21", "sd-turbo", "tiny-sdxl", "sdxl", "sdxl-turbo")
DEFAULT_RESOLUTION = {"tiny": 16, "sd15": 512, "sd21": 768, "sd-turbo": 512, "tiny-sdxl": 16, "sdxl": 1024,
                      "sdxl-turbo": 512}  # pixels

_UNET = {
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=768, attention_head_dim=8,
    ),
}
_UNET["sd21"] = dict(_UNET["sd15"], sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True, upcast_attention=True)
_UNET["sd-turbo"] = dict(_UNET["sd21"], sample_size=64, upcast_attention=False)
# SDXL's text_time conditioning: the pooled text embedding (projection_dim) + 6 micro-conditioning numbers,
# each a sinusoidal embedding of addition_time_embed_dim
_UNET["tiny-sdxl"] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
    transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=16 + 6 * 4,
)
_UNET["sdxl"] = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
_UNET["sdxl-turbo"] = dict(_UNET["sdxl"], sample_size=64)

_VAE = {
    "tiny": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, scaling_factor=0.18215,
    ),
    "sd15": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    ),
}
_VAE["sd21"] = dict(_VAE["sd15"], sample_size=768)
_VAE["sd-turbo"] = _VAE["sd15"]
_VAE["tiny-sdxl"] = dict(_VAE["tiny"], scaling_factor=0.13025, force_upcast=True)
_VAE["sdxl"] = dict(_VAE["sd15"], sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_VAE["sdxl-turbo"] = dict(_VAE["sdxl"], sample_size=512)

_TEXT = {
    "tiny": dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
                 bos_token_id=998, eos_token_id=999, pad_token_id=1),
    "sd15": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sd21": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1),
}

_TEXT["sd-turbo"] = _TEXT["sd21"]
_TEXT["tiny-sdxl"] = dict(_TEXT["tiny"], vocab_size=49408, bos_token_id=0, eos_token_id=2)  # + a second, below
_TEXT["sdxl"] = _TEXT["sdxl-turbo"] = dict(_TEXT["sd15"])  # CLIP ViT-L/14; the second tower is _TEXT_2's
_TEXT_2 = {  # SDXL's second text tower (CLIPTextModelWithProjection): its pooled projection feeds text_time
    "tiny-sdxl": dict(_TEXT["tiny-sdxl"], projection_dim=16, hidden_act="gelu"),
    "sdxl": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
_TEXT_2["sdxl-turbo"] = _TEXT_2["sdxl"]

_SCHEDULER = {
    "tiny": ("DDIMScheduler", SD1_SCHEDULER_CONFIG),
    "sd15": ("PNDMScheduler", dict(SD1_SCHEDULER_CONFIG, skip_prk_steps=True)),
    "sd21": ("DDIMScheduler", dict(SD1_SCHEDULER_CONFIG, prediction_type="v_prediction")),
    # the released Turbo / SDXL configs: Euler; trailing timesteps for the one-step distillations
    "sd-turbo": ("EulerDiscreteScheduler", dict(SD1_SCHEDULER_CONFIG, timestep_spacing="trailing")),
    "tiny-sdxl": ("EulerDiscreteScheduler", dict(SD1_SCHEDULER_CONFIG, timestep_spacing="leading")),
    "sdxl": ("EulerDiscreteScheduler", dict(SD1_SCHEDULER_CONFIG, timestep_spacing="leading")),
    "sdxl-turbo": ("EulerDiscreteScheduler", dict(SD1_SCHEDULER_CONFIG, timestep_spacing="trailing")),
}


def _check(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def unet_config(name: str) -> dict:
    return copy.deepcopy(_UNET[_check(name)])


def vae_config(name: str) -> dict:
    return copy.deepcopy(_VAE[_check(name)])


def text_encoder_config(name: str) -> dict:
    return copy.deepcopy(_TEXT[_check(name)])


def text_encoder_2_config(name: str) -> dict | None:
    """The second text tower of an SDXL-layout architecture (None for one-tower ones)."""
    return copy.deepcopy(_TEXT_2.get(_check(name)))


def scheduler_config(name: str) -> tuple[str, dict]:
    cls, cfg = _SCHEDULER[_check(name)]
    return cls, copy.deepcopy(cfg)


def vae_scale_factor(name: str) -> int:
    return 2 ** (len(_VAE[_check(name)]["block_out_channels"]) - 1)


def latent_size(name: str, resolution: int | None = None) -> int:
    """Latent side length for an image of ``resolution`` pixels (default: the architecture's own)."""
    res = DEFAULT_RESOLUTION[_check(name)] if resolution is None else int(resolution)
    f = vae_scale_factor(name)
    if res % f:
        raise ValueError(f"resolution {res} is not a multiple of the VAE's scale factor {f} for {name!r}")
    return res // f


def _building(device, seed: int):
    torch.manual_seed(seed)
    return torch.device(device) if device is not None else nullcontext()


def _frozen(module: torch.nn.Module, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def build_unet(name: str, *, device=None, dtype=torch.float32, seed: int = 0):
    """``UNet2DConditionModel`` of architecture ``name``, random weights (seeded), frozen, eval mode."""
    from diffusers import UNet2DConditionModel

    with _building(device, seed):
        unet = UNet2DConditionModel(**unet_config(name))
    return _frozen(unet, dtype)


def build_vae(name: str, *, device=None, dtype=torch.float32, seed: int = 1):
    """``AutoencoderKL`` of architecture ``name`` (scaling_factor in its config), random weights."""
    from diffusers import AutoencoderKL

    with _building(device, seed):
        vae = AutoencoderKL(**vae_config(name))
    return _frozen(vae, dtype)


def build_text_encoder(name: str, *, device=None, dtype=torch.float32, seed: int = 2):
    """``CLIPTextModel`` of architecture ``name``, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with _building(device, seed):
        model = CLIPTextModel(CLIPTextConfig(**text_encoder_config(name)))
    return _frozen(model, dtype)


def build_text_encoder_2(name: str, *, device=None, dtype=torch.float32, seed: int = 3):
    """SDXL's second text tower, ``CLIPTextModelWithProjection``, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = text_encoder_2_config(name)
    if cfg is None:
        raise ValueError(f"architecture {name!r} has one text tower")
    with _building(device, seed):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    return _frozen(model, dtype)


def build_controlnet(unet, *, seed: int = 4, vae_scale_factor: int = 8):
    """A ``ControlNetModel`` for ``unet``'s base (diffusers' ``from_unet``: the encoder half copied, zero
    convolutions), its zero convolutions made random so the residuals are not zero in tests. Its image
    encoder halves the control image log2(``vae_scale_factor``) times, down to the latents' size."""
    from diffusers import ControlNetModel

    downs = vae_scale_factor.bit_length() - 1
    channels = (16, 32, 96, 256)[: downs + 1] if downs <= 3 else None
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "conv_out" in name or "controlnet_mid_block" in name or "controlnet_down_blocks" in name:
                p.normal_(0, 0.1)
    return _frozen(net, next(unet.parameters()).dtype)


def build_scheduler(name: str):
    import diffusers

    cls, cfg = scheduler_config(name)
    return getattr(diffusers, cls).from_config(cfg)


def build_components(name: str, *, device=None, dtype=torch.float32, seed: int = 0,
                     parts=("unet", "vae", "text_encoder", "scheduler")) -> dict:
    """The named parts of architecture ``name`` (each from its own seed derived from ``seed``)."""
    builders = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
                "text_encoder_2": build_text_encoder_2}
    out = {}
    for k, part in enumerate(parts):
        if part == "scheduler":
            out[part] = build_scheduler(name)
        elif part in builders:
            out[part] = builders[part](name, device=device, dtype=dtype, seed=seed * 10 + k)
        else:
            raise ValueError(f"unknown part {part!r}; choose from unet, vae, text_encoder, text_encoder_2, scheduler")
    return out


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
