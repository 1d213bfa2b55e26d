"""The UNet families: Stable Diffusion 1.x / 2.x (and the Turbo / Lightning distillations), SDXL, LCM, and their
ControlNet pipelines (one ControlNet or several), with or without an IP-Adapter, behind the ``Backbone`` interface.

One class serves them all, the family read from the components (SDXL: the UNet's ``text_time`` added conditioning;
LCM: its guidance-scale embedding, ``time_cond_proj_dim``; ControlNets: given or in the pipeline; an IP-Adapter: its
image encoder and the UNet's image projection, ``ip_adapter``), so a test double
or a benchmark's random-weight UNet is served as a loaded one is. ``PretrainedBackbone`` loads one from a hub id, a
diffusers directory or a single file: the registry's class for every UNet pipeline (``doodl_lightning.families``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ..backbone import Backbone, ModelNotFoundError, complete_weights, load_pipeline, model_index
from ..conditioning import Conditioning
from ..precision import module_dtype
from ..sampling import Control, Denoiser, Schedule, default_grid
from .controlnet import check_controlnet, controlnet_nets, load_controlnets, several_controlnets
from .ip_adapter import check_ip_adapter, load_ip_adapter, load_reference_image, reference_embeddings, uses_hidden_states

__all__ = ["PretrainedBackbone", "UNetBackbone", "guidance_scale_embedding"]


def guidance_scale_embedding(w: float, dim: int) -> Tensor:
    """LCM's guidance-scale embedding (1, dim) of w (sinusoidal in 1000 w; Meng et al. 2023 as LCM uses it)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = (w * 1000.0) * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class UNetBackbone(Backbone):
    """A frozen latent-diffusion UNet model (eps or v prediction) behind the ``Backbone`` interface.

    Families, recognised from the components themselves: SD-1.x/2.x (one text encoder; also LCM and the
    Turbo distillations), SDXL (two text encoders, the second's pooled projection and the micro-conditioning
    ``time_ids``; UNet ``addition_embed_type == "text_time"``). A ``controlnet`` (or a list of them, diffusers'
    ``MultiControlNetModel``) adds its residuals to every UNet call; an IP-Adapter (``use_ip_adapter``) adds the
    reference image's embedding to every prompt's conditioning. ``denoiser``: eps of a latent at a timestep,
    classifier-free guidance batched in one call.
    """

    schedule_type = Schedule  # the samplers of an eps / v-prediction UNet: ddim, edict, lcm, and any registered later
    supports_cuda_graphs = True  # a UNet call replays as a CUDA graph (cuda_graphs.GraphedUNet)

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 controlnet=None, force_zeros_for_empty_prompt: bool = True):
        """Any diffusers UNet2DConditionModel, AutoencoderKL, text encoder(s), tokenizer(s) and scheduler (a
        test double too); ``controlnet`` a ControlNetModel for this base, or a list of them (several at once)."""
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        controlnet = several_controlnets(controlnet)
        if controlnet is not None:
            check_controlnet(controlnet, unet, 2 ** (len(vae.config.block_out_channels) - 1))
        self.controlnet = controlnet
        # SDXL's pipelines use zero embeddings as the unconditional input when no negative prompt is given
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.image_encoder, self.feature_extractor = None, None  # an IP-Adapter's (``use_ip_adapter``)
        self.ip_adapter_pixels: Tensor | None = None  # its reference image, as the image encoder reads it
        self.freeze()

    def use_ip_adapter(self, image_encoder, feature_extractor, image: str) -> None:
        """Condition every prompt on the reference ``image`` through the IP-Adapter already loaded into the UNet
        (its image projection and attention processors), with its CLIP ``image_encoder`` and ``feature_extractor``
        (a CLIPImageProcessor) -- what a pipeline's ``load_ip_adapter`` registers."""
        if type(self.unet.encoder_hid_proj).__name__ != "MultiIPAdapterImageProjection":
            raise ValueError("the UNet has no IP-Adapter loaded: load one (PretrainedBackbone's ip_adapter) first")
        reference = load_reference_image(image)
        self.ip_adapter_pixels = feature_extractor(reference, return_tensors="pt").pixel_values
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor
        self.requires_grad_(False)  # the adapter's new projections too: frozen like the rest
        self.eval()

    def _image_embeds(self) -> tuple[Tensor, Tensor]:
        """The IP-Adapter's (reference, negative) image embeddings, each one row (``reference_embeddings``)."""
        return reference_embeddings(self.image_encoder, self.ip_adapter_pixels, uses_hidden_states(self.unet))

    @classmethod
    def load(cls, model: str, *, model_config: str | None = None, local_files_only: bool | None = None,
             dtype: torch.dtype = torch.float32, vae_checkpointing: bool = False) -> "UNetBackbone":
        """Load by hub id, local diffusers directory, or one .safetensors/.ckpt file (+ ``model_config``): a
        ``PretrainedBackbone`` in ``dtype``."""
        return PretrainedBackbone(model, model_config=model_config, local_files_only=local_files_only,
                                  vae_checkpointing=vae_checkpointing).to(dtype)

    @property
    def family(self) -> str:
        """``sdxl`` for a UNet with SDXL's text_time added conditioning, ``sd`` otherwise."""
        return "sdxl" if self.unet.config.get("addition_embed_type") == "text_time" else "sd"

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.unet)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (UNet sample size x VAE factor: SD-1.5 512, SDXL 1024)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def default_sampler(self) -> str:
        """``lcm`` for an LCM model, ``ddim`` for few-step distilled models on their own trailing grid (their
        sampler), ``edict`` (the official DOODL) otherwise."""
        if type(self.scheduler).__name__ == "LCMScheduler":
            return "lcm"
        return "ddim" if default_grid(self.scheduler) == "model" else "edict"

    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """Rows one item occupies in a model call: 2 with classifier-free guidance batched (uncond, cond), 1 without
        (scale 0 or 1; LCM's guidance embedding) -- what the compute meter divides by."""
        return 1 if guidance_scale in (0.0, 1.0) or self.unet.config.get("time_cond_proj_dim") else 2

    def check_sampler(self, sampler: str, grid: str | None = None) -> None:
        """One line when ``sampler`` (or the ``timestep_grid``) is not one this model family runs (the flow samplers
        need SD3 / FLUX; a UNet's grids are checked by ``check_steps``)."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} is for rectified-flow models (SD3, FLUX); this is a diffusion UNet "
                             f"model: use {', '.join(self.samplers)}, or leave sampler unset")

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None):
        """The chain's time grid of ``steps`` steps (``Schedule.from_scheduler``; None: the model's default grid).
        ``size`` (the image's height, width) matters to resolution-dependent grids only (FLUX's), not a UNet's."""
        return Schedule.from_scheduler(self.scheduler, steps, grid)

    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a ``height`` x ``width`` image (None: the model's size; one number:
        a square)."""
        f = self.vae_scale_factor
        depth = len(self.unet.config.block_out_channels) - 1
        height = height or self.default_size
        width = width or height
        sides = (("resolution", height),) if height == width else (("height", height), ("width", width))
        for name, res in sides:
            if res <= 0 or res % f:
                raise ValueError(f"{name} {res} is not a positive multiple of the VAE factor {f}: use e.g. "
                                 f"{max(f * 2**depth, res // (f * 2**depth) * f * 2**depth)}")
            if (res // f) % (2**depth):
                raise ValueError(f"{name} {res} gives {res // f}-pixel latents, which the UNet's {depth} "
                                 f"down-samplings cannot halve evenly: use a multiple of {f * 2**depth}")
        return self.unet.config.in_channels, height // f, width // f

    def _tokens(self, tokenizer, prompts: list[str]) -> Tensor:
        tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return tok.input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of each prompt ("" = the null prompt); ``size`` (height, width): SDXL's
        micro-conditioning original and target size (default: the model's), crop (0, 0), as its pipeline. With an
        IP-Adapter, every prompt also gets the reference image's embedding (``added["image_embeds"]``)."""
        cond = self._encode_text(prompts, size)
        return cond if self.image_encoder is None else cond.with_added(image_embeds=self._image_embeds()[0])

    def _encode_text(self, prompts: list[str], size: tuple[int, int] | None) -> Conditioning:
        if self.family == "sd":
            ids = self._tokens(self.tokenizer, prompts).to(self.text_encoder.device)
            return Conditioning(self.text_encoder(ids)[0])
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("this UNet is SDXL's (text_time added conditioning) but the model has no "
                             "text_encoder_2 / tokenizer_2: give the whole SDXL pipeline directory")
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._tokens(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's pooled text embedding: only the last one is used
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layers
        h, w = size or (self.default_size, self.default_size)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden[0].dtype, device=hidden[0].device)
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled,
                                                        "time_ids": time_ids.expand(len(prompts), -1)})

    @torch.no_grad()
    def encode_negative(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """The unconditional input of CFG: the negative prompt's conditioning; for SDXL with no negative
        prompt (""), zeros (its pipelines' ``force_zeros_for_empty_prompt``); with an IP-Adapter, the negative image
        embedding (``reference_embeddings``)."""
        cond = self._encode_text([prompt], size)
        if self.family == "sdxl" and prompt == "" and self.force_zeros_for_empty_prompt:
            cond = Conditioning(torch.zeros_like(cond.hidden), {"text_embeds": torch.zeros_like(cond.added["text_embeds"]),
                                                                "time_ids": cond.added["time_ids"]})
        return cond if self.image_encoder is None else cond.with_added(image_embeds=self._image_embeds()[1])

    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float | list[float] = 1.0) -> Denoiser:
        """eps(x_t, t) of the items conditioned on ``cond``. An LCM UNet (``time_cond_proj_dim``) takes the
        guidance scale as an embedding instead of CFG, as its pipeline; ``control_image`` (N, 3, H, W) in
        [0, 1] feeds the ControlNet (several: (N, K, 3, H, W), one image and one ``control_scale`` per net)."""
        control = None
        if self.controlnet is not None:
            if control_image is None:
                raise ValueError("this model has a ControlNet: give model.control_images (one image per prompt, or one)")
            control = Control(self.controlnet, control_image, control_scale)
        elif control_image is not None:
            raise ValueError("control_images given but the model has no ControlNet: add controlnet: <dir or hub id>")
        timestep_cond = None
        proj = self.unet.config.get("time_cond_proj_dim")
        if proj:
            timestep_cond = guidance_scale_embedding(guidance_scale - 1.0, proj)
            guidance_scale, uncond = 1.0, None
        return Denoiser(self.unet, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                        prediction_type=self.scheduler.config.get("prediction_type", "epsilon"),
                        alphas_cumprod=self.scheduler.alphas_cumprod, control=control, timestep_cond=timestep_cond)


class PretrainedBackbone(UNetBackbone):
    """A Backbone loaded from a hub id, a local diffusers directory, or one .safetensors/.ckpt file (then
    ``model_config``): the ``class_path`` form of the module's ``model:`` key, in float32.

    The family comes from the model (model_index.json's pipeline class, the UNet's config). ``controlnet``:
    a ControlNetModel directory or hub id for this base (a ControlNet pipeline directory brings its own), or a list
    of them: several at once, one control image and one scale each, the residuals summed (``MultiControlNetModel``).
    ``ip_adapter``: an IP-Adapter weights file in its released layout (``models/ip-adapter_sd15.safetensors`` with
    ``models/image_encoder/``), loaded onto the pipeline with diffusers' ``load_ip_adapter`` (``load_ip_adapter``),
    ``ip_adapter_image`` its reference image, ``ip_adapter_scale`` the pipeline's ``set_ip_adapter_scale``.
    ``vae``: another AutoencoderKL directory (e.g. SDXL's fp16-fixed VAE, which needs no float32 upcast).
    Memory at 1024 px: ``vae_checkpointing`` (the decoder's gradient checkpointing: its VJP, the peak at SDXL
    size, keeps block inputs only), ``vae_tiling`` (decode in overlapping tiles), ``unet_checkpointing`` (the
    UNet's own checkpointing inside the chain's with-grad recomputation: lower peak, one more UNet forward).
    """

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 vae_checkpointing: bool = False, controlnet: str | list[str] | None = None, vae: str | None = None,
                 unet_checkpointing: bool = False, vae_tiling: bool = False, ip_adapter: str | None = None,
                 ip_adapter_image: str | None = None, ip_adapter_scale: float = 1.0):
        index = model_index(path, model_config, local_files_only) or {}
        if "transformer" in index and "unet" not in index:
            raise ValueError(f"{path} is an SD3 / FLUX (rectified-flow transformer) model: use "
                             "doodl_lightning.families.PretrainedFlowBackbone (or model: <path>)")
        pipe = load_pipeline(path, model_config, local_files_only)
        net = load_controlnets(controlnet) if controlnet else getattr(pipe, "controlnet", None)
        autoencoder = pipe.vae
        if vae:
            from diffusers import AutoencoderKL

            if not Path(os.path.expanduser(vae)).is_dir():
                raise ModelNotFoundError(f"vae {vae} is not a directory: give an AutoencoderKL directory "
                                         "(config.json + diffusion_pytorch_model.safetensors)")
            with complete_weights():
                autoencoder = AutoencoderKL.from_pretrained(os.path.expanduser(vae), local_files_only=True)
        super().__init__(pipe.unet, autoencoder, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                         text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
                         controlnet=net,
                         force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))
        try:  # scaled-dot-product attention, the fast and memory-lean kernel
            from diffusers.models.attention_processor import AttnProcessor2_0
            for m in (self.unet, self.vae, *controlnet_nets(self.controlnet)):
                m.set_attn_processor(AttnProcessor2_0())
        except Exception:  # noqa: BLE001 - older/newer diffusers already default to SDPA
            pass
        if vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if vae_tiling:
            self.vae.enable_tiling()
        if unet_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for net in controlnet_nets(self.controlnet):
                net.enable_gradient_checkpointing()
        if vae:  # the pipeline kept below holds the VAE in use, not the replaced one (its memory is freed)
            pipe.vae = autoencoder
        self._pipeline = pipe  # the pipeline it is built from: an IP-Adapter loads onto it (``load_ip_adapter``)
        if ip_adapter is not None or ip_adapter_image is not None:
            self.load_ip_adapter(ip_adapter, ip_adapter_image, ip_adapter_scale)
        self.float()  # the module's precision casts it later; loading keeps full precision

    def load_ip_adapter(self, ip_adapter: str | None, image: str | None, scale: float = 1.0) -> None:
        """Load an IP-Adapter onto the pipeline this model is built from with diffusers' ``load_ip_adapter`` (after
        the SDPA processors: its own replace the cross-attention ones) and condition every prompt on ``image``."""
        if self.image_encoder is not None:
            raise ValueError("this model already has an IP-Adapter: give ip_adapter once (one adapter per model)")
        check_ip_adapter(ip_adapter, image, scale)  # a missing file or image: refused before the adapter loads
        load_ip_adapter(self._pipeline, ip_adapter, scale)
        self.use_ip_adapter(self._pipeline.image_encoder.float(), self._pipeline.feature_extractor, image)
