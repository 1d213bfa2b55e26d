"""Qwen-Image (Qwen Team 2025, arXiv 2508.02324): an MMDiT rectified-flow transformer behind the ``Backbone`` interface,
as diffusers' ``QwenImagePipeline`` runs it.

What the pipeline does, and where it is here:

- Text: the prompt goes into Qwen2.5-VL's chat template (``PROMPT_TEMPLATE``), the encoder's last hidden states of
  the unpadded tokens are kept, the template's first 34 tokens (its system prefix) dropped, the rest cut to
  ``max_sequence_length`` (the pipeline's 512). Each prompt is a variable-length sequence; ``encode_prompts`` pads it
  with zeros to ``max_sequence_length`` and records which tokens are real (``added["encoder_hidden_states_mask"]``),
  so the chain can concatenate prompts encoded one at a time; the velocity trims the padding no row uses and
  passes no mask when every token is real, exactly as the pipeline's own calls.
- Latents: (N, 16, h, w) in the module, packed into 2x2-patch tokens inside the velocity call (FLUX's packing,
  ``flux_layout``); ``img_shapes`` for the transformer's 3-D RoPE; ``timestep = t / 1000``.
- True classifier-free guidance (``true_cfg_scale``, the module's ``guidance_scale``) on a negative prompt, then
  the pipeline's norm rescaling: v = v_cfg * ||v_cond|| / ||v_cfg||, norms per packed token over its 64 channels.
  The pipeline runs CFG only above scale 1 (below: the conditional call alone). Conditional and negative rows go
  through ONE batched call, their text padded to a common length and masked.
- Sampler and grid: Euler (``flow``) on sigmas linspace(1, 1/n, n) shifted by mu of the packed token count
  (exponential time shift, ``shift_terminal``), as the pipeline hands them to its scheduler: ``FlowSchedule.flux``.
- Decoding: ``AutoencoderKLQwenImage`` is a causal video VAE: latents are de-normalised per channel
  (z * latents_std + latents_mean) and decoded as one-frame videos (B, 16, 1, h, w), frame 0 taken.

The backbone subclasses ``FlowBackbone`` (text encoders outside the module, offloaded after encoding; the flow
samplers; the tools' ``unet`` name) and replaces what differs.
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
from .flow import FlowBackbone
from .flux_layout import pack_latents, unpack_latents

__all__ = ["MASK", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_DROP", "TOKENIZER_MAX_LENGTH", "PretrainedQwenImageBackbone",
           "QwenImageBackbone", "QwenImageVelocity", "check_max_sequence_length", "rescaled_true_cfg"]

# QwenImagePipeline.prompt_template_encode / prompt_template_encode_start_idx / tokenizer_max_length
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                   "{}<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024
MASK = "encoder_hidden_states_mask"  # the Conditioning key of the real-token mask


def check_max_sequence_length(n: int) -> int:
    if not 1 <= int(n) <= TOKENIZER_MAX_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, {TOKENIZER_MAX_LENGTH}] (Qwen-Image prompt tokens), got {n}")
    return int(n)


def rescaled_true_cfg(v_cond: Tensor, v_neg: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's guidance on packed velocities (B, tokens, 64): v = v_neg + s (v_cond - v_neg) (Ho & Salimans
    2022), rescaled per token to the conditional velocity's norm."""
    comb = v_neg + scale * (v_cond - v_neg)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def _trimmed(ctx: Conditioning) -> tuple[Tensor, Tensor | None]:
    """The text states cut to the last column any row uses, and the mask (None when every kept token is real, as the
    pipeline passes it)."""
    mask = ctx.added[MASK].bool()
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    mask = mask[:, :length]
    return ctx.hidden[:, :length], (None if bool(mask.all()) else mask)


class QwenImageVelocity:
    """v(x, t) of a ``QwenImageTransformer2DModel`` on unpacked latents x (B, 16, h, w), called as QwenImagePipeline
    calls it: hidden states packed, ``timestep = t / 1000`` in the model dtype, text states with their mask, and
    true CFG with the norm rescaling above scale 1, its two rows batched into one call.

    ``cond`` (B or 1 rows) / ``uncond`` (1 row): this backbone's ``encode_prompts`` conditionings. The contexts are
    trimmed and joined once here; v is widened back to at least float32 (the guidance combination in it).
    """

    def __init__(self, transformer, cond: Conditioning, uncond: Conditioning | None, true_cfg_scale: float):
        check_guidance_scale(true_cfg_scale)
        self.cfg = true_cfg_scale > 1.0  # the pipeline's do_true_cfg (it has a negative prompt)
        if self.cfg and uncond is None:
            raise ValueError(f"guidance_scale={true_cfg_scale} (true CFG) needs the negative prompt's embedding")
        self.transformer, self.scale = transformer, float(true_cfg_scale)
        self.dtype = module_dtype(transformer, torch.float32)
        self.rows = len(cond)
        # one context for the call: [negative; conditional] padded to a common length when guided
        ctx = Conditioning.cat([uncond.expand(self.rows), cond]) if self.cfg else cond
        self.hidden, self.mask = _trimmed(ctx)
        self.calls = 0

    def _context(self, b: int) -> tuple[Tensor, Tensor | None]:
        if self.rows == b:
            return self.hidden, self.mask
        if self.rows != 1:
            raise ValueError(f"{self.rows} conditionings for a batch of {b} latents: give one, or one per latent")
        parts = 2 if self.cfg else 1
        hidden = self.hidden.unflatten(0, (parts, 1)).expand(parts, b, *self.hidden.shape[1:]).flatten(0, 1)
        mask = None if self.mask is None else self.mask.unflatten(0, (parts, 1)).expand(parts, b, -1).flatten(0, 1)
        return hidden, mask

    def __call__(self, x: Tensor, t: float) -> Tensor:
        b, _, h, w = x.shape
        dtype, device = self.dtype, x.device
        packed = pack_latents(x).to(dtype)
        hidden, mask = self._context(b)
        if self.cfg:
            packed = torch.cat([packed, packed])
        rows = packed.shape[0]
        # QwenImagePipeline: timestep = t.expand(B).to(latents.dtype) / 1000 (t a float32 scheduler timestep)
        timestep = torch.tensor(float(t), dtype=torch.float32, device=device).expand(rows).to(dtype) / 1000
        out = self.transformer(  # hidden states positionally: a forward hook (the compute meter) sees the rows
            packed, encoder_hidden_states=hidden.to(device, dtype),
            encoder_hidden_states_mask=None if mask is None else mask.to(device),
            timestep=timestep, img_shapes=[[(1, h // 2, w // 2)]] * rows, return_dict=False,
        )[0]
        self.calls += 1
        v = out.to(torch.promote_types(x.dtype, torch.float32))
        if self.cfg:
            v_neg, v_cond = v.chunk(2)
            v = rescaled_true_cfg(v_cond, v_neg, self.scale)
        return unpack_latents(v, h, w)


class QwenImageBackbone(FlowBackbone):
    """A frozen Qwen-Image model behind the ``Backbone`` interface.

    ``transformer`` a ``QwenImageTransformer2DModel``, ``vae`` its ``AutoencoderKLQwenImage`` (latents_mean /
    latents_std in its config), ``scheduler`` its ``FlowMatchEulerDiscreteScheduler``, ``text_encoder`` Qwen2.5-VL
    (``Qwen2_5_VLForConditionalGeneration``) with its ``tokenizer``. ``max_sequence_length``: prompt tokens kept after
    the template's prefix (the pipeline's default 512, at most 1024); ``text_encoder_device``: where prompts are
    encoded (default the transformer's device).
    """

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None,
                 max_sequence_length: int = 512, text_encoder_device: str | None = None):
        # FlowBackbone's __init__ serves SD3 / FLUX's towers only: the shared state is set here instead
        Backbone.__init__(self)
        if type(transformer).__name__ != "QwenImageTransformer2DModel":
            raise ValueError(f"{type(transformer).__name__} is not a Qwen-Image transformer: give a "
                             "QwenImageTransformer2DModel (or use FlowBackbone for SD3 / FLUX)")
        if transformer.config.get("guidance_embeds", False):
            raise ValueError("this Qwen-Image transformer is guidance-distilled (guidance_embeds), which "
                             "QwenImagePipeline cannot run either: give a Qwen-Image transformer without it")
        check_max_sequence_length(max_sequence_length)
        self.kind = "qwen-image"
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()
        # a plain dict: not submodules, so moving or casting the backbone leaves the 7 B encoder where it is (the CPU)
        self._text = {"encoders": [text_encoder], "tokenizers": [tokenizer]}
        self.max_sequence_length = int(max_sequence_length)
        self.text_encoder_device = text_encoder_device
        self.force_zeros_for_empty_prompt = False
        self.freeze()

    @property
    def family(self) -> str:
        return "qwen-image"

    @property
    def patch(self) -> int:
        """Latent pixels per token side: 2x2 packing."""
        return 2

    @property
    def vae_scale_factor(self) -> int:
        """2 ** (the VAE's downsampling levels), as QwenImagePipeline (8 for the released VAE)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def default_size(self) -> int:
        """The pipeline's default side: default_sample_size 128 x the VAE factor (1024)."""
        return 128 * self.vae_scale_factor

    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """2 with true CFG batched (scale above 1), else 1."""
        return 2 if guidance_scale > 1.0 else 1

    def check_sampler(self, sampler: str, grid: str | None = None) -> None:
        self._check_grid(grid)
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} needs a diffusion (noise-prediction) model; Qwen-Image is a "
                             "rectified-flow model: use sampler flow (Euler, its pipeline's) or flow_edict (exactly "
                             "invertible), or leave sampler unset")

    def _check_grid(self, grid: str | None) -> None:
        if grid not in (None, "model"):
            raise ValueError(f"timestep_grid {grid!r} is a DDIM grid; Qwen-Image samples on its pipeline's "
                             "flow-matching grid: drop timestep_grid (or set it to model)")

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None) -> FlowSchedule:
        """QwenImagePipeline's grid: sigmas linspace(1, 1/steps, steps), shifted by mu of the packed token count."""
        self._check_grid(grid)
        h, w = size or (self.default_size, self.default_size)
        f = self.vae_scale_factor
        return FlowSchedule.flux(self.scheduler, steps, image_seq_len=(h // f // 2) * (w // f // 2))

    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(16, h, w) of a ``height`` x ``width`` image (None: 1024; one number: a square); each side a multiple of
        twice the VAE factor (the latents are packed 2x2)."""
        f = self.vae_scale_factor
        height, width = image_sides(height, width, self.default_size, 2 * f,
                                    f"the VAE downsamples by {f} and Qwen-Image packs 2x2 latent patches")
        return self.transformer.config.in_channels // 4, height // f, width // f

    # -- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """QwenImagePipeline's ``_get_qwen_prompt_embeds``: each prompt in the chat template, Qwen2.5-VL's last hidden
        states of its real tokens, the template's prefix dropped, cut to ``max_sequence_length``; then zero-padded to
        ``max_sequence_length`` with the real tokens in ``added[MASK]`` (``size`` is unused)."""
        encoder, tokenizer = self._text["encoders"][0], self._text["tokenizers"][0]
        if encoder is None or tokenizer is None:
            raise ValueError("this Qwen-Image model has no text encoder (released, or a directory without it): give the "
                             "whole pipeline directory")
        device = self._ready_encoders()
        tokens = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP,
                           padding=True, truncation=True, return_tensors="pt").to(device)
        states = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        rows = [s[m.bool()][PROMPT_TEMPLATE_DROP:][:self.max_sequence_length]
                for s, m in zip(states, tokens.attention_mask)]
        hidden = states.new_zeros(len(rows), self.max_sequence_length, states.shape[-1])
        mask = torch.zeros(len(rows), self.max_sequence_length, dtype=torch.long, device=states.device)
        for i, r in enumerate(rows):
            hidden[i, :len(r)], mask[i, :len(r)] = r, 1
        return Conditioning(hidden, {MASK: mask})

    # -- the model callable --------------------------------------------------------------------------------
    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0) -> QwenImageVelocity:
        """v(x, t) of the items conditioned on ``cond``, true CFG with the negative ``uncond`` at ``guidance_scale``
        (QwenImagePipeline's ``true_cfg_scale``: above 1 guided and rescaled, else the conditional call alone)."""
        if control_image is not None:
            raise ValueError("control_images given but Qwen-Image models have no ControlNet here: drop control_images")
        self.offload_text_encoders()
        cond, uncond = Conditioning.of(cond), Conditioning.of(uncond)
        if cond is None or MASK not in cond.added or (uncond is not None and MASK not in uncond.added):
            raise ValueError("Qwen-Image needs this backbone's encode_prompts conditioning (text states with their mask)")
        return QwenImageVelocity(self.transformer, cond, uncond, guidance_scale)

    def unconditional_velocity(self, uncond: Tensor | Conditioning, guidance_scale: float) -> QwenImageVelocity:
        """v(x, t) of the negative prompt alone (broadcast to any batch): true CFG's negative branch, what the one-step
        baseline's estimate comes from (``guidance_scale`` only checked: Qwen-Image has no guidance embedding)."""
        check_guidance_scale(guidance_scale)
        self.offload_text_encoders()
        uncond = Conditioning.of(uncond)
        if uncond is None or MASK not in uncond.added:
            raise ValueError("Qwen-Image needs this backbone's encode_negative conditioning (text states with their mask)")
        return QwenImageVelocity(self.transformer, uncond, None, 1.0)

    # -- the VAE -----------------------------------------------------------------------------------------
    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(latents_mean, 1 / latents_std) as (1, 16, 1, 1), computed as the pipeline does (float32), in ``like``'s dtype."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1)
        return mean.to(like.device, like.dtype), inv_std.to(like.device, like.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """QwenImagePipeline's decoding: z = latents / (1 / latents_std) + latents_mean, decoded as a one-frame video,
        frame 0 (images in [-1, 1], clamped by the VAE). The de-normalisation runs in the latents' dtype (at least
        float32), the VAE in its own."""
        mean, inv_std = self._latent_stats(latents)
        z = latents / inv_std + mean
        # the VJP on a cotangent brought to O(1) by a power of two, as objective.decode_latents for the other VAEs
        return cotangent_scaled(
            lambda z: at_least_float32(self.vae.decode(to_module_dtype(z, self.vae)[:, :, None]).sample[:, :, 0]), z)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """VAE-encode images in [-1, 1] (one-frame videos) to normalised float32 latents (z - latents_mean) /
        latents_std, as QwenImageImg2ImgPipeline: the posterior mean, or with ``generators`` a posterior sample."""
        post = self.vae.encode(to_module_dtype(images.to(self.vae.device), self.vae)[:, :, None]).latent_dist
        z = posterior_latents(post.mean[:, :, 0], post.std[:, :, 0], generators)
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std


class PretrainedQwenImageBackbone(QwenImageBackbone):
    """A QwenImageBackbone loaded from a diffusers directory (model_index.json: ``QwenImagePipeline``) or a hub id
    (``Qwen/Qwen-Image``): the ``class_path`` form of the module's ``model:`` key (``model: <path>`` picks it by itself).

    ``transformer_checkpointing``: the transformer's own gradient checkpointing inside the chain's with-grad
    recomputation; ``vae_tiling``: the VAE's tiled decoding (diffusers' AutoencoderKLQwenImage has no gradient
    checkpointing, so ``vae_checkpointing`` is refused); ``load_dtype`` (``bfloat16``, ``float16``, ``float32``): the
    dtype the weights are read in (the transformer's 20 B parameters are 82 GB in float32); ``max_sequence_length``
    and ``text_encoder_device`` as ``QwenImageBackbone``.
    """

    without_controlnet = "Qwen-Image"

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 transformer_checkpointing: bool = False, vae_checkpointing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int = 512, text_encoder_device: str | None = None, load_dtype: str | None = None):
        dtype_kwargs = load_dtype_kwargs(load_dtype)
        check_max_sequence_length(max_sequence_length)  # before the (20 B-parameter) load
        if vae_checkpointing:  # before the load, too
            raise ValueError("vae_checkpointing: diffusers' AutoencoderKLQwenImage has no gradient checkpointing: drop "
                             "vae_checkpointing (vae_tiling lowers the decoder's memory instead)")
        pipe = load_pipeline(path, model_config, local_files_only, **dtype_kwargs)
        if type(getattr(pipe, "transformer", None)).__name__ != "QwenImageTransformer2DModel":
            raise ValueError(f"{path} is a {type(pipe).__name__}, not a Qwen-Image model: use model: <path> (the "
                             "registry picks the backbone) or the backbone class of its family")
        if getattr(pipe, "vae", None) is None:
            raise ModelNotFoundError(f"{path} has no vae: give the whole pipeline directory")
        super().__init__(pipe.transformer, pipe.vae, pipe.scheduler, text_encoder=pipe.text_encoder,
                         tokenizer=pipe.tokenizer, max_sequence_length=max_sequence_length,
                         text_encoder_device=text_encoder_device)
        apply_memory_options(self, transformer_checkpointing=transformer_checkpointing, vae_tiling=vae_tiling,
                             load_dtype=load_dtype)  # vae_checkpointing was refused before the load
