"""Qwen-Image built from configs with random weights: a tiny ``QwenImagePipeline`` for CPU tests, the real configs.

``tiny``      a ``QwenImageTransformer2DModel`` of one or two double-stream blocks over 16-channel latents packed
              2x2 (64 inputs, as the real one), a two-layer Qwen2.5-VL text encoder (``Qwen2_5_VLForConditionalGeneration``
              with its vision tower at toy size: the pipeline's text encoder class is the whole VLM), an offline
              byte-level BPE ``Qwen2Tokenizer``, a two-level ``AutoencoderKLQwenImage`` (the video-style causal VAE,
              x2 downsampling, the released latents_mean / latents_std) and the released scheduler config.
``qwen-image`` Qwen/Qwen-Image's transformer / VAE / scheduler configs (20 B parameters in the transformer alone, and
              a 7 B text encoder), for the sizes a GPU script needs: ``build_qwen_image_backbone`` (no text encoder;
              ``qwen-image`` or ``tiny-qwen-image``, ``layers`` for smoke runs).

The tiny tokenizer spells every word of the pipeline's prompt template as one token, as the real Qwen2 vocabulary
does, so the template's system prefix is exactly the 34 tokens ``QwenImagePipeline`` drops
(``prompt_template_encode_start_idx``): the tiny model's text states are those of the prompt and the template's
closing tokens, like the real model's. Any other text falls back to bytes, so every prompt tokenises.

The real configs: transformer/config.json and vae/config.json are diffusers' ``QwenImageTransformer2DModel`` and
``AutoencoderKLQwenImage`` defaults (what the hub repo holds); scheduler/scheduler_config.json as published for
Qwen/Qwen-Image (dynamic exponential shift from 0.5 at 256 tokens to 0.9 at 8192, shift_terminal 0.02), checked
against several independent copies of it.
"""
from __future__ import annotations

import copy

import torch

__all__ = ["QWEN_IMAGE_ARCHITECTURES", "QWEN_IMAGE_SCHEDULER", "QWEN_TEMPLATE_WORDS", "build_qwen_image_backbone",
           "build_qwen_image_scheduler", "qwen_image_transformer_config", "qwen_image_vae_config",
           "save_tiny_qwen_image_pipeline", "tiny_qwen_text_encoder", "tiny_qwen_tokenizer"]

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False, time_shift_type="exponential",
    use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
)
# Qwen/Qwen-Image transformer/config.json (= diffusers' defaults: 60 double-stream blocks, 24 heads x 128,
# Qwen2.5-VL-7B's 3584-wide states, rope axes 16/56/56)
_QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                               num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                               axes_dims_rope=(16, 56, 56))
_TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                         axes_dims_rope=(4, 6, 6))  # sums to attention_head_dim, as 16 + 56 + 56 = 128
# x2 spatial downsampling (one level), 16 latent channels, the released latents_mean / latents_std (the defaults)
_TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False])
# Qwen/Qwen-Image vae/config.json: diffusers 0.42's AutoencoderKLQwenImage defaults written out (the Wan-2.1-style
# causal video VAE: base_dim 96, dim_mult 1-2-4-4, 2 res blocks, no attention scales, temporal downsampling only in
# the last two levels, x8 spatially, 16 latent channels); latents_mean / latents_std stay the class defaults. As the
# module docstring says, the hub file is said to equal the defaults; not verifiable offline.
_QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)
QWEN_IMAGE_ARCHITECTURES = ("tiny-qwen-image", "qwen-image")

# the words of QwenImagePipeline.prompt_template_encode (each one token in Qwen's vocabulary), the template's chat
# roles, and the tests' prompt words; "Ġ" is byte-level BPE's leading space
QWEN_TEMPLATE_WORDS = ("system user assistant Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture "
                       "Ġquantity Ġtext Ġspatial Ġrelationships Ġof Ġobjects Ġand Ġbackground").split()
_PROMPT_WORDS = "a Ġa Ġred Ġblue Ġgreen Ġcircle Ġsquare Ġtriangle Ġphoto Ġdog Ġcat Ġblurry".split()
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_image_transformer_config(name: str = "tiny", layers: int | None = None) -> dict:
    """The transformer's config: ``tiny`` (= ``tiny-qwen-image``) or ``qwen-image`` (Qwen/Qwen-Image); ``layers``: the
    first ``layers`` double-stream blocks only (smoke runs)."""
    configs = {"tiny": _TINY_TRANSFORMER, "tiny-qwen-image": _TINY_TRANSFORMER, "qwen-image": _QWEN_IMAGE_TRANSFORMER}
    if name not in configs:
        raise ValueError(f"unknown Qwen-Image architecture {name!r}; choose one of {', '.join(configs)}")
    cfg = copy.deepcopy(configs[name])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        cfg["num_layers"] = min(layers, cfg["num_layers"])
    return cfg


def qwen_image_vae_config(name: str = "tiny") -> dict:
    """``AutoencoderKLQwenImage`` kwargs: ``tiny`` (= ``tiny-qwen-image``) or ``qwen-image``."""
    configs = {"tiny": _TINY_VAE, "tiny-qwen-image": _TINY_VAE, "qwen-image": _QWEN_IMAGE_VAE}
    if name not in configs:
        raise ValueError(f"unknown Qwen-Image architecture {name!r}; choose one of {', '.join(configs)}")
    return copy.deepcopy(configs[name])


def build_qwen_image_backbone(name: str, *, device=None, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    """A ``QwenImageBackbone`` of architecture ``name`` (random weights, no text encoder: conditioning is text states
    with their mask), the released scheduler; created on ``device`` in ``dtype`` (Qwen-Image's 20 B parameters are
    82 GB in float32: build it in bfloat16 on an 80 GB GPU)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from ..families.qwen_image import QwenImageBackbone
    from .flow_models import creating

    with creating(device, dtype):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**qwen_image_transformer_config(name, layers))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(**qwen_image_vae_config(name))
    return QwenImageBackbone(transformer.eval(), vae.eval(), build_qwen_image_scheduler())


def build_qwen_image_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE's 256 base symbols), as Qwen2's vocabulary
    holds them: printable bytes stand for themselves, the rest are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}
    return [table[b] for b in range(256)]


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer, ``<|im_start|>`` / ``<|im_end|>`` /
    ``<|endoftext|>`` special tokens) built offline: the 256 byte symbols, and for each word of
    ``QWEN_TEMPLATE_WORDS`` and a few prompt words the merges that spell it left to right, so each is one token."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges: list[tuple[str, str]] = []
    for word in (*QWEN_TEMPLATE_WORDS, *_PROMPT_WORDS):
        for k in range(2, len(word) + 1):
            pair = (word[:k - 1], word[k - 1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(word[:k], len(vocab))
    for token in _SPECIAL:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def tiny_qwen_text_encoder(vocab_size: int, hidden: int = 16, seed: int = 0, pad_token_id: int | None = None):
    """A two-layer Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, the class Qwen-Image's pipeline loads) with
    ``hidden``-wide states, grouped-query attention and multimodal RoPE sections like Qwen2.5-VL-7B's (16 / 24 / 24
    of its 64 rotary pairs; here 1 / 1 / 2 of 4), and a one-block vision tower (unused by text prompts)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                bos_token_id=None, eos_token_id=None, pad_token_id=pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def save_tiny_qwen_image_pipeline(path, seed: int = 0, layers: int = 1) -> str:
    """A tiny ``QwenImagePipeline`` directory in the released layout (transformer, vae, text_encoder, tokenizer,
    scheduler, model_index.json): 16 x 16 px images are 8 x 8 latents, 16 packed tokens."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**dict(_TINY_TRANSFORMER, num_layers=layers)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**_TINY_VAE).eval()
    text = tiny_qwen_text_encoder(len(tok), _TINY_TRANSFORMER["joint_attention_dim"], seed + 2, tok.pad_token_id)
    pipe = QwenImagePipeline(scheduler=build_qwen_image_scheduler(), vae=vae, text_encoder=text, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(str(path))
    return str(path)
