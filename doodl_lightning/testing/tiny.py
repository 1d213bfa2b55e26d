"""Tiny diffusion and open_clip models for tests and CPU benchmarks: random weights, no download.

The conditional UNet is ``architectures``' "tiny" one and the scheduler its SD-1.x schedule; the saved
pipeline has Stable Diffusion 1.x's layout (loaded back by exactly the SD-1.5 code path) with the full
CLIP tokenizer; the open_clip model is a config JSON registered like a real one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import architectures as A

__all__ = ["CROSS_DIM", "TINY_CLIP_CONFIG", "save_tiny_clip", "save_tiny_pipeline", "sd_scheduler", "tiny_unet",
           "tiny_unconditional_unet", "write_tiny_clip_config"]

CROSS_DIM = A.unet_config("tiny")["cross_attention_dim"]  # text-embedding width the tiny UNet attends to

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size must cover open_clip's BPE tokenizer (49408 ids); the rest is tiny.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_unet(dtype=torch.float32, seed: int = 0):
    """``architectures``' tiny ``UNet2DConditionModel`` (8x8 latents), seeded random weights, frozen."""
    return A.build_unet("tiny", dtype=dtype, seed=seed)


def tiny_unconditional_unet(dtype=torch.float32, seed: int = 0):
    """A tiny ``UNet2DModel`` (no text conditioning, 8x8 latents), seeded random weights, frozen."""
    from diffusers import UNet2DModel

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


def sd_scheduler(**kw):
    """A ``DDIMScheduler`` with the SD-1.x noise schedule (scaled linear betas, leading spacing, offset 1);
    ``kw`` overrides config entries (e.g. ``prediction_type``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**A.SD1_SCHEDULER_CONFIG, **kw})


def save_tiny_pipeline(path, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A tiny random Stable-Diffusion-layout pipeline saved with save_pretrained (loaded back like SD-1.5)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..shapes.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(**A.vae_config("tiny"))
    # the full CLIP vocabulary (the tokenizer is SD-1.x's), otherwise tiny
    text = CLIPTextModel(CLIPTextConfig(hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, max_position_embeddings=77))
    unet = tiny_unet(seed=seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(prediction_type=prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return str(path)


def write_tiny_clip_config(folder: str | Path, name: str = "tiny_clip_test", **vision_overrides) -> Path:
    """Write an open_clip model-config JSON named ``<name>.json`` (open_clip keys configs by file stem)."""
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["vision_cfg"].update(vision_overrides)
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def save_tiny_clip(config_path: str | Path, out_path: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Build the config's model with seeded random weights and save its state dict (.safetensors or torch.save)."""
    import open_clip

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(Path(config_path).stem, pretrained=None)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out_path = Path(out_path)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out_path))
    else:
        torch.save(state, out_path)
    return state
