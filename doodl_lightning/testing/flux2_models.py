"""FLUX.2 klein (``Flux2KleinPipeline``) built from configs with random weights: tests and benchmarks.

``save_tiny_flux2_klein_pipeline``  a whole tiny pipeline in the released layout: a ``Flux2Transformer2DModel``
                                    (one double- and one single-stream block, 4-axis RoPE, no guidance embedding),
                                    a 28-layer ``Qwen3ForCausalLM`` of width 8 (the pipeline reads hidden states
                                    9, 18 and 27, so it needs that depth; 3 x 8 = the transformer's joint width
                                    24), an offline Qwen2 tokenizer with Qwen3's chat template, the
                                    ``AutoencoderKLFlux2`` (32 latent channels, the 2x2 patchify's batch norm
                                    with random running statistics, so the denormalisation is really tested) and
                                    FLUX.2's flow-matching scheduler. ``distilled``: the 4-step klein (no CFG) or
                                    the klein base (CFG, ``is_distilled`` false in model_index.json).
``FLUX2_KLEIN_4B``                  black-forest-labs/FLUX.2-klein-4B's transformer config, for size and speed
                                    measurements (``build_flux2_transformer``; meta device for counting).
``build_flux2_backbone``            a ``Flux2Backbone`` without text encoder, random weights: ``flux2-klein`` (the 4B
                                    transformer + the released VAE) or ``tiny-flux2-klein``; ``layers`` for smoke runs.

The real configs are written as remembered from the published config.json files (not verifiable here without
the hub; the 4B transformer's numbers are those of diffusers' scripts/convert_flux2_to_diffusers.py, model type
klein-4b, and the VAE is diffusers' AutoencoderKLFlux2 defaults, what that script converts into); the tiny ones keep
their structure: 128 = 32 latent channels x the 2x2 patchify, RoPE axes summing
to the head width, joint width = 3 x the text encoder's hidden size.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

__all__ = ["FLUX2_ARCHITECTURES", "FLUX2_KLEIN_4B", "FLUX2_SCHEDULER", "QWEN3_CHAT_TEMPLATE", "build_flux2_backbone",
           "build_flux2_transformer", "flux2_transformer_config", "save_tiny_flux2_klein_pipeline", "tiny_qwen2_tokenizer"]

# black-forest-labs/FLUX.2-klein-4B transformer/config.json (as remembered): 5 double + 20 single blocks,
# 24 heads x 128, 128 = 32 VAE channels x 2x2, RoPE axes 4 x 32, joint width 3 x Qwen3-4B's 2560 = 7680,
# no guidance embedding (klein is guidance-distilled into the weights). Every number here equals diffusers'
# scripts/convert_flux2_to_diffusers.py's "klein-4b" config (checked); the hub file itself is not reachable offline.
FLUX2_KLEIN_4B = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
_TINY_FLUX2 = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
# FLUX.2 scheduler_config.json (as remembered): dynamic shifting with the exponential time shift; the klein
# pipeline hands it mu from compute_empirical_mu (token count and steps), so base/max_shift are not read.
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
_TINY_FLUX2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    sample_size=16, patch_size=(2, 2),
)
# Qwen3's chat template for what the klein pipeline asks (one user message, add_generation_prompt, enable_thinking
# false): the same text the released template renders, "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
# <think>\n\n</think>\n\n"
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# black-forest-labs/FLUX.2-klein-4B vae/config.json: diffusers' AutoencoderKLFlux2 defaults (convert_flux2_to_diffusers.py
# builds ``AutoencoderKLFlux2()`` and loads the released flux2-vae into it): 128-256-512-512, 2 layers per block, 32
# latent channels, quant convs, 2x2 patchify with batch norm (eps 1e-4); written out so a diffusers default change
# shows. The batch norm's running statistics stay at their init (mean 0, var 1): no effect on timings.
FLUX2_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=32, norm_num_groups=32,
    sample_size=1024, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, batch_norm_eps=1e-4,
    batch_norm_momentum=0.1, patch_size=(2, 2),
)
FLUX2_ARCHITECTURES = ("tiny-flux2-klein", "flux2-klein")


def flux2_transformer_config(name: str, layers: int | None = None) -> dict:
    """``Flux2Transformer2DModel`` kwargs of ``tiny-flux2-klein`` or ``flux2-klein`` (FLUX.2-klein-4B); ``layers``: a
    shortened copy for smoke runs, ``layers`` double-stream and 4 x ``layers`` single-stream blocks (klein 4B's 5 : 20)."""
    configs = {"tiny-flux2-klein": _TINY_FLUX2, "flux2-klein": FLUX2_KLEIN_4B}
    if name not in configs:
        raise ValueError(f"unknown FLUX.2 architecture {name!r}; choose one of {', '.join(configs)}")
    cfg = copy.deepcopy(configs[name])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        cfg.update(num_layers=min(layers, cfg["num_layers"]), num_single_layers=min(4 * layers, cfg["num_single_layers"]))
    return cfg


def build_flux2_backbone(name: str, *, device=None, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    """A distilled-klein ``Flux2Backbone`` of architecture ``name`` (random weights, no text encoder: conditioning is
    (N, L, joint_attention_dim) states), its scheduler FLUX.2's; created on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from ..families.flux2 import Flux2Backbone
    from .flow_models import creating

    if name == "tiny-flux2-klein":
        vae = _tiny_vae(seed + 1)
        if device is not None or dtype != torch.float32:
            vae = vae.to(device=device, dtype=dtype)
    with creating(device, dtype):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**flux2_transformer_config(name, layers))
        if name != "tiny-flux2-klein":
            torch.manual_seed(seed + 1)
            vae = AutoencoderKLFlux2(**FLUX2_VAE)
    return Flux2Backbone(transformer.eval(), vae.eval(), FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER),
                         is_distilled=True)


def build_flux2_transformer(config: dict | None = None, *, device=None, dtype=torch.float32, seed: int = 0):
    """A ``Flux2Transformer2DModel`` of ``config`` (default the tiny one; ``FLUX2_KLEIN_4B`` the real size), random
    weights, frozen (``device='meta'`` counts parameters without memory)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        model = Flux2Transformer2DModel(**copy.deepcopy(config or _TINY_FLUX2))
    if device != "meta":
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def tiny_qwen2_tokenizer():
    """A Qwen2 byte-level BPE tokenizer built offline: the 256 byte symbols (no merges, so any text tokenises byte by
    byte), Qwen's special tokens (``<|endoftext|>`` the pad token) and Qwen3's chat template; 261 ids."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {s: i for i, s in enumerate(_QWEN_SPECIAL)}
    vocab.update({c: len(_QWEN_SPECIAL) + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], additional_special_tokens=list(_QWEN_SPECIAL[1:]))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _tiny_qwen3(vocab_size: int, seed: int):
    """A Qwen3ForCausalLM of width 8 and 28 layers (the pipeline stacks hidden states 9, 18 and 27), tied embeddings
    as Qwen3-4B."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=28,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    return Qwen3ForCausalLM(cfg).eval()


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**_TINY_FLUX2_VAE)
    # the released VAE's batch norm holds the latents' statistics; random ones here, so that a decoder skipping the
    # denormalisation (or an encoder skipping the normalisation) fails parity
    gen = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.num_features, generator=gen))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features, generator=gen))
    return vae.eval()


def save_tiny_flux2_klein_pipeline(path, seed: int = 0, distilled: bool = True) -> str:
    """A tiny ``Flux2KleinPipeline`` directory (see the module's docstring); ``distilled=False``: the klein base,
    whose pipeline runs classifier-free guidance above scale 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    tok = tiny_qwen2_tokenizer()
    pipe = Flux2KleinPipeline(
        transformer=build_flux2_transformer(seed=seed), vae=_tiny_vae(seed + 1),
        text_encoder=_tiny_qwen3(len(tok), seed + 2), tokenizer=tok,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER), is_distilled=distilled)
    pipe.save_pretrained(str(path))
    return str(path)
