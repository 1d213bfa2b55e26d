"""Tiny diffusion models built from configs: random weights, no download."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

CROSS_DIM = 16


def tiny_unet(dtype=torch.float32, seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return unet.to(dtype).eval().requires_grad_(False)


def tiny_unconditional_unet(dtype=torch.float32, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    return unet.to(dtype).eval().requires_grad_(False)


def sd_scheduler(**kw) -> DDIMScheduler:
    """The SD-1.x noise schedule (scaled linear betas, leading spacing, offset 1)."""
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def save_tiny_pipeline(path, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A tiny random Stable-Diffusion-layout pipeline saved with save_pretrained (loaded back like SD-1.5)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from doodl_lightning.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, max_position_embeddings=77))
    unet = tiny_unet(seed=seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(prediction_type=prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return str(path)
