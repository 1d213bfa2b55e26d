"""Tiny random pipelines of every family, saved with ``save_pretrained`` in the released layouts.

Each is what the real model's repository holds, at toy size: SD-1.x with a chosen scheduler (DDIM, or
Euler on trailing timesteps as SD-Turbo ships), SDXL (two text towers, text_time micro-conditioning),
LCM (a UNet with the guidance-scale embedding, LCMScheduler) and ControlNet pipelines; SD3 and FLUX.1
(``flow_models``). Loading them back goes through exactly the code path of a downloaded model.

``TINY_MODELS`` names one of each family and variant, ``TINY_MODEL_OF`` the one for each pipeline class of
``doodl_lightning.families.REGISTRY`` (the family contract of tests/test_families.py runs on those and checks that
none is missing); ``tiny_model`` saves one once per process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import architectures as A
from . import flow_models as FM
from .flux2_models import save_tiny_flux2_klein_pipeline
from .qwen_image_models import save_tiny_qwen_image_pipeline
from .sana_models import save_tiny_sana_pipeline, save_tiny_sana_sprint_pipeline
from .tiny import save_tiny_pipeline

__all__ = ["SCHEDULERS", "TINY_MODELS", "TINY_MODEL_OF", "save_tiny_controlnet", "save_tiny_lcm_pipeline", "save_tiny_sd_pipeline",
           "save_tiny_sdxl_pipeline", "tiny_model", "tiny_scheduler"]

SCHEDULERS = ("ddim", "euler", "euler_trailing", "lcm")


def tiny_scheduler(kind: str):
    """SD-1.x's noise schedule under the scheduler a released model ships: ``ddim``, ``euler`` (leading
    spacing, SDXL-base), ``euler_trailing`` (SD-Turbo / SDXL-Turbo / Lightning), ``lcm``."""
    import diffusers

    cfg = dict(A.SD1_SCHEDULER_CONFIG)
    if kind == "ddim":
        return diffusers.DDIMScheduler(**cfg)
    if kind == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(dict(cfg, timestep_spacing="leading"))
    if kind == "euler_trailing":
        return diffusers.EulerDiscreteScheduler.from_config(dict(cfg, timestep_spacing="trailing"))
    if kind == "lcm":
        return diffusers.LCMScheduler.from_config(dict(cfg, original_inference_steps=50, timestep_scaling=10.0))
    raise ValueError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def _tokenizer():
    from ..shapes.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def _sd_parts(seed: int, unet_overrides: dict | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import CROSS_DIM

    torch.manual_seed(seed)
    vae = AutoencoderKL(**A.vae_config("tiny"))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, max_position_embeddings=77))
    unet = UNet2DConditionModel(**{**A.unet_config("tiny"), **(unet_overrides or {})})
    return vae.eval(), text.eval(), unet.eval()


def save_tiny_sd_pipeline(path, scheduler: str = "ddim", seed: int = 0, controlnet: bool = False) -> str:
    """A tiny SD-1.x-layout pipeline (``controlnet``: a StableDiffusionControlNetPipeline with its own)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    vae, text, unet = _sd_parts(seed)
    kw = dict(vae=vae, text_encoder=text, tokenizer=_tokenizer(), unet=unet, scheduler=tiny_scheduler(scheduler),
              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet:
        pipe = StableDiffusionControlNetPipeline(controlnet=A.build_controlnet(unet, seed=seed + 1, vae_scale_factor=2), **kw)
    else:
        pipe = StableDiffusionPipeline(**kw)
    pipe.save_pretrained(str(path))
    return str(path)


def save_tiny_lcm_pipeline(path, seed: int = 0) -> str:
    """A tiny LatentConsistencyModelPipeline: its UNet takes the guidance-scale embedding (time_cond_proj_dim)."""
    from diffusers import LatentConsistencyModelPipeline

    vae, text, unet = _sd_parts(seed, {"time_cond_proj_dim": 8})
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(), unet=unet,
                                          scheduler=tiny_scheduler("lcm"), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return str(path)


def save_tiny_sdxl_pipeline(path, scheduler: str = "euler", seed: int = 0, controlnet: bool = False) -> str:
    """A tiny SDXL-layout pipeline: CLIP-L-like + CLIP-G-like (with projection) text towers, text_time UNet,
    force_upcast VAE (``controlnet``: a StableDiffusionXLControlNetPipeline with its own)."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    parts = A.build_components("tiny-sdxl", seed=seed, parts=("unet", "vae", "text_encoder", "text_encoder_2"))
    kw = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
              tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=parts["unet"], scheduler=tiny_scheduler(scheduler))
    if controlnet:
        pipe = StableDiffusionXLControlNetPipeline(controlnet=A.build_controlnet(parts["unet"], seed=seed + 1, vae_scale_factor=2),
                                                   add_watermarker=False, **kw)
    else:
        pipe = StableDiffusionXLPipeline(add_watermarker=False, **kw)
    pipe.save_pretrained(str(path))
    return str(path)


def save_tiny_controlnet(path, base_unet, seed: int = 1) -> str:
    """A ControlNetModel directory for ``base_unet`` and the tiny VAE (loaded with ``controlnet: <path>``)."""
    A.build_controlnet(base_unet, seed=seed, vae_scale_factor=2).save_pretrained(str(path))
    return str(Path(path))


# a tiny model of every family and variant, by name: (path) -> the saved directory
TINY_MODELS: dict[str, Callable[[Path], str]] = {
    "sd": save_tiny_pipeline,  # StableDiffusionPipeline, DDIM (tests/conftest.py's tiny_pipeline_dir)
    "sd-turbo": lambda p: save_tiny_sd_pipeline(p, "euler_trailing"),
    "sdxl": lambda p: save_tiny_sdxl_pipeline(p, "euler"),  # StableDiffusionXLPipeline
    "sdxl-ddim": lambda p: save_tiny_sdxl_pipeline(p, "ddim"),
    "sdxl-turbo": lambda p: save_tiny_sdxl_pipeline(p, "euler_trailing"),
    "lcm": save_tiny_lcm_pipeline,  # LatentConsistencyModelPipeline
    "controlnet-sd": lambda p: save_tiny_sd_pipeline(p, "ddim", controlnet=True),  # StableDiffusionControlNetPipeline
    "controlnet-sdxl": lambda p: save_tiny_sdxl_pipeline(p, "ddim", controlnet=True),
    "sd3": FM.save_tiny_sd3_pipeline,  # StableDiffusion3Pipeline
    "flux-dev": FM.save_tiny_flux_pipeline,  # FluxPipeline
    "flux-schnell": lambda p: FM.save_tiny_flux_pipeline(p, seed=7, schnell=True),
    "flux2-klein": save_tiny_flux2_klein_pipeline,  # Flux2KleinPipeline (distilled: no CFG)
    "qwen-image": save_tiny_qwen_image_pipeline,  # QwenImagePipeline
    "sana": save_tiny_sana_pipeline,  # SanaPipeline (DPM-Solver++ on flow sigmas, true CFG)
    "sana-sprint": save_tiny_sana_sprint_pipeline,  # SanaSprintPipeline (SCM, guidance embedding)
}

# the tiny model of each pipeline class doodl_lightning.families.REGISTRY serves (one line per registry line): the
# family contract's cases run on these
TINY_MODEL_OF: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionControlNetPipeline": "controlnet-sd",
    "LatentConsistencyModelPipeline": "lcm",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "controlnet-sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux-dev",
    "Flux2KleinPipeline": "flux2-klein",
    "QwenImagePipeline": "qwen-image",
    "SanaPipeline": "sana",
    "SanaSprintPipeline": "sana-sprint",
}

_SAVED: dict[str, str] = {}


def tiny_model(name: str, root: str | Path) -> str:
    """``TINY_MODELS[name]`` saved under ``root`` the first time it is asked for in this process (test modules share
    it through a session-wide ``root``); the directory is only read afterwards."""
    if name not in _SAVED or not Path(_SAVED[name]).is_dir():
        _SAVED[name] = TINY_MODELS[name](Path(root) / name.replace("-", "_"))
    return _SAVED[name]
