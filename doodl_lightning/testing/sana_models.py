"""SANA and SANA-Sprint pipelines built from configs with random weights, saved in the released layouts: tests.

A released SANA repository (Efficient-Large-Model/Sana_1600M_1024px_diffusers, .../Sana_Sprint_1.6B_1024px_diffusers)
holds a ``SanaTransformer2DModel`` (linear-attention DiT, patch 1, 32 latent channels), a Gemma-2 text encoder
(``Gemma2Model``, its last hidden state is the caption) with its ``GemmaTokenizer``, the deep-compression autoencoder
``AutoencoderDC`` (32x down-sampling, scaling_factor only) and its scheduler: SANA a ``DPMSolverMultistepScheduler``
on flow sigmas (flow_shift 3, flow_prediction), SANA-Sprint an ``SCMScheduler`` (TrigFlow, sigma_data 0.5) with a
guidance-embedding transformer. The tiny ones here have the same classes and features at toy size: a 4x AE (32 px
images, 8x8 latents; the pipelines want sides that are multiples of 32), 8 latent channels, a one-layer Gemma-2 with
a character-level tokenizer built offline. Loading them back goes through exactly the code path of a downloaded one.
"""
from __future__ import annotations

import copy
import string

import torch

__all__ = ["SANA_ARCHITECTURES", "SANA_DPM_SCHEDULER", "build_sana_backbone", "sana_transformer_config",
           "sana_vae_config", "save_tiny_sana_pipeline", "save_tiny_sana_sprint_pipeline", "tiny_gemma_tokenizer"]

LATENT_CHANNELS = 8
CAPTION_DIM = 16  # the tiny Gemma-2's hidden size = the transformer's caption_channels

# Sana_1600M_1024px_diffusers scheduler/scheduler_config.json, as remembered (not verifiable offline): DPM-Solver++
# 2M (midpoint) on flow sigmas shifted by 3, flow-prediction model output, zero final sigma, lower order at the end
SANA_DPM_SCHEDULER = dict(
    num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero",
    lower_order_final=True, euler_at_final=False, timestep_spacing="linspace", steps_offset=0,
    beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
)
# Sana_Sprint_1.6B_1024px_diffusers scheduler: SCMScheduler's defaults (TrigFlow, sigma_data 0.5)
SANA_SCM_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)

# -- the released sizes (random weights for benchmarks) ---------------------------------------------------------------

# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json. Sources: diffusers' scripts/
# convert_sana_to_diffusers.py, model type SanaMS_1600M_P1_D20 at image_size 1024 (70 linear-attention heads x 32 =
# 2240 wide, 20 blocks, cross-attention 20 heads x 112 = 2240, caption_channels 2304 = Gemma-2-2B's width, mlp_ratio
# 2.5, sample_size 1024 // 32 = 32, patch 1, 32 channels in and out, no bias in attention, norm without affine,
# eps 1e-6, interpolation_scale None at 1024 = no position embedding); the same numbers are the defaults (and the
# docstring) of diffusers 0.42's SanaTransformer2DModel. qk_norm None, timestep_scale 1.0: the defaults (the script
# sets qk_norm only for SANA-1.5 and SANA-Sprint), not checked against the hub file (offline).
_SANA_1600M = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
    interpolation_scale=None,
)
# Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers transformer/config.json: SanaSprint_1600M_P1_D20 in the same
# script = the 1600M transformer + guidance_embeds=True and qk_norm "rms_norm_across_heads" (its q/k norms in both
# attentions). guidance_embeds_scale 0.1: diffusers' default, which the script does not override and SanaSprintPipeline
# multiplies the guidance by; not verifiable offline against the hub file.
_SANA_SPRINT_1600M = dict(_SANA_1600M, guidance_embeds=True, guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads")
# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (the vae/ of both repos; SANA-Sprint's may be the sana-1.1 decoder
# fine-tune, the same architecture): diffusers' scripts/convert_dcae_to_diffusers.py, convert_ae(): 6 stages
# 128-256-512-512-1024-1024, ResBlock x3 then EfficientViTBlock x3 with multi-scale (5) linear attention, encoder
# 2-2-2-3-3-3 / decoder 3 x 6 layers, conv downsampling, interpolate upsampling, RMS norm + SiLU in the decoder,
# 32 latent channels, scaling_factor 0.41407, attention_head_dim 32 (the default).
_SANA_DC_AE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
# the tiny ones of the saved test pipelines (4x AE, 8 channels; see _tiny_transformer / _tiny_dc_ae)
_TINY_SANA = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                  caption_channels=CAPTION_DIM, mlp_ratio=2.5, sample_size=8, patch_size=1)
_TINY_SANA_SPRINT = dict(_TINY_SANA, guidance_embeds=True, guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads")
_TINY_DC_AE = dict(in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=4,
                   encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                   encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                   encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                   decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)

# name -> (transformer, autoencoder, sprint)
_ARCH = {
    "tiny-sana": (_TINY_SANA, _TINY_DC_AE, False), "tiny-sana-sprint": (_TINY_SANA_SPRINT, _TINY_DC_AE, True),
    "sana-1600m": (_SANA_1600M, _SANA_DC_AE, False), "sana-sprint": (_SANA_SPRINT_1600M, _SANA_DC_AE, True),
}
SANA_ARCHITECTURES = tuple(_ARCH)


def _arch(name: str):
    if name not in _ARCH:
        raise ValueError(f"unknown SANA architecture {name!r}; choose one of {', '.join(_ARCH)}")
    return _ARCH[name]


def sana_transformer_config(name: str, layers: int | None = None) -> dict:
    """``SanaTransformer2DModel`` kwargs of architecture ``name``; ``layers``: the first ``layers`` blocks only."""
    cfg = copy.deepcopy(_arch(name)[0])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        cfg["num_layers"] = min(layers, cfg["num_layers"])
    return cfg


def sana_vae_config(name: str) -> dict:
    """``AutoencoderDC`` kwargs of architecture ``name``."""
    return copy.deepcopy(_arch(name)[1])


def build_sana_backbone(name: str, *, device=None, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    """A ``SanaBackbone`` (``SanaSprintBackbone`` for the Sprint architectures) of random weights, without a text
    encoder, its scheduler the released one (DPM-Solver++ on flow sigmas / SCM); created on ``device`` in ``dtype``."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel, SCMScheduler

    from ..families.sana import SanaBackbone, SanaSprintBackbone
    from .flow_models import creating

    sprint = _arch(name)[2]
    with creating(device, dtype):
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(**sana_transformer_config(name, layers))
        torch.manual_seed(seed + 1)
        vae = AutoencoderDC(**sana_vae_config(name))
    if sprint:
        return SanaSprintBackbone(transformer.eval(), vae.eval(), SCMScheduler(**SANA_SCM_SCHEDULER),
                                  complex_human_instruction=[])
    return SanaBackbone(transformer.eval(), vae.eval(), DPMSolverMultistepScheduler(**SANA_DPM_SCHEDULER),
                        complex_human_instruction=[])


def tiny_gemma_tokenizer():
    """A ``GemmaTokenizer`` (BPE with byte fallback, ``<bos>`` prepended, ``▁`` for spaces) built offline: one token per
    lower-case letter, digit, punctuation mark and ``▁``, every byte as ``<0xNN>`` for the rest (so any prompt and the
    pipelines' long complex human instruction tokenise), no merges; saved as tokenizer.json."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for tok in [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + list(string.ascii_letters + string.digits + string.punctuation):
        vocab.setdefault(tok, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def _tiny_gemma2(vocab_size: int, seed: int):
    """A one-layer Gemma-2 (``Gemma2Model``, as the pipelines' text_encoder) with ``CAPTION_DIM`` outputs."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=CAPTION_DIM, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0)
    return Gemma2Model(cfg).eval()


def _tiny_dc_ae(seed: int):
    """A 4x deep-compression autoencoder (``AutoencoderDC``: ResBlocks, then an EfficientViT block with multi-scale
    linear attention, as the released f32c32 one at its deep stages), scaling_factor of Sana's."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(**sana_vae_config("tiny-sana")).eval()


def _tiny_transformer(seed: int, sprint: bool):
    """A two-block ``SanaTransformer2DModel`` over 8x8 latents (sample_size 8 = 32 px / 4); SANA-Sprint's adds the
    guidance embedding and RMS q/k norm across heads, as its released config."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(**sana_transformer_config("tiny-sana-sprint" if sprint else "tiny-sana")).eval()


def save_tiny_sana_pipeline(path, seed: int = 0) -> str:
    """A tiny ``SanaPipeline`` directory: transformer, Gemma-2 + tokenizer, DC-AE, DPM-Solver++ flow scheduler."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    tok = tiny_gemma_tokenizer()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=_tiny_gemma2(len(tok), seed + 2), vae=_tiny_dc_ae(seed + 1),
                        transformer=_tiny_transformer(seed, sprint=False),
                        scheduler=DPMSolverMultistepScheduler(**SANA_DPM_SCHEDULER))
    pipe.save_pretrained(str(path))
    return str(path)


def save_tiny_sana_sprint_pipeline(path, seed: int = 0) -> str:
    """A tiny ``SanaSprintPipeline`` directory: guidance-embedding transformer, Gemma-2 + tokenizer, DC-AE, SCM
    scheduler."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    tok = tiny_gemma_tokenizer()
    pipe = SanaSprintPipeline(tokenizer=tok, text_encoder=_tiny_gemma2(len(tok), seed + 2), vae=_tiny_dc_ae(seed + 1),
                              transformer=_tiny_transformer(seed, sprint=True),
                              scheduler=SCMScheduler(**SANA_SCM_SCHEDULER))
    pipe.save_pretrained(str(path))
    return str(path)
