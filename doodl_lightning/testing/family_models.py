"""The newer families' random-weight models by name, for benchmarks: SANA / SANA-Sprint, FLUX.2 klein, Qwen-Image.

Each name is built through its family's own ``Backbone`` class (``SanaBackbone``, ``SanaSprintBackbone``,
``Flux2Backbone``, ``QwenImageBackbone``) from the configs written beside that family's tiny pipeline
(``sana_models``, ``flux2_models``, ``qwen_image_models``; the source of every number is given there), without a text
encoder: ``random_conditioning`` draws what the encoder would hand the transformer, at its shape.

    sana-1600m         SANA 1600M 1024px (DPM-Solver++ flow sampler ``flow_dpm``, true CFG)
    sana-sprint        SANA-Sprint 1.6B 1024px (sCM sampler ``scm``, guidance embedding)
    flux2-klein        FLUX.2 klein 4B (distilled: one conditional call, ``flow``)
    qwen-image         Qwen-Image (20 B; true CFG with norm rescaling, ``flow``)
    tiny-*             each one's tiny counterpart (``TINY``), the architecture of the tests' saved pipelines

``layers`` shortens a transformer for smoke runs (SANA / Qwen-Image: the first N blocks; FLUX.2: N double-stream and
4N single-stream blocks).
"""
from __future__ import annotations

import torch

from . import flux2_models, qwen_image_models, sana_models
from .flow_models import creating  # noqa: F401 - re-exported

__all__ = ["FAMILY_ARCHITECTURES", "FAMILY_DEFAULT_RESOLUTION", "FAMILY_DEFAULT_SAMPLERS", "TINY", "build_family_backbone",
           "creating", "family_parameter_count", "family_transformer_config", "random_conditioning"]

FAMILY_ARCHITECTURES = (*sana_models.SANA_ARCHITECTURES, *flux2_models.FLUX2_ARCHITECTURES,
                        *qwen_image_models.QWEN_IMAGE_ARCHITECTURES)
# pixels: the pipelines' native sides (SANA: transformer sample_size 32 x the AE's 32; the others 128 x 8)
FAMILY_DEFAULT_RESOLUTION = {"tiny-sana": 32, "tiny-sana-sprint": 32, "sana-1600m": 1024, "sana-sprint": 1024,
                             "tiny-flux2-klein": 32, "flux2-klein": 1024, "tiny-qwen-image": 16, "qwen-image": 1024}
# each pipeline's own sampler (the backbones' default_sampler)
FAMILY_DEFAULT_SAMPLERS = {"tiny-sana": ["flow_dpm"], "sana-1600m": ["flow_dpm"], "tiny-sana-sprint": ["scm"],
                           "sana-sprint": ["scm"], "tiny-flux2-klein": ["flow"], "flux2-klein": ["flow"],
                           "tiny-qwen-image": ["flow"], "qwen-image": ["flow"]}
TINY = {"sana-1600m": "tiny-sana", "sana-sprint": "tiny-sana-sprint", "flux2-klein": "tiny-flux2-klein",
        "qwen-image": "tiny-qwen-image"}


def _family(name: str) -> str:
    for family, names in (("sana", sana_models.SANA_ARCHITECTURES), ("flux2", flux2_models.FLUX2_ARCHITECTURES),
                          ("qwen-image", qwen_image_models.QWEN_IMAGE_ARCHITECTURES)):
        if name in names:
            return family
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(FAMILY_ARCHITECTURES)}")


def family_transformer_config(name: str, layers: int | None = None) -> tuple[str, dict]:
    """(diffusers class name, kwargs) of architecture ``name``'s transformer (``layers``: shortened)."""
    family = _family(name)
    if family == "sana":
        return "SanaTransformer2DModel", sana_models.sana_transformer_config(name, layers)
    if family == "flux2":
        return "Flux2Transformer2DModel", flux2_models.flux2_transformer_config(name, layers)
    return "QwenImageTransformer2DModel", qwen_image_models.qwen_image_transformer_config(name, layers)


def family_parameter_count(name: str, layers: int | None = None) -> int:
    """Parameters + buffers of architecture ``name``'s transformer, counted on the meta device (no memory)."""
    import diffusers

    cls, cfg = family_transformer_config(name, layers)
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**cfg)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def build_family_backbone(name: str, *, device=None, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    """The frozen backbone of architecture ``name`` (its family's class), random weights, no text encoder."""
    builder = {"sana": sana_models.build_sana_backbone, "flux2": flux2_models.build_flux2_backbone,
               "qwen-image": qwen_image_models.build_qwen_image_backbone}[_family(name)]
    return builder(name, device=device, dtype=dtype, seed=seed, layers=layers)


# real tokens of the benchmark's prompt / negative prompt (token counts as estimated for "a photograph of an astronaut
# riding a horse" and "", not tokenised here: the real tokenizers are not available offline)
PROMPT_TOKENS, NEGATIVE_TOKENS = 12, 0
QWEN_TEMPLATE_TAIL = 5  # the template's tokens after the prompt that QwenImagePipeline keeps (<|im_end|> \n ...)


def random_conditioning(name: str, backbone, seed: int = 0):
    """(cond, uncond) ``Conditioning``s of the shapes the family's text encoder hands its transformer, unit-normal states
    from ``seed + 123`` (CPU, float32):

    - SANA / SANA-Sprint: Gemma-2's caption (1, 300, caption_channels) with its attention mask (the pipelines keep
      <bos> + the last 299 positions: the prompt's tokens, then padding), as ``SanaBackbone.encode_prompts``;
    - FLUX.2 klein: Qwen3's stacked states (1, 512, joint_attention_dim), every position kept (no mask), as
      ``Flux2Backbone.encode_prompts``;
    - Qwen-Image: Qwen2.5-VL's states (1, max_sequence_length, joint_attention_dim), zero past the prompt's real tokens
      and masked there, as ``QwenImageBackbone.encode_prompts`` (the velocity trims what no row uses).
    """
    from ..conditioning import Conditioning

    gen = torch.Generator().manual_seed(seed + 123)
    family = _family(name)
    cfg = backbone.transformer.config
    if family == "flux2":
        length = backbone.max_sequence_length
        return tuple(Conditioning(torch.randn((1, length, cfg.joint_attention_dim), generator=gen)) for _ in range(2))
    if family == "sana":
        from ..families.sana import MASK

        length, width = backbone.max_sequence_length, cfg.caption_channels
        real = (1 + PROMPT_TOKENS, 1 + NEGATIVE_TOKENS)  # <bos> + the prompt (the negative "": <bos> alone)
    else:
        from ..families.qwen_image import MASK

        length, width = backbone.max_sequence_length, cfg.joint_attention_dim
        real = (PROMPT_TOKENS + QWEN_TEMPLATE_TAIL, NEGATIVE_TOKENS + QWEN_TEMPLATE_TAIL)
    out = []
    for n in real:
        mask = torch.zeros((1, length), dtype=torch.long)
        mask[:, :n] = 1
        hidden = torch.randn((1, length, width), generator=gen)
        if family == "qwen-image":
            hidden = hidden * mask[..., None]  # encode_prompts pads with zeros
        out.append(Conditioning(hidden, {MASK: mask}))
    return tuple(out)
