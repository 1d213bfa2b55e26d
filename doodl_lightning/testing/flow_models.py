"""Flow-matching transformers (SD3 / FLUX) built from configs with random weights: tests and benchmarks.

``tiny``           a few-hundred-thousand-parameter ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` with
                   16 latent channels (as the real VAEs) and the real models' features (SD3.5's dual attention
                   and RMS q/k norm; FLUX's guidance embedding for ``flux-dev``) for CPU tests.
``sd35-medium``    Stable Diffusion 3.5 Medium's transformer / VAE / scheduler configs.
``flux-dev``       FLUX.1-dev (guidance-distilled, dynamic shifting) and ``flux-schnell`` (timestep-distilled,
                   shift 1): same transformer apart from ``guidance_embeds``, same VAE.

The real configs are the published ``config.json`` / ``scheduler_config.json`` values of the hub repos
(stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell),
as far as they could be checked without the gated repos; see the comment on each. A module built here is
what ``from_pretrained`` builds before loading weights: the right size for speed and memory
measurements (``device='cuda'`` creates the weights on the GPU directly).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

__all__ = [
    "FLOW_ARCHITECTURES", "FLOW_DEFAULT_RESOLUTION", "build_flow_scheduler", "build_flow_transformer", "build_flow_vae",
    "creating", "flow_parameter_count", "flow_scheduler_config",
    "flow_transformer_config", "flow_vae_config", "save_tiny_flux_pipeline", "save_tiny_sd3_pipeline", "sd3_velocity",
    "tiny_flux_transformer", "tiny_sd3_transformer", "tiny_t5_tokenizer",
]

FLOW_ARCHITECTURES = ("tiny-sd3", "tiny-flux-dev", "tiny-flux-schnell", "sd35-medium", "flux-dev", "flux-schnell")
FLOW_DEFAULT_RESOLUTION = {"tiny-sd3": 16, "tiny-flux-dev": 16, "tiny-flux-schnell": 16, "sd35-medium": 1024,
                           "flux-dev": 1024, "flux-schnell": 1024}  # pixels (the pipelines' defaults)

# -- transformers ----------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium transformer/config.json. Checked against diffusers'
# scripts/convert_sd3_to_diffusers.py (SD3.5: dual attention (attn2) on layers 0-12, qk_norm "rms_norm",
# "sd3.5 2b use pos_embed_max_size=384", num_attention_heads = num_layers = 24, caption_projection_dim =
# 24 * 64 = 1536, sample_size 128, patch 2, 16 channels, joint_attention_dim 4096) and against two
# independent copies of the config (the diffusers default pooled_projection_dim 2048 = CLIP-L 768 + CLIP-G 1280).
_SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json (= diffusers' FluxTransformer2DModel defaults, which
# scripts/convert_flux_to_diffusers.py builds: 19 double + 38 single blocks, 24 heads x 128, 64 = 16 latent
# channels x 2x2 packing, rope axes 16/56/56, pooled CLIP-L 768, T5-XXL 4096), guidance_embeds true.
_FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-schnell: the same transformer without the guidance embedding.
_FLUX_SCHNELL = dict(_FLUX_DEV, guidance_embeds=False)

_TINY_SD3 = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
)
_TINY_FLUX = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as FLUX's 16 + 56 + 56 = 128
)

_TRANSFORMER = {
    "tiny-sd3": ("SD3Transformer2DModel", _TINY_SD3),
    "tiny-flux-dev": ("FluxTransformer2DModel", _TINY_FLUX),
    "tiny-flux-schnell": ("FluxTransformer2DModel", dict(_TINY_FLUX, guidance_embeds=False)),
    "sd35-medium": ("SD3Transformer2DModel", _SD35_MEDIUM),
    "flux-dev": ("FluxTransformer2DModel", _FLUX_DEV),
    "flux-schnell": ("FluxTransformer2DModel", _FLUX_SCHNELL),
}

# -- VAEs (16 latent channels, no quant convs) -----------------------------------------------------

_VAE_16 = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)
# SD3/SD3.5 vae/config.json: the SDXL VAE layout with 16 latent channels, scaling_factor 1.5305, shift_factor
# 0.0609 (diffusers' convert_sd3_to_diffusers.py builds exactly this).
_SD3_VAE = dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609)
# FLUX.1 vae/config.json (the "ae.safetensors" autoencoder): same layout, scaling_factor 0.3611, shift_factor
# 0.1159 (diffusers' remote_utils documents these two for Flux).
_FLUX_VAE = dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)
_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
)

_VAE = {
    "tiny-sd3": dict(_TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609),
    "tiny-flux-dev": dict(_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
    "tiny-flux-schnell": dict(_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
    "sd35-medium": _SD3_VAE,
    "flux-dev": _FLUX_VAE,
    "flux-schnell": _FLUX_VAE,
}

# -- schedulers (FlowMatchEulerDiscreteScheduler) --------------------------------------------------

# SD3 / SD3.5 scheduler_config.json: {"num_train_timesteps": 1000, "shift": 3.0} (static shift; written from
# the published file as remembered -- one third-party copy claims use_dynamic_shifting for SD3.5, which
# StableDiffusion3Pipeline would then need mu for; not verifiable here without the gated repo).
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# FLUX.1-dev scheduler_config.json: dynamic (resolution-dependent) shifting, mu from 0.5 at 256 tokens to
# 1.15 at 4096 tokens (several independent copies agree).
_FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# FLUX.1-schnell scheduler_config.json: no shift (as remembered; not verified against the gated repo).
_FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

_SCHEDULER = {
    "tiny-sd3": _SD3_SCHEDULER, "sd35-medium": _SD3_SCHEDULER,
    "tiny-flux-dev": _FLUX_DEV_SCHEDULER, "flux-dev": _FLUX_DEV_SCHEDULER,
    "tiny-flux-schnell": _FLUX_SCHNELL_SCHEDULER, "flux-schnell": _FLUX_SCHNELL_SCHEDULER,
}


def _check(name: str) -> str:
    if name not in FLOW_ARCHITECTURES:
        raise ValueError(f"unknown flow architecture {name!r}; choose one of {', '.join(FLOW_ARCHITECTURES)}")
    return name


def flow_transformer_config(name: str, layers: int | None = None) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of architecture ``name``'s transformer. ``layers``: a shortened
    copy for smoke runs on small machines -- SD3 ``layers`` joint blocks (dual attention on those of the first 13
    that remain), FLUX ``layers`` double-stream and 2 x ``layers`` single-stream blocks (FLUX.1's 19 : 38)."""
    cls, cfg = _TRANSFORMER[_check(name)]
    cfg = copy.deepcopy(cfg)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if cls == "SD3Transformer2DModel":
            cfg.update(num_layers=min(layers, cfg["num_layers"]),
                       dual_attention_layers=tuple(i for i in cfg.get("dual_attention_layers", ()) if i < layers))
        else:
            cfg.update(num_layers=min(layers, cfg["num_layers"]),
                       num_single_layers=min(2 * layers, cfg["num_single_layers"]))
    return cls, cfg


def flow_parameter_count(name: str, layers: int | None = None) -> int:
    """Parameters (+ buffers: SD3's stored position table) of architecture ``name``'s transformer, counted on the
    meta device (no memory, well under a second even for FLUX.1's 12 B)."""
    import diffusers

    cls, cfg = flow_transformer_config(name, layers)
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**cfg)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def flow_vae_config(name: str) -> dict:
    return copy.deepcopy(_VAE[_check(name)])


def flow_scheduler_config(name: str) -> dict:
    return copy.deepcopy(_SCHEDULER[_check(name)])


class creating:
    """Modules created inside are created on ``device`` (None: where torch creates them) with their floating-point
    tensors in ``dtype`` (torch's default dtype, restored on exit): a model whose float32 weights would not fit is made
    directly in bfloat16 (checked for Qwen-Image: every tensor gets the dtype a float32 build cast with ``.to`` gets)."""

    def __init__(self, device, dtype):
        self.device = torch.device(device) if device is not None else nullcontext()
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        self.device.__enter__()
        return self

    def __exit__(self, *exc):
        self.device.__exit__(*exc)
        torch.set_default_dtype(self.saved)


def _building(device, seed: int):
    torch.manual_seed(seed)
    return torch.device(device) if device is not None else nullcontext()


def _frozen(module: torch.nn.Module, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def build_flow_transformer(name: str, *, device=None, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    """``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` of architecture ``name``, random weights, frozen
    (``layers``: fewer blocks, see ``flow_transformer_config``)."""
    import diffusers

    cls, cfg = flow_transformer_config(name, layers)
    with _building(device, seed):
        model = getattr(diffusers, cls)(**cfg)
    return _frozen(model, dtype)


def build_flow_vae(name: str, *, device=None, dtype=torch.float32, seed: int = 1):
    """``AutoencoderKL`` with 16 latent channels (scaling_factor and shift_factor in its config), random weights."""
    from diffusers import AutoencoderKL

    with _building(device, seed):
        vae = AutoencoderKL(**flow_vae_config(name))
    return _frozen(vae, dtype)


def build_flow_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler_config(name))


def tiny_sd3_transformer(dtype=torch.float32, seed: int = 0):
    """The tiny SD3.5-style transformer (16-channel 8x8 latents, 2x2 patches, dual attention, RMS q/k norm)."""
    return build_flow_transformer("tiny-sd3", dtype=dtype, seed=seed)


def tiny_flux_transformer(dtype=torch.float32, seed: int = 0, guidance_embeds: bool = True):
    """The tiny FLUX-style transformer (packed 16-channel latents; guidance embedding like FLUX.1-dev unless
    ``guidance_embeds=False``, FLUX.1-schnell)."""
    return build_flow_transformer("tiny-flux-dev" if guidance_embeds else "tiny-flux-schnell", dtype=dtype, seed=seed)


def sd3_velocity(transformer, prompt_embeds, pooled_prompt_embeds):
    """velocity(x, t) of an SD3 transformer as StableDiffusion3Pipeline calls it (no CFG): timestep t
    broadcast to the batch, latents (B, 16, H, W) in the transformer's dtype."""
    dtype = next(transformer.parameters()).dtype

    def velocity(x, t):
        timestep = torch.tensor(float(t), dtype=torch.float32, device=x.device).expand(x.shape[0])
        return transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled_prompt_embeds, return_dict=False)[0]

    return velocity


# -- tiny whole pipelines (text encoders, tokenizers, VAE, scheduler), saved in the released layouts --------

_T5_WORDS = ("an the of in on with red blue green yellow circle square triangle photo painting dog cat hat "
             "lighthouse at dusk blurry").split()


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (SentencePiece-style Unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the ``▁`` word marker)
    built offline: a few whole words plus every lower-case letter, digit and punctuation mark, so any prompt
    tokenises. ``transformers.T5TokenizerFast`` (= ``T5Tokenizer`` in transformers 5); saved as tokenizer.json."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -4.0) for w in _T5_WORDS]
    vocab += [(c, -8.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [("▁" + c, -8.5) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5_encoder(vocab_size: int, d_model: int, seed: int):
    """A two-layer T5 v1.1-style encoder (gated GELU, no dropout) with ``d_model`` outputs."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def _tiny_clip(hidden: int, projection: int | None, seed: int, vocab_size: int):
    """A CLIP text tower over ``vocab_size`` token ids; with ``projection`` the ``CLIPTextModelWithProjection`` SD3
    uses, else FLUX's ``CLIPTextModel``. (eos_token_id 2: the pooled state is taken at the highest id, the end-of-text
    token of the CLIP tokenizers, as for the released towers' configs.)"""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def _clip_tokenizer():
    """A CLIP BPE tokenizer (open_clip's merges, offline) reduced to the merges that spell ``_T5_WORDS``: the same
    sub-words as the full vocabulary for those, any other text byte by byte; ~600 ids, so the tiny towers' embedding
    tables stay small and the saved pipelines load fast."""
    from ..shapes.tokenizer import build_small_clip_tokenizer

    return build_small_clip_tokenizer(["a", *_T5_WORDS])


def save_tiny_sd3_pipeline(path, seed: int = 0) -> str:
    """A tiny ``StableDiffusion3Pipeline`` directory: the tiny SD3.5-style transformer, CLIP-L-like (hidden 8) and
    CLIP-G-like (hidden 4) towers with projections (8 + 8 = the transformer's pooled 16; their penultimate
    states, 8 + 4, zero-padded to the joint 16), a tiny T5 (16) and the 16-channel VAE (scaling and shift
    factor), shift-3 flow-matching scheduler. (SD3 without T5 is this directory loaded without it.)"""
    from diffusers import StableDiffusion3Pipeline

    tok3, clip = tiny_t5_tokenizer(), _clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=build_flow_transformer("tiny-sd3", seed=seed), scheduler=build_flow_scheduler("tiny-sd3"),
        vae=build_flow_vae("tiny-sd3", seed=seed + 1),
        text_encoder=_tiny_clip(8, 8, seed + 2, len(clip)), tokenizer=clip,
        text_encoder_2=_tiny_clip(4, 8, seed + 3, len(clip)), tokenizer_2=clip,
        text_encoder_3=_tiny_t5_encoder(len(tok3), 16, seed + 4), tokenizer_3=tok3)
    pipe.save_pretrained(str(path))
    return str(path)


def save_tiny_flux_pipeline(path, seed: int = 0, schnell: bool = False) -> str:
    """A tiny ``FluxPipeline`` directory: the tiny FLUX-style transformer (guidance embedding as FLUX.1-dev, or
    none and no shift as FLUX.1-schnell), a CLIP text tower (pooled 16), a tiny T5 (16) and the 16-channel VAE."""
    from diffusers import FluxPipeline

    name = "tiny-flux-schnell" if schnell else "tiny-flux-dev"
    tok2, clip = tiny_t5_tokenizer(), _clip_tokenizer()
    pipe = FluxPipeline(
        transformer=build_flow_transformer(name, seed=seed), scheduler=build_flow_scheduler(name),
        vae=build_flow_vae(name, seed=seed + 1), text_encoder=_tiny_clip(16, None, seed + 2, len(clip)),
        tokenizer=clip, text_encoder_2=_tiny_t5_encoder(len(tok2), 16, seed + 3), tokenizer_2=tok2)
    pipe.save_pretrained(str(path))
    return str(path)
