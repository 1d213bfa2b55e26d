"""IP-Adapter (Ye et al. 2023, arXiv 2308.06721) for the UNet families: a reference image's CLIP embedding as added
conditioning, read by decoupled cross-attention processors beside the text's.

Loaded with diffusers' own ``IPAdapterMixin.load_ip_adapter`` onto the pipeline the backbone is built from (its
image projection becomes ``unet.encoder_hid_proj``, its key / value projections the cross-attention processors, its
CLIP image encoder the pipeline's ``image_encoder``), the scale set with ``set_ip_adapter_scale``; the reference
image is encoded as ``StableDiffusionPipeline.encode_image`` / ``prepare_ip_adapter_image_embeds`` encode it (the
negative embedding: zeros, or for the hidden-state adapters the zero image encoded). The embeddings enter every UNet
call through ``Conditioning.added["image_embeds"]`` (``sampling.Denoiser``). The released layout is h94/IP-Adapter's:
``models/ip-adapter_sd15.safetensors`` with its CLIP image encoder in ``models/image_encoder/``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from ..backbone import WEIGHT_SUFFIXES, ModelNotFoundError, complete_weights, naming_bad_weights
from ..checks import check_finite

__all__ = ["adapter_file", "check_ip_adapter", "load_ip_adapter", "load_reference_image", "reference_embeddings", "uses_hidden_states"]


def adapter_file(path: str) -> Path:
    """The IP-Adapter weights file ``path`` names: the file itself, or the one weights file of a directory; one line
    when there is none, several, or no ``image_encoder/`` beside it."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        if len(files) != 1:
            names = ", ".join(f.name for f in files) or "none"
            raise ModelNotFoundError(f"ip_adapter {path} is a directory with {len(files)} weights files ({names}): give "
                                     "the adapter's weights file itself, e.g. models/ip-adapter_sd15.safetensors")
        p = files[0]
    elif not p.is_file():
        raise ModelNotFoundError(f"ip_adapter {path} does not exist: give an IP-Adapter weights file in its released "
                                 "layout (e.g. IP-Adapter/models/ip-adapter_sd15.safetensors with models/image_encoder/)")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"ip_adapter {path} is not a weights file: give a .safetensors (or .bin) IP-Adapter file")
    if not (p.parent / "image_encoder" / "config.json").is_file():
        raise ModelNotFoundError(f"ip_adapter {p} has no image_encoder/ (config.json + weights) beside it: give the "
                                 "adapter in its released layout (models/ip-adapter_sd15.safetensors with "
                                 "models/image_encoder/)")
    return p


def check_ip_adapter(ip_adapter: str | None, image: str | None, scale: float) -> None:
    """One line for IP-Adapter settings that cannot work (one without the other, a missing file or image, a scale
    that is not a number), before any model loads."""
    check_finite(ip_adapter_scale=scale)
    if ip_adapter is None:
        raise ValueError("ip_adapter_image given but no IP-Adapter: add ip_adapter: <models/ip-adapter_*.safetensors>")
    if image is None:
        raise ValueError("an IP-Adapter needs its reference image: add ip_adapter_image: <PNG or JPEG>")
    adapter_file(ip_adapter)
    load_reference_image(image)


def load_ip_adapter(pipe, path: str, scale: float) -> None:
    """Load the IP-Adapter at ``path`` onto ``pipe`` with diffusers' loader (local files only, the image encoder
    beside the weights file) and set its scale; one line when the file does not fit the pipeline's UNet."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise ValueError(f"{type(pipe).__name__} takes no IP-Adapter: use an SD-1.x/2.x or SDXL pipeline")
    file = adapter_file(path)
    try:
        with naming_bad_weights([file]), complete_weights():
            pipe.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name, image_encoder_folder="image_encoder",
                                 local_files_only=True, low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (KeyError, RuntimeError) as e:  # a missing key or a shape of another base model, deep in the loader
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"IP-Adapter file {file} does not fit this model's UNet ({first[:200]}): use an IP-Adapter "
                         "trained for this base (ip-adapter_sd15 for SD-1.x, ip-adapter_sdxl for SDXL)") from None
    pipe.set_ip_adapter_scale(scale)


def load_reference_image(path: str):
    """The IP-Adapter's reference image, as the PIL RGB image a pipeline's ``ip_adapter_image`` takes."""
    from PIL import Image

    if not Path(os.path.expanduser(path)).is_file():
        raise FileNotFoundError(f"ip_adapter_image {path} does not exist: give a PNG or JPEG reference image")
    try:
        return Image.open(os.path.expanduser(path)).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"ip_adapter_image {path} is not a readable image ({e}): give a PNG or JPEG file") from None


def uses_hidden_states(unet) -> bool:
    """Whether the UNet's (first) IP-Adapter reads the image encoder's penultimate hidden states (the Plus / Full
    adapters) rather than its projected embedding (``ImageProjection``): ``prepare_ip_adapter_image_embeds``' test."""
    from diffusers.models.embeddings import ImageProjection

    return not isinstance(unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)


@torch.no_grad()
def reference_embeddings(image_encoder, pixel_values: Tensor, hidden_states: bool) -> tuple[Tensor, Tensor]:
    """(the image's embedding, the negative one), each (1, 1, D) or (1, 1, L, D): ``encode_image`` then
    ``prepare_ip_adapter_image_embeds`` (``[None, :]``: one image per prompt) of diffusers' SD / SDXL pipelines."""
    dtype = next(image_encoder.parameters()).dtype
    image = pixel_values.to(device=image_encoder.device, dtype=dtype)
    if hidden_states:
        embeds = image_encoder(image, output_hidden_states=True).hidden_states[-2]
        negative = image_encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
    else:
        embeds = image_encoder(image).image_embeds
        negative = torch.zeros_like(embeds)  # the pipelines' unconditional image embedding
    return embeds[None, :], negative[None, :]
