"""Tiny random adapters in their released layouts: IP-Adapters (h94/IP-Adapter's single weights file + its CLIP image
encoder directory) and several standalone ControlNets for one base, for tests of ``families.ip_adapter`` and of
several ControlNets at once.

``save_tiny_ip_adapter`` writes the exact key layout diffusers' ``IPAdapterMixin.load_ip_adapter`` reads (and the
original IP-Adapter training code saves): ``image_proj.proj.{weight,bias}`` / ``image_proj.norm.{weight,bias}``
(``ImageProjection``: 4 tokens of the UNet's cross-attention width from the CLIP image embedding) and
``ip_adapter.{k}.to_k_ip.weight`` / ``ip_adapter.{k}.to_v_ip.weight`` for the k-th attention processor of the UNet
(the original code numbers attn1, attn2, attn1, ... from 0; the loader reads the cross-attention ones as 1, 3, 5, ...), shaped as the loader's
``_convert_ip_adapter_attn_to_diffusers`` sizes them. Nothing here is read by the core.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["IMAGE_ENCODER_CONFIG", "ip_adapter_state_dict", "save_tiny_controlnets", "save_tiny_image_encoder",
           "save_tiny_ip_adapter"]

# a CLIP ViT at toy size: 32-px images in 8-px patches, a 2-layer tower, an 8-dim projected image embedding
IMAGE_ENCODER_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=8)

# where h94/IP-Adapter keeps each family's adapter: (folder, weights file); the image encoder is folder/image_encoder
LAYOUTS = {"sd15": ("models", "ip-adapter_sd15.safetensors"), "sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors")}


def save_tiny_image_encoder(path, seed: int = 0) -> str:
    """A tiny ``CLIPVisionModelWithProjection`` directory (config.json + model.safetensors), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval().save_pretrained(str(path))
    return str(path)


def _cross_attention_sizes(unet) -> list[tuple[int, int]]:
    """(key k, hidden size) of every cross-attention processor, in ``unet.attn_processors`` order, as diffusers'
    loader walks them: every processor not named ``attn1`` is a cross-attention one, keyed 1, 3, 5, ..."""
    out = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        out.append((2 * len(out) + 1, hidden))
    return out


def ip_adapter_state_dict(unet, image_embed_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights for ``unet`` (flat keys, as the released .safetensors file holds them)."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj.proj.weight": torch.randn(4 * cross, image_embed_dim, generator=gen) * image_embed_dim ** -0.5,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=gen) * 0.1,
        "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=gen),
        "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=gen),
    }
    for k, hidden in _cross_attention_sizes(unet):
        for proj in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{k}.{proj}.weight"] = torch.randn(hidden, cross, generator=gen) * cross ** -0.5
    return sd


def save_tiny_ip_adapter(root, unet, layout: str = "sd15", seed: int = 0) -> str:
    """An IP-Adapter for ``unet`` in h94/IP-Adapter's layout under ``root`` (``models/ip-adapter_sd15.safetensors`` +
    ``models/image_encoder/``; ``layout="sdxl"``: ``sdxl_models/ip-adapter_sdxl.safetensors``): the weights file's path."""
    from safetensors.torch import save_file

    folder, name = LAYOUTS[layout]
    where = Path(root) / folder
    where.mkdir(parents=True, exist_ok=True)
    save_tiny_image_encoder(where / "image_encoder", seed=seed + 1)
    sd = ip_adapter_state_dict(unet, IMAGE_ENCODER_CONFIG["projection_dim"], seed=seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(where / name))
    return str(where / name)


def save_tiny_controlnets(root, base_unet, count: int = 2, seed: int = 11) -> list[str]:
    """``count`` standalone ControlNetModel directories for ``base_unet`` and the tiny VAE (each its own random
    weights), as ``controlnet: [dir, dir]`` loads them."""
    from .families import save_tiny_controlnet

    return [save_tiny_controlnet(Path(root) / f"controlnet_{i}", base_unet, seed=seed + i) for i in range(count)]
