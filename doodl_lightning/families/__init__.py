"""The model families behind the ``Backbone`` interface, and the registry that picks one for a model.

``sd``           SD-1.x/2.x (also Turbo / Lightning), SDXL, LCM and their ControlNet pipelines: ``UNetBackbone``,
                 ``PretrainedBackbone`` (``controlnet``: loading a ``ControlNetModel``, checking it fits its base).
``flow``         SD3 / SD3.5 and FLUX.1, rectified-flow transformers: ``FlowBackbone``, ``PretrainedFlowBackbone``
                 (``flux_layout``: FLUX's 2x2 latent packing, position ids and velocity call).
``flux2``        FLUX.2 klein (distilled 4-step, or base with CFG; Qwen3 text, patchified batch-norm latents):
                 ``Flux2Backbone``, ``PretrainedFlux2Backbone``.
``qwen_image``   Qwen-Image (MMDiT flow transformer, Qwen2.5-VL text, true CFG with norm rescaling, video-style VAE):
                 ``QwenImageBackbone``, ``PretrainedQwenImageBackbone``.
``sana``         SANA (flow, DPM-Solver, true CFG) and SANA-Sprint (sCM 1-4 steps, guidance embedding), Gemma-2 text with
                 the complex human instruction, DC-AE: ``SanaBackbone``, ``SanaSprintBackbone`` (+ ``Pretrained*``).

``REGISTRY`` maps the pipeline class a model's model_index.json names (``_class_name``) to the backbone class that
loads it, as diffusers' ``AUTO_TEXT2IMAGE_PIPELINES_MAPPING`` maps names to pipelines; ``resolve_backbone`` (the
module's ``model:`` key) looks the model up there, so no family flag has to be right. A new family: one file with
its ``Backbone`` subclass and a loading subclass taking the model's path (``Backbone.from_model`` is what the
``model: <path>`` shortcut calls), one ``REGISTRY`` line per pipeline class it serves, and a tiny model of it in
``doodl_lightning.testing.families`` (``TINY_MODELS``, ``TINY_MODEL_OF``): the family contract of
tests/test_families.py (save / load round trip, pipeline parity, dtype, determinism) then runs on it.
"""
from __future__ import annotations

from collections import OrderedDict

from ..backbone import Backbone, pipeline_class_name
from .flow import FlowBackbone, PretrainedFlowBackbone
from .flux2 import Flux2Backbone, PretrainedFlux2Backbone
from .qwen_image import PretrainedQwenImageBackbone, QwenImageBackbone
from .sana import PretrainedSanaBackbone, PretrainedSanaSprintBackbone, SanaBackbone, SanaSprintBackbone
from .sd import PretrainedBackbone, UNetBackbone

__all__ = ["DEFAULT_BACKBONE", "REGISTRY", "FlowBackbone", "PretrainedBackbone", "PretrainedFlowBackbone", "UNetBackbone",
           "Flux2Backbone", "PretrainedFlux2Backbone",
           "PretrainedQwenImageBackbone", "QwenImageBackbone",
           "PretrainedSanaBackbone", "PretrainedSanaSprintBackbone", "SanaBackbone", "SanaSprintBackbone",
           "backbone_class", "resolve_backbone"]

# model_index.json's _class_name -> the backbone class that loads such a model
REGISTRY: OrderedDict[str, type[Backbone]] = OrderedDict([
    ("StableDiffusionPipeline", PretrainedBackbone),
    ("StableDiffusionControlNetPipeline", PretrainedBackbone),
    ("LatentConsistencyModelPipeline", PretrainedBackbone),
    ("StableDiffusionXLPipeline", PretrainedBackbone),
    ("StableDiffusionXLControlNetPipeline", PretrainedBackbone),
    ("StableDiffusion3Pipeline", PretrainedFlowBackbone),
    ("FluxPipeline", PretrainedFlowBackbone),
    ("Flux2KleinPipeline", PretrainedFlux2Backbone),
    ("QwenImagePipeline", PretrainedQwenImageBackbone),
    ("SanaPipeline", PretrainedSanaBackbone),
    ("SanaSprintPipeline", PretrainedSanaSprintBackbone),
])
# any other (or an unreadable) model: read as a UNet pipeline by its components; its loader says what is wrong
DEFAULT_BACKBONE: type[Backbone] = PretrainedBackbone


def backbone_class(model: str, model_config: str | None = None, local_files_only: bool | None = None) -> type[Backbone]:
    """The registered backbone class of a model (a hub id, a diffusers directory, or a single file with its
    ``model_config`` directory), from the pipeline class its model_index.json names."""
    return REGISTRY.get(pipeline_class_name(model, model_config, local_files_only), DEFAULT_BACKBONE)


def resolve_backbone(model: Backbone | str, model_config: str | None = None, local_files_only: bool | None = None,
                     vae_checkpointing: bool = False, controlnet: str | list[str] | None = None) -> Backbone:
    """The module's ``model:`` value as a Backbone: an object as it is, a path or hub id loaded (the shortcut) by the
    class ``REGISTRY`` names for it."""
    if isinstance(model, Backbone):
        if model_config is not None or vae_checkpointing or local_files_only is not None or controlnet is not None:
            raise ValueError("model_config, vae_checkpointing, local_files_only and controlnet go with model: <path or "
                             "id>; for a Backbone object set them in its own init_args")
        return model
    cls = backbone_class(model, model_config, local_files_only)
    return cls.from_model(model, model_config=model_config, local_files_only=local_files_only,
                          vae_checkpointing=vae_checkpointing, controlnet=controlnet)
