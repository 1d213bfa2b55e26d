"""ControlNet (Zhang et al. 2023) for the UNet families: loading a ``ControlNetModel`` (or several, as diffusers'
``MultiControlNetModel``: one control image and one scale per net, the residuals summed) and checking each was made
for the base model it is given to. The residuals enter each UNet call in ``sampling.Control``."""
from __future__ import annotations

import os
from pathlib import Path

from ..backbone import WEIGHT_SUFFIXES, ModelNotFoundError, complete_weights, hub_offline, naming_bad_weights

__all__ = ["check_controlnet", "controlnet_count", "controlnet_nets", "load_controlnet", "load_controlnets", "several_controlnets"]


def load_controlnet(path: str):
    """A diffusers ControlNetModel from a local directory (config.json + weights) or a hub id."""
    from diffusers import ControlNetModel

    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"controlnet {path} is a directory without config.json: give a diffusers "
                                     "ControlNetModel directory (save_pretrained output)")
        weights = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        with naming_bad_weights(weights), complete_weights():
            return ControlNetModel.from_pretrained(str(p), local_files_only=True)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelNotFoundError(f"controlnet {path!r} not found: no such directory (and not a hub id 'org/name')")
    with complete_weights():  # outside the try: its own refusal is not a missing hub model
        try:
            return ControlNetModel.from_pretrained(path, local_files_only=hub_offline())
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"could not load hub controlnet {path!r} ({type(e).__name__}); on a machine with "
                                     f"internet run `huggingface-cli download {path} --local-dir DIR` and pass DIR") from None


def several_controlnets(nets):
    """Several ControlNets (a list of ``ControlNetModel``s, or diffusers' ``MultiControlNetModel``) as one
    ``MultiControlNetModel``, as diffusers' ControlNet pipelines wrap a list; one net (or None) unchanged."""
    from diffusers import MultiControlNetModel

    if isinstance(nets, (list, tuple)):
        if not nets:
            raise ValueError("controlnet is an empty list: give one ControlNet, or a list of them")
        return nets[0] if len(nets) == 1 else MultiControlNetModel(list(nets))
    return nets


def load_controlnets(paths: str | list[str]):
    """The ``controlnet:`` key: one path or hub id (a ``ControlNetModel``), or a list of them (a ``MultiControlNetModel``
    of the nets in that order: the order of ``control_images`` and of a list of ``controlnet_scale``)."""
    return several_controlnets([load_controlnet(p) for p in paths]) if isinstance(paths, (list, tuple)) \
        else load_controlnet(paths)


def controlnet_nets(controlnet) -> list:
    """The ControlNetModels of a model's ``controlnet`` (one, the nets of a MultiControlNetModel, none for None)."""
    if controlnet is None:
        return []
    return list(controlnet.nets) if type(controlnet).__name__ == "MultiControlNetModel" else [controlnet]


def controlnet_count(controlnet) -> int:
    """How many ControlNets a model's ``controlnet`` holds (0 for None): one control image and one scale each."""
    return len(controlnet_nets(controlnet))


def check_controlnet(controlnet, unet, vae_scale_factor: int) -> None:
    """One line when a ControlNet (each of several) was made for another base model than this UNet (and its VAE)."""
    nets = controlnet_nets(controlnet)
    if len(nets) > 1:
        for net in nets:
            check_controlnet(net, unet, vae_scale_factor)
        return
    c, u = controlnet.config, unet.config

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type", "in_channels"):
        if norm(c.get(key)) != norm(u.get(key)):
            raise ValueError(f"the ControlNet does not match the base model: its {key} is {c.get(key)}, the UNet's is "
                             f"{u.get(key)}; use a ControlNet trained for this base (SD-1.x ControlNets for SD-1.x, "
                             "SDXL ones for SDXL)")
    factor = 2 ** (len(c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if factor != vae_scale_factor:
        raise ValueError(f"the ControlNet's image encoder downsamples by {factor}, the VAE by {vae_scale_factor}: "
                         "use a ControlNet trained for this base model")
