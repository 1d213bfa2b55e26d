"""SD3 / SD3.5 and FLUX.1: rectified-flow transformers behind the same ``Backbone`` interface as the UNet families.

The interface is the UNet families' (``encode_prompts`` -> ``Conditioning``, ``denoiser``, ``decode``,
``latent_shape``, ``schedule``, ``default_sampler``), so the module, the CLI and the chain's gradient code serve
them unchanged; what differs is behind it:

- the model callable is the flow velocity v(x, t) (t = sigma * 1000, as the pipelines hand it), run by the
  ``flow`` (Euler, the pipelines' own sampler) and ``flow_edict`` (EDICT's exactly invertible coupling on the
  Euler step) samplers over a ``FlowSchedule`` -- the grid the pipeline builds (SD3: the scheduler's shift;
  FLUX: sigmas linspace(1, 1/n, n), shifted by mu from the image's token count for FLUX.1-dev).
- SD3: CLIP-L and CLIP-G (penultimate states, zero-padded to T5's width, then T5's tokens: the joint sequence;
  pooled = the two CLIP projections concatenated), optional T5; classifier-free guidance batched in one call;
  optional skip-layer guidance (``skip_guidance_layers``: one more transformer call with those blocks skipped,
  inside a window of the steps, as StableDiffusion3Pipeline).
- FLUX.1: CLIP pooled + T5; the module's latents stay (N, 16, h, w) and are packed into 2x2-patch tokens
  inside the velocity call; FLUX.1-dev's guidance is an embedding (``guidance_scale``), FLUX.1-schnell has none.
  True CFG (``true_cfg_scale`` > 1, FluxPipeline's) adds the negative prompt's velocity, batched in the same call;
  at the default 1 the negative prompt is unused.
- Decoding: ``vae.decode(latents / scaling_factor + shift_factor)`` (``objective.decode_latents``).

Text encoders (T5-XXL alone is 4.7 B parameters) are not submodules: moving or casting the backbone (Lightning's
device placement, the precision's cast) leaves them on the CPU. ``encode_prompts`` brings them to the
transformer's device (or ``text_encoder_device``) in its dtype (float32 under float16: T5 overflows in float16),
encodes, and the first ``denoiser`` call sends them back to the CPU: the prompts are encoded once at fit start
and the encoders hold no accelerator memory while the latents are optimised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbone import (Backbone, ModelNotFoundError, apply_memory_options, image_sides, load_dtype_kwargs,
                        load_pipeline, pipeline_class_name)
from ..conditioning import Conditioning
from ..checks import check_finite
from ..precision import module_dtype
from ..sampling import FlowSchedule, check_guidance_scale
from .flux_layout import FluxVelocity

__all__ = ["FLOW_FAMILIES", "FlowBackbone", "PretrainedFlowBackbone", "SD3Velocity", "SkipLayerGuidance", "flow_family"]

FLOW_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def flow_family(transformer) -> str:
    """``sd3`` or ``flux`` from the transformer's class (or a subclass of it)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FLOW_FAMILIES:
            return FLOW_FAMILIES[cls.__name__]
    raise ValueError(f"{type(transformer).__name__} is not a rectified-flow transformer this backbone serves: give an "
                     "SD3Transformer2DModel (SD3 / SD3.5) or a FluxTransformer2DModel (FLUX.1)")


@dataclass(frozen=True)
class SkipLayerGuidance:
    """StableDiffusion3Pipeline's skip-layer guidance (SLG, the SD3.5 recipe after STG, Hyung et al. 2024): at the
    steps i of an n-step chain with n * start < i < n * stop, one more transformer call on the conditional rows with
    the joint blocks ``layers`` skipped, and v <- v + scale (v_cond - v_skip) after CFG. The pipeline's names:
    ``skip_guidance_layers``, ``skip_layer_guidance_scale`` (2.8), ``_start`` (0.01), ``_stop`` (0.2)."""

    layers: tuple[int, ...]
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        check_finite(skip_layer_guidance_scale=self.scale, skip_layer_guidance_start=self.start,
                     skip_layer_guidance_stop=self.stop)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"skip_guidance_layers must be distinct block indices, got {list(self.layers)}: give e.g. "
                             "[7, 8, 9] (SD3.5 Medium's), or null for no skip-layer guidance")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"skip-layer guidance needs 0 <= skip_layer_guidance_start < skip_layer_guidance_stop <= 1 "
                             f"(fractions of the steps), got {self.start} and {self.stop}")

    def check_layers(self, num_layers: int) -> None:
        """One line when a skipped block is not one of the transformer's ``num_layers`` joint blocks."""
        bad = [i for i in self.layers if isinstance(i, bool) or not (isinstance(i, int) and 0 <= i < num_layers)]
        if bad:
            raise ValueError(f"skip_guidance_layers {bad} out of range: this SD3 transformer has {num_layers} joint "
                             f"blocks, numbered 0 to {num_layers - 1}")

    def window(self, schedule: FlowSchedule) -> frozenset:
        """The timesteps of ``schedule`` (the whole chain) at which the pipeline runs the skip-layer call."""
        n = len(schedule)  # the pipeline's num_inference_steps; i its loop index over the same timesteps
        return frozenset(t for i, t in enumerate(schedule.timesteps) if n * self.start < i < n * self.stop)


class SD3Velocity:
    """v(x, t) of an ``SD3Transformer2DModel`` as StableDiffusion3Pipeline calls it, classifier-free guidance
    (Ho & Salimans 2022) batched into ONE call: rows (uncond, cond), v = v_u + s (v_c - v_u).

    ``cond`` / ``uncond``: ``Conditioning``s with the joint text sequence as ``hidden`` and ``added
    ["pooled_projections"]``. s = 1: the conditional call only; s = 0: the unconditional only (as ``Denoiser``).
    Latents may be float32 while the transformer runs in half precision: inputs are cast to its dtype, v is
    widened back (the guidance combination in float32 or wider).

    ``skip``: skip-layer guidance, applied where the pipeline applies it (with CFG, s > 1) at the timesteps of
    ``grid["active"]`` -- the window of the grid the backbone built last (``FlowBackbone.schedule``), read at call
    time, since the chain may build its grid after its model callable.
    """

    def __init__(self, transformer, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
                 skip: SkipLayerGuidance | None = None, grid: dict | None = None):
        check_guidance_scale(guidance_scale)
        if guidance_scale not in (0.0, 1.0) and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={guidance_scale} needs both cond and uncond embeddings")
        self.transformer, self.cond, self.uncond = transformer, cond, uncond
        self.guidance_scale = float(guidance_scale)
        self.skip, self.grid = (skip, grid if grid is not None else {}) if guidance_scale > 1 else (None, None)
        self.dtype = module_dtype(transformer, torch.float32)
        self.calls = 0

    def _call(self, x: Tensor, t: float, ctx: Conditioning, **kw) -> Tensor:
        self.calls += 1
        # the pipeline: timestep = t.expand(B), t the scheduler's float32 timestep
        timestep = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        # hidden states positionally: a forward hook (the compute meter) sees the rows evaluated
        return self.transformer(x, encoder_hidden_states=ctx.hidden.to(x.device, self.dtype),
                                pooled_projections=ctx.added["pooled_projections"].to(x.device, self.dtype),
                                timestep=timestep, return_dict=False, **kw)[0]

    def _skipping(self, t: float) -> bool:
        if self.skip is None:
            return False
        if t not in self.grid.get("timesteps", ()):
            # a window is a set of step indices of one grid; a timestep off the last grid built has none
            raise RuntimeError(f"timestep {t} is not on the grid this SD3 backbone built last: skip-layer guidance's "
                               "window is that grid's steps; build the grid (backbone.schedule) of the chain you run")
        return t in self.grid["active"]

    def __call__(self, x: Tensor, t: float) -> Tensor:
        n, s = x.shape[0], self.guidance_scale
        xin = x.to(self.dtype)
        wide = torch.promote_types(x.dtype, torch.float32)
        if s == 1.0:
            return self._call(xin, t, self.cond.expand(n)).to(wide)
        if s == 0.0:
            return self._call(xin, t, self.uncond.expand(n)).to(wide)
        ctx = Conditioning.cat([self.uncond.expand(n), self.cond.expand(n)])
        v_uncond, v_cond = self._call(torch.cat([xin, xin]), t, ctx).to(wide).chunk(2)
        v = v_uncond + s * (v_cond - v_uncond)
        if self._skipping(t):
            # the pipeline's extra call: the conditional rows alone, the chosen joint blocks skipped
            v_skip = self._call(xin, t, self.cond.expand(n), skip_layers=list(self.skip.layers)).to(wide)
            v = v + (v_cond - v_skip) * self.skip.scale
        return v


class FlowBackbone(Backbone):
    """A frozen rectified-flow text-to-image model (SD3 / SD3.5 or FLUX.1) behind the ``Backbone`` interface.

    ``transformer`` an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (the family comes from it), ``vae``
    the 16-channel ``AutoencoderKL`` (scaling and shift factor in its config), ``scheduler`` its
    ``FlowMatchEulerDiscreteScheduler``. Text: SD3 ``text_encoder`` / ``text_encoder_2`` (CLIP-L / CLIP-G with
    projection) and optional ``text_encoder_3`` (T5); FLUX ``text_encoder`` (CLIP) and ``text_encoder_2`` (T5),
    each with its tokenizer. ``max_sequence_length``: T5 tokens (default the pipeline's: SD3 256, FLUX.1-dev 512,
    FLUX.1-schnell 256). ``text_encoder_device``: where prompts are encoded (default the transformer's device).

    Guidance options of the pipelines, with their names and defaults: ``true_cfg_scale`` (FLUX only, FluxPipeline's
    true CFG: 1 = off; above 1 the negative prompt's velocity v_n is added, v = v_n + s (v_c - v_n), the guidance
    embedding given to both); ``skip_guidance_layers`` (SD3 only, with ``skip_layer_guidance_scale`` / ``_start`` /
    ``_stop``: ``SkipLayerGuidance``, active with CFG, guidance_scale > 1, as in StableDiffusion3Pipeline).
    """

    schedule_type = FlowSchedule  # the flow samplers: flow, flow_edict, and any registered later
    supports_cuda_graphs = False  # the graph replay (cuda_graphs.GraphedUNet) takes a UNet's call only
    # the guidance options off, for families built on this class that set their own state instead of calling __init__
    true_cfg_scale: float = 1.0
    skip_layer_guidance: SkipLayerGuidance | None = None

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, max_sequence_length: int | None = None,
                 text_encoder_device: str | None = None, true_cfg_scale: float = 1.0,
                 skip_guidance_layers: list[int] | None = None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_start: float = 0.01, skip_layer_guidance_stop: float = 0.2):
        super().__init__()
        self.kind = flow_family(transformer)
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        encoders = [text_encoder, text_encoder_2] + ([text_encoder_3] if self.kind == "sd3" else [])
        tokenizers = [tokenizer, tokenizer_2] + ([tokenizer_3] if self.kind == "sd3" else [])
        for enc in encoders:
            if enc is not None:
                enc.requires_grad_(False).eval()
        # a plain dict: not submodules, so moving or casting the backbone leaves them where they are (the CPU)
        self._text = {"encoders": encoders, "tokenizers": tokenizers}
        if max_sequence_length is None:
            long = self.kind == "flux" and transformer.config.get("guidance_embeds", False)
            max_sequence_length = 512 if long else 256
        if not 1 <= int(max_sequence_length) <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (T5 tokens), got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self.text_encoder_device = text_encoder_device
        self.force_zeros_for_empty_prompt = False
        self.true_cfg_scale = self._check_true_cfg(true_cfg_scale)
        self.skip_layer_guidance = self._check_skip_layers(skip_guidance_layers, skip_layer_guidance_scale,
                                                           skip_layer_guidance_start, skip_layer_guidance_stop)
        self._grid: dict = {}  # the last grid built: its timesteps and skip-layer window (read by SD3Velocity)
        self.freeze()

    def _check_true_cfg(self, scale: float) -> float:
        check_finite(true_cfg_scale=scale)
        if scale != 1.0 and self.kind != "flux":
            raise ValueError(f"true_cfg_scale is FluxPipeline's (FLUX.1); {self.kind.upper()} runs classifier-free "
                             "guidance with guidance_scale: drop true_cfg_scale")
        if scale < 1.0:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 = off, as FluxPipeline; above 1 the negative prompt's "
                             f"velocity guides), got {scale}")
        return float(scale)

    def _check_skip_layers(self, layers, scale: float, start: float, stop: float) -> SkipLayerGuidance | None:
        if layers is None:
            return None
        if self.kind != "sd3":
            raise ValueError(f"skip_guidance_layers is StableDiffusion3Pipeline's (SD3 / SD3.5); {self.kind.upper()} has "
                             "no skip-layer guidance: drop skip_guidance_layers")
        slg = SkipLayerGuidance(tuple(layers), float(scale), float(start), float(stop))
        slg.check_layers(self.transformer.config.num_layers)
        return slg

    # -- what the module and the tools read -----------------------------------------------------------
    @property
    def unet(self):
        """The denoising network (here the transformer) under the name the UNet families' tools use (the
        compute meter's forward hook, the resume fingerprint, the benchmarks)."""
        return self.transformer

    @property
    def text_encoders(self) -> list:
        return list(self._text["encoders"])

    @property
    def text_encoder(self):
        """CLIP-L (both families' first text tower)."""
        return self._text["encoders"][0]

    @property
    def family(self) -> str:
        """``sd3`` (SD3 / SD3.5) or ``flux`` (FLUX.1-dev / -schnell)."""
        return self.kind

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.transformer)

    @property
    def patch(self) -> int:
        """Latent pixels per token side: SD3's patch size; FLUX packs 2x2 latent patches."""
        return self.transformer.config.patch_size if self.kind == "sd3" else 2

    @property
    def default_size(self) -> int:
        """The pipeline's default image side: SD3 transformer sample_size x VAE factor; FLUX 128 x VAE factor (1024)."""
        sample = self.transformer.config.sample_size if self.kind == "sd3" else 128
        return sample * self.vae_scale_factor

    @property
    def default_sampler(self) -> str:
        """``flow``: Euler on the pipeline's grid, the pipeline's own sampler (``flow_edict`` is the invertible one)."""
        return "flow"

    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """SD3: 2 with CFG batched, 1 at scale 0 or 1 (skip-layer guidance's extra call counts as more evaluations);
        FLUX: 1 (guidance is an embedding, or none), 2 with true CFG batched."""
        if self.kind == "flux":
            return 2 if self.true_cfg_scale > 1 else 1
        return 1 if guidance_scale in (0.0, 1.0) else 2

    def check_sampler(self, sampler: str, grid: str | None = None) -> None:
        """One line for a sampler or ``timestep_grid`` a flow model cannot run (before any file is written)."""
        self._check_grid(grid)
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} needs a diffusion (noise-prediction) model; {self.kind.upper()} is a "
                             "rectified-flow model: use sampler flow (Euler, its pipeline's) or flow_edict (exactly "
                             "invertible), or leave sampler unset")

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None) -> FlowSchedule:
        """The pipeline's grid of ``steps`` steps for images of ``size`` (height, width) in pixels (default the
        model's): SD3 the scheduler's (static shift; dynamic shifting from the token count if configured),
        FLUX sigmas linspace(1, 1/steps, steps) shifted by mu of the packed token count (FLUX.1-dev)."""
        self._check_grid(grid)
        h, w = size or (self.default_size, self.default_size)
        f = self.vae_scale_factor
        tokens = (h // f // self.patch) * (w // f // self.patch)
        if self.kind == "sd3":
            schedule = FlowSchedule.from_scheduler(self.scheduler, steps, image_seq_len=tokens)
        else:
            schedule = FlowSchedule.flux(self.scheduler, steps, image_seq_len=tokens)
        if self.skip_layer_guidance is not None:  # in place: velocities built before the grid read it when called
            self._grid.update(timesteps=frozenset(schedule.timesteps),
                              active=self.skip_layer_guidance.window(schedule))
        return schedule

    def _check_grid(self, grid: str | None) -> None:
        if grid not in (None, "model"):
            raise ValueError(f"timestep_grid {grid!r} is a DDIM grid; {self.kind.upper()} samples on its pipeline's "
                             "flow-matching grid: drop timestep_grid (or set it to model)")

    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(16, h, w) of a ``height`` x ``width`` image (None: the model's size; one number: a square); the latent
        sides must split into the transformer's patches (SD3 patch_size, FLUX 2x2), within SD3's position table."""
        f, p = self.vae_scale_factor, self.patch

        def within_positions(name: str, res: int) -> None:
            limit = self.transformer.config.get("pos_embed_max_size") if self.kind == "sd3" else None
            if limit and res // (f * p) > limit:
                raise ValueError(f"{name} {res} is larger than this SD3 model's position table allows "
                                 f"({limit} patches = {limit * f * p} px): use at most {limit * f * p}")

        how = "packs 2x2 latent patches" if self.kind == "flux" else f"cuts {p}x{p} latent patches"
        height, width = image_sides(height, width, self.default_size, f * p,
                                    f"the VAE downsamples by {f} and {self.kind.upper()} {how}", within_positions)
        channels = self.transformer.config.in_channels // (4 if self.kind == "flux" else 1)
        return channels, height // f, width // f

    # -- text -------------------------------------------------------------------------------------------
    def _encoding_place(self) -> tuple[torch.device, torch.dtype]:
        device = torch.device(self.text_encoder_device) if self.text_encoder_device else self.transformer.device
        dtype = self.dtype
        return device, (torch.float32 if dtype == torch.float16 else dtype)  # T5 overflows in float16

    def _ready_encoders(self) -> torch.device:
        """The text encoders on the encoding device and dtype (moved once; ``offload_text_encoders`` undoes the move)."""
        device, dtype = self._encoding_place()
        for enc in self._text["encoders"]:
            if enc is not None and (enc.device != device or module_dtype(enc) != dtype):
                enc.to(device=device, dtype=dtype)
        return device

    def offload_text_encoders(self) -> None:
        """Send the text encoders back to the CPU (a no-op when they are there): called by ``denoiser``, so they hold
        no accelerator memory while the chain runs."""
        for enc in self._text["encoders"]:
            if enc is not None and enc.device.type != "cpu":
                enc.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release_text_encoders(self) -> None:
        """Drop the text encoders (benchmarks: only the embeddings are needed after encoding)."""
        self._text["encoders"] = [None] * len(self._text["encoders"])

    def _tokens(self, tokenizer, prompts: list[str], length: int) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    def _t5(self, encoder, tokenizer, prompts: list[str], device, dtype) -> Tensor:
        if encoder is None:  # SD3 without T5: zeros, as its pipeline
            return torch.zeros((len(prompts), self.max_sequence_length, self.transformer.config.joint_attention_dim),
                               device=device, dtype=dtype)
        return encoder(self._tokens(tokenizer, prompts, self.max_sequence_length).to(device))[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of each prompt, as the family's pipeline builds it (``size`` is unused: no
        micro-conditioning). SD3: ``hidden`` = [CLIP-L | CLIG-G penultimate states, zero-padded to T5's width ;
        T5 states] along the sequence, ``added["pooled_projections"]`` = [CLIP-L | CLIP-G] projections. FLUX:
        ``hidden`` = T5 states, ``added["pooled_projections"]`` = the CLIP pooled output."""
        encs, toks = self._text["encoders"], self._text["tokenizers"]
        if encs[0] is None or encs[1] is None or toks[0] is None or toks[1] is None:
            raise ValueError(f"this {self.kind.upper()} model has no text encoders (released, or a directory without "
                             "them): give the whole pipeline directory")
        device = self._ready_encoders()
        dtype = module_dtype(encs[0])
        prompts = list(prompts)
        if self.kind == "flux":
            pooled = encs[0](self._tokens(toks[0], prompts, toks[0].model_max_length).to(device),
                             output_hidden_states=False).pooler_output
            t5 = self._t5(encs[1], toks[1], prompts, device, dtype)
            return Conditioning(t5, {"pooled_projections": pooled.to(t5.dtype)})
        length = toks[0].model_max_length  # the pipeline's tokenizer_max_length, for both CLIP towers
        hidden, pooled = [], []
        for enc, tok in zip(encs[:2], toks[:2]):
            out = enc(self._tokens(tok, prompts, length).to(device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = self._t5(encs[2], toks[2], prompts, device, dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                            {"pooled_projections": torch.cat(pooled, dim=-1)})

    @torch.no_grad()
    def encode_negative(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """SD3's unconditional input of CFG: the negative prompt encoded ("" too, as its pipeline). FLUX: true CFG's
        negative prompt (unused at ``true_cfg_scale`` 1)."""
        return self.encode_prompts([prompt], size)

    # -- the model callable --------------------------------------------------------------------------------
    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0):
        """v(x, t) of the items conditioned on ``cond`` (the flow samplers' model callable). SD3: CFG with
        ``uncond`` at ``guidance_scale``, batched (and skip-layer guidance if configured); FLUX.1-dev:
        ``guidance_scale`` is the guidance embedding's value (its pipeline's default 3.5), FLUX.1-schnell ignores it;
        FLUX true CFG with ``uncond`` at the backbone's ``true_cfg_scale``; latents packed inside the call."""
        if control_image is not None:
            raise ValueError("control_images given but SD3/FLUX models have no ControlNet here: drop control_images")
        self.offload_text_encoders()
        cond, uncond = Conditioning.of(cond), Conditioning.of(uncond)
        if cond is None or "pooled_projections" not in cond.added:
            raise ValueError(f"{self.kind.upper()} needs this backbone's encode_prompts conditioning (pooled projections)")
        if self.kind == "sd3":
            return SD3Velocity(self.transformer, cond, uncond, guidance_scale, self.skip_layer_guidance, self._grid)
        check_guidance_scale(guidance_scale)
        negative = {}
        if self.true_cfg_scale > 1:
            if uncond is None or "pooled_projections" not in uncond.added:
                raise ValueError("true_cfg_scale > 1 needs the negative prompt's encode_negative conditioning as uncond")
            negative = dict(negative_prompt_embeds=uncond.hidden,
                            negative_pooled_prompt_embeds=uncond.added["pooled_projections"],
                            true_cfg_scale=self.true_cfg_scale)
        return FluxVelocity(self.transformer, cond.hidden, cond.added["pooled_projections"], guidance_scale, **negative)

    def unconditional_velocity(self, uncond: Conditioning, guidance_scale: float):
        """v(x, t) of the negative prompt alone (broadcast to any batch): SD3 CFG's unconditional branch, FLUX true
        CFG's negative branch at the guidance embedding ``guidance_scale``. The official one-step baseline's
        estimate comes from the unconditional prediction (``sampling.one_step``)."""
        self.offload_text_encoders()
        uncond = Conditioning.of(uncond)
        if uncond is None or "pooled_projections" not in uncond.added:
            raise ValueError(f"{self.kind.upper()} needs this backbone's encode_negative conditioning (pooled projections)")
        if self.kind == "sd3":
            return SD3Velocity(self.transformer, None, uncond, 0.0)
        if self.kind != "flux":  # a family built on this class answers for its own unconditional branch
            raise ValueError(f"{self.kind} has no unconditional velocity here: the one-step baseline needs one "
                             "(override unconditional_velocity for this family)")
        check_guidance_scale(guidance_scale)
        return FluxVelocity(self.transformer, uncond.hidden, uncond.added["pooled_projections"], guidance_scale)


class PretrainedFlowBackbone(FlowBackbone):
    """A FlowBackbone loaded from a diffusers directory (model_index.json: ``StableDiffusion3Pipeline`` or
    ``FluxPipeline``), a hub id, or one file (+ ``model_config``): the ``class_path`` form of the module's
    ``model:`` key (``model: <path>`` picks it by itself for such a model).

    ``transformer_checkpointing``: the transformer's own gradient checkpointing inside the chain's with-grad
    recomputation (lower peak, one more forward per step); ``vae_checkpointing`` / ``vae_tiling`` as for the UNet
    families; ``t5: false`` (SD3 only) loads the model without its T5 encoder, whose tokens are then zeros, as
    StableDiffusion3Pipeline with ``text_encoder_3=None`` (4.7 B parameters fewer; FLUX needs its T5); ``load_dtype`` (``bfloat16``, ``float16``, ``float32``): the dtype the weights are read in (FLUX.1's
    12 B parameters are 48 GB in float32; the run's precision casts the transformer and VAE anyway, and the text
    encoders compute in it); ``max_sequence_length``, ``text_encoder_device``, ``true_cfg_scale`` (FLUX) and the
    ``skip_guidance_layers`` / ``skip_layer_guidance_*`` keys (SD3) as ``FlowBackbone``.
    """

    without_controlnet = "SD3 / FLUX"

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 transformer_checkpointing: bool = False, vae_checkpointing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int | None = None, text_encoder_device: str | None = None,
                 load_dtype: str | None = None, t5: bool = True, true_cfg_scale: float = 1.0,
                 skip_guidance_layers: list[int] | None = None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_start: float = 0.01, skip_layer_guidance_stop: float = 0.2):
        extra = load_dtype_kwargs(load_dtype)
        if not t5:
            if pipeline_class_name(path, model_config, local_files_only) == "FluxPipeline":
                raise ValueError("t5: false is for SD3 (its T5 is optional); FLUX conditions on T5: drop t5")
            extra.update(text_encoder_3=None, tokenizer_3=None)
        pipe = load_pipeline(path, model_config, local_files_only, **extra)
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "unet", None) is not None:
            raise ValueError(f"{path} is a {type(pipe).__name__}, not an SD3 / FLUX model: use "
                             "doodl_lightning.families.PretrainedBackbone (or model: <path>)")
        if getattr(pipe, "vae", None) is None:
            raise ModelNotFoundError(f"{path} has no vae: give the whole pipeline directory")
        kw = dict(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                  tokenizer_2=pipe.tokenizer_2)
        if flow_family(pipe.transformer) == "sd3":
            kw.update(text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)
        super().__init__(pipe.transformer, pipe.vae, pipe.scheduler, max_sequence_length=max_sequence_length,
                         text_encoder_device=text_encoder_device, true_cfg_scale=true_cfg_scale,
                         skip_guidance_layers=skip_guidance_layers, skip_layer_guidance_scale=skip_layer_guidance_scale,
                         skip_layer_guidance_start=skip_layer_guidance_start,
                         skip_layer_guidance_stop=skip_layer_guidance_stop, **kw)
        apply_memory_options(self, transformer_checkpointing, vae_checkpointing, vae_tiling, load_dtype)
