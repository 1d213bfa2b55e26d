"""FLUX.2 klein (``Flux2KleinPipeline``): a rectified-flow transformer behind the same ``Backbone`` interface as the
SD3 / FLUX.1 backbone, whose samplers (``flow``, ``flow_edict``) and guarantees it shares.

What differs from FLUX.1 (``flow.py``), each as diffusers' Flux2KleinPipeline does it:

- Text: one Qwen3 causal LM. Each prompt is wrapped in Qwen3's chat template (a user turn, the generation prompt,
  thinking off), padded to ``max_sequence_length`` tokens (512), and the hidden states of layers (9, 18, 27) are
  stacked per token: ``hidden`` = (N, L, 3 x the LM's width). No pooled embedding.
- Latents: the VAE's 32 channels patchified 2x2 into 128 channels and normalised by the VAE's batch-norm running
  statistics; the pipeline draws its noise in that space, (N, 128, H/16, W/16), and so do we: the module's latents
  ARE the pipeline's (an item's seed gives the noise the pipeline draws from ``Generator().manual_seed(seed)``).
  Tokens are the cells of that grid, channel-last, position ids (t=0, row, column, l=0); text ids (0, 0, 0, l).
  ``vae_scale_factor`` is therefore the VAE's factor x 2 (pixels per latent cell).
- The grid: sigmas linspace(1, 1/n, n), shifted by the scheduler with mu = ``compute_empirical_mu`` of the token
  count and n (not FLUX.1's linear shift).
- Guidance: klein (distilled, model_index.json ``is_distilled``) runs one conditional call and ignores the scale;
  klein base runs classifier-free guidance above scale 1, batched here in one call (uncond, cond) where the
  pipeline makes two calls, with the negative prompt's encoding (the pipeline's is always "").
- Decoding: latents x sqrt(running_var + eps) + running_mean, un-patchified, ``vae.decode`` (no scaling factor).

Text encoders stay out of the module's parameters and go back to the CPU at the first ``denoiser`` call, as for
FLUX.1 (``FlowBackbone``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backbone import (Backbone, ModelNotFoundError, apply_memory_options, image_sides, load_dtype_kwargs,
                        load_pipeline, posterior_latents)
from ..conditioning import Conditioning
from ..precision import at_least_float32, module_dtype, to_module_dtype
from ..sampling import FlowSchedule, check_guidance_scale
from ..sampling.chains import cotangent_scaled
from ..sampling.flow import flux_sigmas
from .flow import FlowBackbone

__all__ = ["Flux2Backbone", "Flux2Velocity", "PretrainedFlux2Backbone", "empirical_mu", "flux2_latent_ids",
           "flux2_text_ids", "patchify", "unpatchify"]

QWEN3_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift mu from the token count and the number of steps (diffusers' ``compute_empirical_mu``): linear in
    the steps between fits at 10 and 200 steps, linear in the tokens alone above 4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2), each 2x2 patch's pixels as channels c-major
    (Flux2KleinPipeline._patchify_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), the inverse of :func:`patchify` (Flux2KleinPipeline._unpatchify_latents)."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def flux2_latent_ids(height: int, width: int, device=None) -> Tensor:
    """Position ids (h*w, 4) of an h x w latent grid's tokens, row-major: (t=0, row, column, l=0)
    (Flux2KleinPipeline._prepare_latent_ids)."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, torch.arange(height), torch.arange(width), one).to(device)


def flux2_text_ids(seq_len: int, device=None) -> Tensor:
    """Position ids (L, 4) of the text tokens: (0, 0, 0, l) (Flux2KleinPipeline._prepare_text_ids)."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, one, one, torch.arange(seq_len)).to(device)


class Flux2Velocity:
    """v(x, t) of a ``Flux2Transformer2DModel`` on the module's latents x (B, 128, h, w), as Flux2KleinPipeline calls
    it: tokens x.flatten(2).transpose(1, 2) in the transformer's dtype, ``timestep`` = t / 1000 in it, no guidance
    embedding; with ``cfg`` (klein base, scale s > 1) rows (uncond, cond) in ONE call, v = v_u + s (v_c - v_u)
    (Ho & Salimans 2022). ``cond`` (B or 1 rows) / ``uncond`` (1 row): the Qwen3 states. v is widened back to at
    least float32 (the guidance combination never in half precision).
    """

    def __init__(self, transformer, cond: Tensor, uncond: Tensor | None, guidance_scale: float, cfg: bool):
        if cfg and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} on klein base needs the negative prompt's conditioning")
        self.transformer, self.cond, self.uncond = transformer, cond, uncond
        self.guidance_scale, self.cfg = float(guidance_scale), bool(cfg)
        self.dtype = module_dtype(transformer, torch.float32)
        self.calls = 0

    def _call(self, tokens: Tensor, t: float, hidden: Tensor, h: int, w: int) -> Tensor:
        self.calls += 1
        dtype, device = self.dtype, tokens.device
        # the pipeline: timestep = t.expand(B).to(latents.dtype) / 1000, t the scheduler's float32 timestep
        timestep = torch.tensor(float(t), dtype=torch.float32, device=device).expand(tokens.shape[0]).to(dtype) / 1000
        return self.transformer(  # hidden states positionally: a forward hook (the compute meter) sees the rows
            tokens, encoder_hidden_states=hidden.to(device, dtype), timestep=timestep, guidance=None,
            txt_ids=flux2_text_ids(hidden.shape[1], device), img_ids=flux2_latent_ids(h, w, device), return_dict=False,
        )[0]

    def __call__(self, x: Tensor, t: float) -> Tensor:
        b, c, h, w = x.shape
        # the pipeline's _pack_latents: (B, C, h, w) -> (B, h*w, C); a permutation, so the Euler step commutes with it
        tokens = x.to(self.dtype).reshape(b, c, h * w).permute(0, 2, 1)
        wide = torch.promote_types(x.dtype, torch.float32)
        cond = self.cond.expand(b, -1, -1)
        if not self.cfg:
            v = self._call(tokens, t, cond, h, w)
        else:
            hidden = torch.cat([self.uncond.expand(b, -1, -1), cond])
            v_uncond, v_cond = self._call(torch.cat([tokens, tokens]), t, hidden, h, w).to(wide).chunk(2)
            v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        # _unpack_latents_with_ids scatters row-major tokens back: the inverse permutation
        return v.to(wide).permute(0, 2, 1).reshape(b, c, h, w)


class Flux2Backbone(FlowBackbone):
    """A frozen FLUX.2 klein model behind the ``Backbone`` interface (a ``FlowBackbone``: flow samplers, no CUDA
    graphs, text encoders outside the module).

    ``transformer`` a ``Flux2Transformer2DModel``, ``vae`` its ``AutoencoderKLFlux2`` (batch-norm statistics of the
    patchified latents), ``scheduler`` its ``FlowMatchEulerDiscreteScheduler``, ``text_encoder`` a
    ``Qwen3ForCausalLM`` with ``tokenizer`` (Qwen2, carrying the chat template). ``is_distilled``: klein (no CFG,
    the scale ignored, 4 steps) or klein base (CFG above scale 1). ``max_sequence_length``: Qwen3 tokens (the
    pipeline's 512); ``text_encoder_out_layers``: the hidden states stacked (the pipeline's (9, 18, 27));
    ``text_encoder_device``: where prompts are encoded (default the transformer's device).
    """

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None, is_distilled: bool = True,
                 max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = QWEN3_LAYERS,
                 text_encoder_device: str | None = None):
        # FlowBackbone's interface, not its __init__ (which knows SD3 / FLUX.1 text towers only)
        Backbone.__init__(self)
        if type(transformer).__name__ != "Flux2Transformer2DModel":
            raise ValueError(f"{type(transformer).__name__} is not a FLUX.2 transformer: give a Flux2Transformer2DModel "
                             "(or load SD3 / FLUX.1 with doodl_lightning.families.PretrainedFlowBackbone)")
        self.kind = "flux2"
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()
        # a plain dict: not submodules, so moving or casting the backbone leaves the text encoder where it is
        self._text = {"encoders": [text_encoder], "tokenizers": [tokenizer]}
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512] (Qwen3 tokens), got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        layers = tuple(text_encoder_out_layers)
        depth = text_encoder.config.num_hidden_layers if text_encoder is not None else None
        if not layers or any(not isinstance(k, int) or k < 0 or (depth is not None and k > depth) for k in layers):
            raise ValueError(f"text_encoder_out_layers must be hidden-state indices in [0, {depth}] (the pipeline's "
                             f"{list(QWEN3_LAYERS)}), got {list(layers)}")
        self.text_encoder_out_layers = layers
        self.is_distilled = bool(is_distilled)
        self.text_encoder_device = text_encoder_device
        self.force_zeros_for_empty_prompt = False
        self.freeze()

    # -- what the module and the tools read -----------------------------------------------------------
    @property
    def family(self) -> str:
        """``flux2`` (FLUX.2 klein, distilled or base)."""
        return "flux2"

    @property
    def patch(self) -> int:
        """Latent pixels per token side: the 2x2 patchify (already in the latents: one token per cell)."""
        return 2

    @property
    def vae_factor(self) -> int:
        """The VAE's own downsampling (8 for the released VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per cell of the module's latents: the VAE's factor x the 2x2 patchify (16 for the released model),
        what the pipeline's image processor rounds sizes to."""
        return self.vae_factor * self.patch

    @property
    def default_size(self) -> int:
        """The pipeline's default image side: 128 x the VAE's factor (1024)."""
        return 128 * self.vae_factor

    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """2 for klein base with CFG batched (scale > 1), else 1."""
        return 2 if self._cfg(guidance_scale) else 1

    def _cfg(self, guidance_scale: float) -> bool:
        # the pipeline's do_classifier_free_guidance
        return not self.is_distilled and guidance_scale > 1

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None) -> FlowSchedule:
        """Flux2KleinPipeline's grid of ``steps`` steps for images of ``size`` (height, width) in pixels (default the
        model's): sigmas linspace(1, 1/steps, steps), shifted by the scheduler with mu = ``empirical_mu`` of the
        token count (H/16)(W/16) and ``steps``."""
        self._check_grid(grid)
        h, w = size or (self.default_size, self.default_size)
        f = self.vae_scale_factor
        tokens = (h // f) * (w // f)
        sigmas = None if self.scheduler.config.get("use_flow_sigmas") else flux_sigmas(steps)
        return FlowSchedule.from_scheduler(self.scheduler, steps, sigmas=sigmas, mu=empirical_mu(tokens, steps))

    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(128, H/16, W/16) of an H x W image (None: the model's size; one number: a square): the patchified,
        normalised space the pipeline draws its noise in; each side a multiple of the VAE's factor x 2."""
        f = self.vae_scale_factor
        height, width = image_sides(height, width, self.default_size, f, f"the VAE downsamples by {self.vae_factor} "
                                    "and FLUX.2 patchifies 2x2 latent patches")
        return self.transformer.config.in_channels, height // f, width // f

    # -- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Each prompt's Qwen3 states as Flux2KleinPipeline.encode_prompt builds them (``size`` unused): the chat
        template applied, ``max_sequence_length`` tokens with the attention mask, hidden states
        ``text_encoder_out_layers`` stacked per token: ``hidden`` (N, L, 3 x width), no added embeddings."""
        enc, tok = self._text["encoders"][0], self._text["tokenizers"][0]
        if enc is None or tok is None:
            raise ValueError("this FLUX.2 model has no text encoder (released, or a directory without it): give the "
                             "whole pipeline directory")
        device = self._ready_encoders()
        ids, masks = [], []
        for prompt in prompts:  # one at a time, as the pipeline (the template per prompt)
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            inputs = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=self.max_sequence_length)
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        out = enc(input_ids=torch.cat(ids).to(device), attention_mask=torch.cat(masks).to(device),
                  output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers], dim=1)
        b, n, length, width = stacked.shape
        return Conditioning(stacked.permute(0, 2, 1, 3).reshape(b, length, n * width))

    # -- the model callable --------------------------------------------------------------------------------
    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0):
        """v(x, t) of the items conditioned on ``cond`` (the flow samplers' model callable): klein one conditional
        call (the scale unused); klein base CFG with ``uncond`` at ``guidance_scale`` > 1, batched."""
        if control_image is not None:
            raise ValueError("control_images given but FLUX.2 models have no ControlNet here: drop control_images")
        check_guidance_scale(guidance_scale)
        self.offload_text_encoders()
        cond, uncond = Conditioning.of(cond), Conditioning.of(uncond)
        width = self.transformer.config.joint_attention_dim
        if cond is None or cond.added or cond.hidden.shape[-1] != width:
            raise ValueError(f"FLUX.2 needs this backbone's encode_prompts conditioning ((N, L, {width}) Qwen3 states)")
        cfg = self._cfg(guidance_scale)
        return Flux2Velocity(self.transformer, cond.hidden, uncond.hidden if cfg and uncond is not None else None,
                             guidance_scale, cfg)

    def unconditional_velocity(self, uncond: Tensor | Conditioning, guidance_scale: float) -> Flux2Velocity:
        """v(x, t) of the negative prompt alone (broadcast to any batch): klein base's unconditional CFG branch (on
        distilled klein, the negative prompt's conditional call), what the one-step baseline's estimate comes from
        (``guidance_scale`` only checked: FLUX.2 has no guidance embedding)."""
        check_guidance_scale(guidance_scale)
        self.offload_text_encoders()
        uncond = Conditioning.of(uncond)
        width = self.transformer.config.joint_attention_dim
        if uncond is None or uncond.added or uncond.hidden.shape[-1] != width:
            raise ValueError(f"FLUX.2 needs this backbone's encode_negative conditioning ((1, L, {width}) Qwen3 states)")
        return Flux2Velocity(self.transformer, uncond.hidden, None, 1.0, cfg=False)

    # -- the VAE -----------------------------------------------------------------------------------------
    def _bn(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's batch-norm mean and std (1, 128, 1, 1) in ``like``'s dtype (at least float32)."""
        bn, dtype = self.vae.bn, at_least_float32(like).dtype
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(like.device, dtype) + self.vae.config.batch_norm_eps)
        return mean, std

    def vae_latents(self, latents: Tensor) -> Tensor:
        """The module's latents as the VAE's (B, 32, H/8, W/8): denormalised and un-patchified, as the pipeline
        before decoding (what its ``output_type="latent"`` returns)."""
        mean, std = self._bn(latents)
        return unpatchify(latents * std + mean)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        # the VAE's VJP on a cotangent brought to O(1) by a power of two, as objective.decode_latents
        return cotangent_scaled(lambda z: at_least_float32(vae.decode(to_module_dtype(z, vae)).sample),
                                self.vae_latents(latents))

    @torch.no_grad()
    def encode_images(self, images: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """VAE-encode images in [-1, 1] to the module's latents: the posterior mean (the pipeline's argmax), or with
        ``generators`` a posterior sample, patchified and normalised by the batch-norm statistics
        (Flux2KleinPipeline._encode_vae_image)."""
        post = self.vae.encode(to_module_dtype(images.to(self.vae.device), self.vae)).latent_dist
        x = patchify(posterior_latents(post.mean, post.std, generators))
        mean, std = self._bn(x)
        return (x - mean) / std


class PretrainedFlux2Backbone(Flux2Backbone):
    """A Flux2Backbone loaded from a diffusers directory (model_index.json: ``Flux2KleinPipeline``), a hub id
    (black-forest-labs/FLUX.2-klein-4B, -9B, -base-4B, -base-9B), or one file (+ ``model_config``): the
    ``class_path`` form of the module's ``model:`` key (``model: <path>`` picks it by itself for such a model).

    ``is_distilled`` comes from model_index.json. ``transformer_checkpointing``, ``vae_checkpointing``,
    ``vae_tiling``, ``load_dtype`` as ``PretrainedFlowBackbone``; ``max_sequence_length``,
    ``text_encoder_out_layers``, ``text_encoder_device`` as ``Flux2Backbone``.
    """

    without_controlnet = "FLUX.2"

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 transformer_checkpointing: bool = False, vae_checkpointing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = QWEN3_LAYERS,
                 text_encoder_device: str | None = None, load_dtype: str | None = None):
        pipe = load_pipeline(path, model_config, local_files_only, **load_dtype_kwargs(load_dtype))
        transformer = getattr(pipe, "transformer", None)
        if type(transformer).__name__ != "Flux2Transformer2DModel":
            raise ValueError(f"{path} is a {type(pipe).__name__}, not a FLUX.2 klein model: give model: <path> (the "
                             "registry picks its backbone) or the class_path its model_index.json names")
        if getattr(pipe, "vae", None) is None:
            raise ModelNotFoundError(f"{path} has no vae: give the whole pipeline directory")
        super().__init__(transformer, pipe.vae, pipe.scheduler, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                         is_distilled=pipe.config.get("is_distilled", False), max_sequence_length=max_sequence_length,
                         text_encoder_out_layers=text_encoder_out_layers, text_encoder_device=text_encoder_device)
        apply_memory_options(self, transformer_checkpointing, vae_checkpointing, vae_tiling, load_dtype)
