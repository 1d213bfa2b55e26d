"""SANA and SANA-Sprint (Xie et al. 2024, arXiv 2410.10629; Chen et al. 2025, arXiv 2503.09641): linear-attention
flow transformers on a 32x deep-compression autoencoder, behind the same ``Backbone`` interface as SD3 / FLUX.

What the pipelines do, reproduced here (diffusers ``SanaPipeline`` / ``SanaSprintPipeline``):

- Text: Gemma-2's last hidden state. The prompt is lower-cased and stripped (``clean_caption=False``), prefixed with
  the pipelines' *complex human instruction* (a fixed paragraph of prompt-enhancement instructions, joined by new
  lines), tokenised right-padded to (instruction tokens + ``max_sequence_length`` - 2), encoded with its attention
  mask, and then only the first token (``<bos>``) and the last ``max_sequence_length`` - 1 positions are kept
  (SANA paper sec. 3.1): the caption is 300 states whatever the instruction's length. The mask goes with it to the
  transformer's cross-attention. The negative prompt (SANA's CFG) is encoded without the instruction.
- SANA: velocity v(x, t) of a flow-matching transformer (t = the scheduler's timestep x ``timestep_scale``), true
  classifier-free guidance batched in one call; the released model samples with ``DPMSolverMultistepScheduler`` on
  flow sigmas (sampler ``flow_dpm``; a model shipped with ``FlowMatchEulerDiscreteScheduler``: ``flow``).
- SANA-Sprint: guidance-distilled (the guidance scale is an embedding, x ``guidance_embeds_scale``; no CFG) and
  sampled by the sCM consistency sampler (``scm``) in 1-4 steps on the ``SCMScheduler``'s TrigFlow angles (pi/2,
  1.3 for two steps, else linspace to 0), mapped to flow sigmas sigma = sin t / (cos t + sin t): the transformer is
  handed sigma as its timestep, as the pipeline's ``scm_timestep`` (sampling/scm.py derives the equivalence).
- Decoding: ``AutoencoderDC.decode(latents / scaling_factor)`` (no shift factor).

The text encoder (Gemma-2 2B) is kept out of the module as SD3 / FLUX's are (``FlowBackbone``): encoded once at fit
start on the transformer's device, then back to the CPU.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import Tensor

from ..backbone import (Backbone, ModelNotFoundError, apply_memory_options, image_sides, load_dtype_kwargs,
                        load_pipeline)
from ..conditioning import Conditioning
from ..precision import at_least_float32, module_dtype, to_module_dtype
from ..sampling import FlowSchedule, check_guidance_scale
from .flow import FlowBackbone

__all__ = ["PretrainedSanaBackbone", "PretrainedSanaSprintBackbone", "SanaBackbone", "SanaSprintBackbone",
           "SanaVelocity", "pipeline_complex_human_instruction", "scm_schedule"]

# the sampler a SANA model's own scheduler is (what its pipeline samples with)
SCHEDULER_SAMPLERS = {"DPMSolverMultistepScheduler": "flow_dpm", "FlowMatchEulerDiscreteScheduler": "flow"}
# the DPM-Solver settings ``flow_dpm`` reproduces (SANA's released scheduler config)
FLOW_DPM_CONFIG = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                   "prediction_type": "flow_prediction", "use_flow_sigmas": True, "final_sigmas_type": "zero"}
MASK = "encoder_attention_mask"  # the Conditioning's added key: the caption's attention mask, batch-first


def pipeline_complex_human_instruction(pipeline_class: str = "SanaPipeline") -> list[str]:
    """The complex human instruction the pipeline's ``__call__`` uses by default (read from its signature, so it is
    diffusers' own text, never a copy that could drift)."""
    import diffusers

    return list(inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters[
        "complex_human_instruction"].default)


def scm_schedule(scheduler, steps: int, max_timesteps: float = 1.57080, intermediate_timesteps: float = 1.3
                 ) -> FlowSchedule:
    """SanaSprintPipeline's grid as a ``FlowSchedule``: the ``SCMScheduler``'s angles t_i (``max_timesteps``, then
    ``intermediate_timesteps`` for two steps, else linspace to 0), each as the pipeline's float32 ``scm_timestep``
    sigma_i = sin t_i / (cos t_i + sin t_i): the flow sigma and the timestep the transformer is handed."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps, max_timesteps=max_timesteps, intermediate_timesteps=intermediate_timesteps if steps == 2
                    else None)
    t = s.timesteps.float()
    sigma = torch.sin(t) / (torch.cos(t) + torch.sin(t))  # float32, as the pipeline computes it
    sigmas = tuple(float(v) for v in sigma)
    return FlowSchedule(sigmas, sigmas[:-1])


class SanaVelocity:
    """v(x, t) of a ``SanaTransformer2DModel`` as SanaPipeline / SanaSprintPipeline call it.

    ``cond`` / ``uncond``: ``Conditioning``s with Gemma's caption states as ``hidden`` and their attention mask as
    ``added["encoder_attention_mask"]``. ``guidance_embedding`` (SANA-Sprint): the guidance scale handed to the
    transformer's guidance embedding (times ``guidance_embeds_scale``), one conditional row per item; otherwise
    classifier-free guidance (Ho & Salimans 2022) in ONE batched call, rows (uncond, cond), v = v_u + s (v_c - v_u)
    (s = 1: the conditional call only; s = 0: the unconditional only). The timestep is t x ``timestep_scale`` (SANA)
    or t itself (SANA-Sprint's scm_timestep), in float32 as the pipelines hand it. A learned-sigma output's second
    half is dropped. Latents may be float32 while the transformer runs in half precision: v is widened back.
    """

    def __init__(self, transformer, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
                 guidance_embedding: bool = False):
        check_guidance_scale(guidance_scale)
        if not guidance_embedding and guidance_scale not in (0.0, 1.0) and (cond is None or uncond is None):
            raise ValueError(f"guidance_scale={guidance_scale} needs both cond and uncond embeddings")
        self.transformer, self.cond, self.uncond = transformer, cond, uncond
        self.guidance_scale, self.guidance_embedding = float(guidance_scale), guidance_embedding
        self.dtype = module_dtype(transformer, torch.float32)
        cfg = transformer.config
        self.timestep_scale = 1.0 if guidance_embedding else float(cfg.get("timestep_scale", 1.0))
        self.calls = 0

    def _call(self, x: Tensor, t: float, ctx: Conditioning) -> Tensor:
        self.calls += 1
        n = x.shape[0]
        # the pipelines: timestep = t.expand(B) (x timestep_scale), a float32 tensor
        timestep = torch.full((n,), float(t), dtype=torch.float32, device=x.device) * self.timestep_scale
        kwargs = {}
        if self.guidance_embedding:  # guidance = full(g).to(float32) * guidance_embeds_scale
            kwargs["guidance"] = (torch.full((n,), self.guidance_scale, dtype=torch.float32, device=x.device)
                                  * self.transformer.config.guidance_embeds_scale)
        # hidden states positionally: a forward hook (the compute meter) sees the rows evaluated
        out = self.transformer(x, encoder_hidden_states=ctx.hidden.to(x.device, self.dtype),
                               encoder_attention_mask=ctx.added[MASK].to(x.device), timestep=timestep,
                               return_dict=False, **kwargs)[0]
        if self.transformer.config.out_channels // 2 == x.shape[1]:  # learned sigma: the velocity is the first half
            out = out.chunk(2, dim=1)[0]
        return out

    def __call__(self, x: Tensor, t: float) -> Tensor:
        n, s = x.shape[0], self.guidance_scale
        xin = x.to(self.dtype)
        wide = torch.promote_types(x.dtype, torch.float32)
        if self.guidance_embedding or s == 1.0:
            return self._call(xin, t, self.cond.expand(n)).to(wide)
        if s == 0.0:
            return self._call(xin, t, self.uncond.expand(n)).to(wide)
        ctx = Conditioning.cat([self.uncond.expand(n), self.cond.expand(n)])
        v_uncond, v_cond = self._call(torch.cat([xin, xin]), t, ctx).to(wide).chunk(2)
        return v_uncond + s * (v_cond - v_uncond)


class SanaBackbone(FlowBackbone):
    """A frozen SANA model behind the ``Backbone`` interface (a ``FlowBackbone``: the flow samplers run on it).

    ``transformer`` a ``SanaTransformer2DModel``, ``vae`` its ``AutoencoderDC``, ``scheduler`` the model's own
    (``DPMSolverMultistepScheduler`` on flow sigmas, or ``FlowMatchEulerDiscreteScheduler``), ``text_encoder`` Gemma-2
    (``Gemma2Model``) with its ``tokenizer``. ``max_sequence_length``: caption tokens kept (the pipelines' 300).
    ``complex_human_instruction``: the lines prefixed to every prompt (None: the pipeline's own; ``[]``: none).
    ``text_encoder_device``: where prompts are encoded (default the transformer's device).
    """

    pipeline_class = "SanaPipeline"
    guidance_embedding = False  # SANA runs true CFG; SANA-Sprint's guidance is an embedding

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None,
                 max_sequence_length: int = 300, complex_human_instruction: list[str] | None = None,
                 text_encoder_device: str | None = None):
        Backbone.__init__(self)  # FlowBackbone's own __init__ reads SD3 / FLUX components
        self.kind = "sana-sprint" if self.guidance_embedding else "sana"
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()
        # a plain dict: not submodules, so moving or casting the backbone leaves Gemma where it is (the CPU)
        self._text = {"encoders": [text_encoder], "tokenizers": [tokenizer]}
        if not isinstance(max_sequence_length, int) or max_sequence_length < 2:
            raise ValueError(f"max_sequence_length must be an integer >= 2 (Gemma tokens kept), got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        if complex_human_instruction is None:
            complex_human_instruction = pipeline_complex_human_instruction(self.pipeline_class)
        self.complex_human_instruction = list(complex_human_instruction)
        self.text_encoder_device = text_encoder_device
        self.force_zeros_for_empty_prompt = False
        self.freeze()

    # -- what the module and the tools read -----------------------------------------------------------
    @property
    def family(self) -> str:
        """``sana`` or ``sana-sprint``."""
        return self.kind

    @property
    def patch(self) -> int:
        return self.transformer.config.patch_size

    @property
    def vae_scale_factor(self) -> int:
        """The deep-compression autoencoder's down-sampling (32 for the released f32c32), as the pipelines compute it."""
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The pipeline's native side: transformer sample_size x the AE's factor (32 x 32 = 1024 px)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def default_sampler(self) -> str:
        """The sampler of the model's own scheduler: ``flow_dpm`` (DPM-Solver++ 2M, the released SANA's) or ``flow``."""
        name = type(self.scheduler).__name__
        if name not in SCHEDULER_SAMPLERS:
            raise ValueError(f"this SANA model's scheduler is a {name}; its sampler is not reproduced here: give a model "
                             f"with a {' or '.join(SCHEDULER_SAMPLERS)}, or name a sampler ({', '.join(self.samplers)})")
        if name == "DPMSolverMultistepScheduler":
            cfg = self.scheduler.config
            off = {k: cfg.get(k) for k, v in FLOW_DPM_CONFIG.items() if cfg.get(k) != v}
            if off:
                raise ValueError(f"this SANA model's DPMSolverMultistepScheduler has {off}; flow_dpm reproduces "
                                 f"{FLOW_DPM_CONFIG} (SANA's): name a sampler ({', '.join(self.samplers)})")
        return SCHEDULER_SAMPLERS[name]

    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """SANA: 2 with CFG batched, 1 at scale 0 or 1; SANA-Sprint: 1 (guidance is an embedding)."""
        return 1 if self.guidance_embedding or guidance_scale in (0.0, 1.0) else 2

    def check_sampler(self, sampler: str, grid: str | None = None) -> None:
        """One line for a sampler or ``timestep_grid`` this model cannot run (before any file is written)."""
        self._check_grid(grid)
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} needs a diffusion (noise-prediction) model; {self.kind.upper()} is a "
                             f"flow-matching model: use sampler {self.default_sampler} (its pipeline's) or one of "
                             f"{', '.join(s for s in self.samplers if s != self.default_sampler)}, or leave sampler unset")

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None) -> FlowSchedule:
        """The pipeline's grid of ``steps`` steps (``size`` is unused: SANA's shift is static): the scheduler's flow
        sigmas and timesteps after ``set_timesteps(steps)``."""
        self._check_grid(grid)
        return FlowSchedule.from_scheduler(self.scheduler, steps)

    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of a ``height`` x ``width`` image (None: the model's size; one number: a square); each side a
        multiple of the AE's factor x the transformer's patch."""
        f, p = self.vae_scale_factor, self.patch
        height, width = image_sides(height, width, self.default_size, f * p, f"the autoencoder downsamples by {f}")
        return self.transformer.config.in_channels, height // f, width // f

    # -- text -------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], instruction: list[str]) -> Conditioning:
        """``_get_gemma_prompt_embeds`` then ``encode_prompt``'s selection of the pipelines, for ``prompts``."""
        enc, tok = self._text["encoders"][0], self._text["tokenizers"][0]
        if enc is None or tok is None:
            raise ValueError(f"this {self.kind.upper()} model has no text encoder (released, or a directory without it): "
                             "give the whole pipeline directory")
        device = self._ready_encoders()
        tok.padding_side = "right"
        texts = [p.lower().strip() for p in prompts]  # _text_preprocessing without clean_caption
        length = self.max_sequence_length
        if instruction:
            chi = "\n".join(instruction)
            texts = [chi + t for t in texts]
            length = len(tok.encode(chi)) + self.max_sequence_length - 2
        ids = tok(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(device)
        hidden = enc(ids.input_ids.to(device), attention_mask=mask)[0]
        # SANA sec. 3.1: <bos> and the last max_sequence_length - 1 positions (the user prompt after the instruction)
        keep = [0] + list(range(-self.max_sequence_length + 1, 0))
        return Conditioning(hidden[:, keep], {MASK: mask[:, keep]})

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Gemma-2's caption states of each prompt and their attention mask, after the complex human instruction, as
        the pipelines' ``encode_prompt`` (``size`` is unused)."""
        return self._encode(list(prompts), self.complex_human_instruction)

    @torch.no_grad()
    def encode_negative(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """SANA's unconditional input of CFG: the negative prompt encoded without the instruction ("" too), as the
        pipeline. SANA-Sprint runs no CFG: the encoding is returned but unused."""
        return self._encode([prompt], [])

    # -- images -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """AE-encode images in [-1, 1] to float32 latents (x scaling_factor). The deep-compression autoencoder is
        deterministic (no posterior to sample): ``generators`` are accepted and unused."""
        z = self.vae.encode(to_module_dtype(images.to(self.vae.device), self.vae)).latent
        return at_least_float32(z) * self.vae.config.scaling_factor

    # -- the model callable --------------------------------------------------------------------------------
    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0):
        """v(x, t) of the items conditioned on ``cond`` (the flow samplers' model callable): SANA with CFG batched
        against ``uncond``; SANA-Sprint with ``guidance_scale`` as its guidance embedding's value (pipeline default
        4.5)."""
        if control_image is not None:
            raise ValueError(f"control_images given but {self.kind.upper()} models have no ControlNet here: drop "
                             "control_images")
        self.offload_text_encoders()
        cond, uncond = Conditioning.of(cond), Conditioning.of(uncond)
        if cond is None or MASK not in cond.added:
            raise ValueError(f"{self.kind.upper()} needs this backbone's encode_prompts conditioning (caption mask)")
        return SanaVelocity(self.transformer, cond, uncond, guidance_scale, guidance_embedding=self.guidance_embedding)

    def unconditional_velocity(self, uncond: Conditioning, guidance_scale: float):
        """v(x, t) of the negative prompt alone (broadcast to any batch): SANA CFG's unconditional branch, SANA-Sprint's
        at its guidance embedding ``guidance_scale`` (the official one-step baseline's estimate, ``sampling.one_step``)."""
        self.offload_text_encoders()
        uncond = Conditioning.of(uncond)
        if uncond is None or MASK not in uncond.added:
            raise ValueError(f"{self.kind.upper()} needs this backbone's encode_negative conditioning (caption mask)")
        if self.guidance_embedding:
            return SanaVelocity(self.transformer, uncond, None, guidance_scale, guidance_embedding=True)
        return SanaVelocity(self.transformer, None, uncond, 0.0)


class SanaSprintBackbone(SanaBackbone):
    """A frozen SANA-Sprint model: ``SanaBackbone`` with the guidance embedding instead of CFG, sampled by the sCM
    consistency sampler (``scm``, 1-4 steps) on its ``SCMScheduler``'s angles as flow sigmas (``scm_schedule``)."""

    pipeline_class = "SanaSprintPipeline"
    guidance_embedding = True

    @property
    def default_sampler(self) -> str:
        """``scm``: the pipeline's consistency steps (``flow`` is Euler on the same grid)."""
        return "scm"

    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None) -> FlowSchedule:
        """SanaSprintPipeline's grid (``scm_schedule``: pi/2, 1.3 for two steps, else linspace to 0)."""
        self._check_grid(grid)
        return scm_schedule(self.scheduler, steps)


def _load(cls, path: str, model_config: str | None, local_files_only: bool | None, load_dtype: str | None):
    """The diffusers pipeline of a SANA / SANA-Sprint model, refused in one line when it is the other (or another)
    family."""
    pipe = load_pipeline(path, model_config, local_files_only, **load_dtype_kwargs(load_dtype))
    name = type(pipe).__name__
    if name != cls.pipeline_class:
        other = {"SanaPipeline": "PretrainedSanaBackbone", "SanaSprintPipeline": "PretrainedSanaSprintBackbone"}
        use = other.get(name)
        raise ValueError(f"{path} is a {name}, not a {cls.pipeline_class}: use "
                         + (f"doodl_lightning.families.{use}" if use else "the backbone class of its family")
                         + " (or model: <path>)")
    if getattr(pipe, "vae", None) is None:
        raise ModelNotFoundError(f"{path} has no vae: give the whole pipeline directory")
    return pipe


class _Pretrained:
    """What the two SANA families' ``Pretrained*`` classes share (their memory options: ``apply_memory_options``)."""

    without_controlnet = "SANA"


class PretrainedSanaBackbone(_Pretrained, SanaBackbone):
    """A SanaBackbone loaded from a diffusers directory (model_index.json: ``SanaPipeline``), a hub id, or one file
    (+ ``model_config``): the ``class_path`` form of the module's ``model:`` key (``model: <path>`` picks it by itself).

    ``transformer_checkpointing``: the transformer's own gradient checkpointing inside the chain's with-grad
    recomputation; ``vae_tiling``: the AE decodes in tiles; ``load_dtype`` (``bfloat16``, ``float16``, ``float32``):
    the dtype the weights are read in; ``max_sequence_length``, ``complex_human_instruction`` and
    ``text_encoder_device`` as ``SanaBackbone``.
    """

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 transformer_checkpointing: bool = False, vae_checkpointing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int = 300, complex_human_instruction: list[str] | None = None,
                 text_encoder_device: str | None = None, load_dtype: str | None = None):
        pipe = _load(type(self), path, model_config, local_files_only, load_dtype)
        SanaBackbone.__init__(self, pipe.transformer, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer,
                              max_sequence_length, complex_human_instruction, text_encoder_device)
        apply_memory_options(self, transformer_checkpointing, vae_checkpointing, vae_tiling, load_dtype)


class PretrainedSanaSprintBackbone(_Pretrained, SanaSprintBackbone):
    """A SanaSprintBackbone loaded from a diffusers directory (model_index.json: ``SanaSprintPipeline``), a hub id, or
    one file (+ ``model_config``); options as ``PretrainedSanaBackbone``."""

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 transformer_checkpointing: bool = False, vae_checkpointing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int = 300, complex_human_instruction: list[str] | None = None,
                 text_encoder_device: str | None = None, load_dtype: str | None = None):
        pipe = _load(type(self), path, model_config, local_files_only, load_dtype)
        SanaSprintBackbone.__init__(self, pipe.transformer, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer,
                                    max_sequence_length, complex_human_instruction, text_encoder_device)
        apply_memory_options(self, transformer_checkpointing, vae_checkpointing, vae_tiling, load_dtype)
