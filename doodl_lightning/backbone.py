"""The frozen text-to-image model: UNet, VAE, text encoder, tokenizer and noise schedule."""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .conditioning import Conditioning
from .frozen import leave_out_of_checkpoints
from .objective import decode_latents
from .precision import at_least_float32, module_dtype, to_module_dtype
from .sampling import Control, Denoiser

class ModelNotFoundError(FileNotFoundError):
    pass


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@contextmanager
def _naming_bad_weights(files: list[Path]):
    """When loading fails, name the first weights file that cannot be read safely (truncated, corrupt, or a
    pickle holding more than tensors) in one line with the fix; other failures pass through unchanged.
    diffusers' own message names the file but comes with a traceback, or none for a refused pickle."""
    try:
        yield
    except Exception:
        from .io import weights_file_problem

        for f in files:
            problem = weights_file_problem(f)
            if problem:
                raise ValueError(f"model weights file {f} is {problem}: re-download or re-save the model "
                                 "(a pickle from a trusted source: convert it to .safetensors)") from None
        raise


# the loggers through which diffusers and transformers report weights a file lacks or has in excess
_LOADING_LOGGERS = ("diffusers.models.modeling_utils", "transformers.modeling_utils")


class _HeldRecords(logging.Filter):
    """Holds every record of a logger back (``records``), to be printed or dropped once the load is judged."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _weights_files(folder: Path) -> list[Path]:
    """The weight files a library reads in ``folder`` (its .safetensors; the others only when it has none)."""
    files = sorted(f for f in folder.glob("*") if f.suffix in _WEIGHT_SUFFIXES) if folder.is_dir() else []
    safe = [f for f in files if f.suffix == ".safetensors"]
    return safe or files


def _common_prefix(keys: list[str]) -> str:
    """The leading dotted components every key shares ('' for none), e.g. ``model.diffusion_model.``."""
    parts = [k.split(".") for k in keys]
    prefix = []
    for level in zip(*(p[:-1] for p in parts)):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) + "." if prefix else ""


def _missing_weights_problem(cls, path: str, info: dict) -> str | None:
    """One line when a component was built with weights its file lacks (the library initialises them at random:
    a run would optimise against noise, loss NaN, and exit 0), naming the file, the keys and the fix."""
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return None
    unexpected = sorted(info.get("unexpected_keys") or [])
    files = _weights_files(Path(path))
    where = ", ".join(map(str, files)) if files else path
    line = (f"model weights file {where} does not fit {cls.__name__}: {len(missing)} of the model's weights are not "
            f"in the file (e.g. {missing[0]})")
    if unexpected:
        prefix, wanted = _common_prefix(unexpected), set(missing)
        line += f"; the file has {len(unexpected)} keys the model does not use (e.g. {unexpected[0]})"
        if prefix and any(k[len(prefix):] in wanted for k in unexpected):
            line += (f", all under the prefix {prefix!r} (an original-layout checkpoint, not diffusers'): convert it "
                     "to the diffusers layout, or give the original file itself as model: FILE with model_config: DIR")
            return line
    return line + ": re-save the model with save_pretrained or re-download it (a weights file of another model or " \
                  "version does not fit this config)"


@contextmanager
def _complete_weights():
    """Refuse (one ``ValueError``) a model any of whose components got weights its file lacks.

    diffusers and transformers initialise such weights at random and only log a warning, so a file whose keys
    carry another prefix (``model.diffusion_model.``, as original-layout checkpoints have) ran to exit 0 with a
    NaN loss. Their ``from_pretrained`` reports the keys with ``output_loading_info=True``; the pipeline loaders
    call it without, so for the load it is asked for here (the two base classes' method, restored after), and
    the libraries' own warnings are held back: printed when the load is accepted, replaced by the one line when
    it is refused. Keys in the file that the model does not use, with none missing, are accepted (every weight
    came from the file), with the libraries' warning."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    problems: list[str] = []
    originals = {owner: owner.__dict__["from_pretrained"] for owner in (ModelMixin, PreTrainedModel)}

    def reporting(func):
        @functools.wraps(func)
        def from_pretrained(cls, path, *args, **kwargs):
            if kwargs.get("output_loading_info"):
                return func(cls, path, *args, **kwargs)
            model, info = func(cls, path, *args, output_loading_info=True, **kwargs)
            problem = _missing_weights_problem(cls, str(path), info)
            if problem:
                problems.append(problem)
            return model
        return classmethod(from_pretrained)

    held = _HeldRecords()
    loggers = [logging.getLogger(name) for name in _LOADING_LOGGERS]
    for owner, original in originals.items():
        owner.from_pretrained = reporting(original.__func__)
    for logger in loggers:
        logger.addFilter(held)
    try:
        yield
    finally:
        for owner, original in originals.items():
            owner.from_pretrained = original
        for logger in loggers:
            logger.removeFilter(held)
    if problems:
        raise ValueError(problems[0])
    for record in held.records:
        logging.getLogger(record.name).handle(record)


# model_index.json's pipeline class -> the family it is (SD3 / FLUX, rectified-flow transformers, are served by
# doodl_lightning.families.flow); any other text-to-image UNet pipeline is read by its components
_PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionControlNetPipeline": "sd", "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
}
FLOW_PIPELINE_FAMILIES = ("sd3", "flux")


def model_family(model: str, model_config: str | None = None, local_files_only: bool | None = None) -> str | None:
    """The family model_index.json names (``_PIPELINE_FAMILIES``) of a local directory, a single file's config
    directory or a hub id (its model_index.json alone, from the cache offline); None when it cannot be read
    (the loader then says why) or names another pipeline."""
    path = Path(os.path.expanduser(model))
    if path.is_file():
        path = Path(os.path.expanduser(model_config)) if model_config else None
    if path is not None and path.is_dir():
        return _PIPELINE_FAMILIES.get(_pipeline_class_name(path))
    if path is not None or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return None
    try:
        import json

        from huggingface_hub import hf_hub_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") if local_files_only is None else local_files_only
        index = hf_hub_download(model, "model_index.json", local_files_only=offline)
        return _PIPELINE_FAMILIES.get(json.loads(Path(index).read_text()).get("_class_name"))
    except Exception:  # noqa: BLE001 - unreachable, not cached, gated: the pipeline loader reports it
        return None


def _pipeline_class_name(path: Path) -> str | None:
    import json

    index = path / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def _pipeline_class(name: str | None):
    """The diffusers pipeline class named in model_index.json; one line for a family we do not serve."""
    import diffusers

    cls = getattr(diffusers, name, None) if name else diffusers.StableDiffusionPipeline
    if cls is None:
        raise ValueError(f"model_index.json names pipeline class {name!r}, which this diffusers does not have: "
                         "give a Stable Diffusion 1.x/2.x, SDXL, LCM, ControlNet, SD3 or FLUX pipeline directory")
    return cls


def _pipeline_kwargs(cls) -> dict:
    import inspect

    # low_cpu_mem_usage needs accelerate; asking for it without accelerate prints an install hint per load
    kwargs = dict(low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def _load_pipeline(model: str, config: str | None, local_files_only: bool | None, **extra):
    """A diffusers pipeline from a hub id, a local directory or a single file (+ its config directory), its
    class taken from the model itself (model_index.json), so no family flag has to be right. ``extra``: more
    ``from_pretrained`` arguments (``torch_dtype``)."""
    from diffusers import DiffusionPipeline

    path = Path(os.path.expanduser(model))
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".bin"):
            raise ValueError(f"{model}: a single-file checkpoint must be .safetensors or .ckpt")
        # the original-format file holds weights only; the pipeline layout comes from a local
        # diffusers config directory (e.g. a copy of the model's repo without its weights)
        if config is None:
            raise ValueError(f"{model} is a single file: also give model_config, a local diffusers directory "
                             "with the model's configs (model_index.json, unet/config.json, ...)")
        cls = _pipeline_class(_pipeline_class_name(Path(os.path.expanduser(config))))
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        try:
            with _naming_bad_weights([path]):
                return cls.from_single_file(str(path), config=config, local_files_only=True, **_pipeline_kwargs(cls),
                                            **extra)
        except SingleFileComponentError as e:  # a multi-line advice about the Python API, without the file
            first = str(e.message).strip().splitlines()[0].rstrip(".")
            raise ValueError(f"model weights file {path} does not fit {cls.__name__}: {first} (its keys are not those "
                             f"of an original-layout {cls.__name__} checkpoint): give the model's own single file, or "
                             "its diffusers directory as model: DIR") from None
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{model} is a directory without model_index.json: "
                                     "give a diffusers pipeline directory (save_pretrained output)")
        cls = _pipeline_class(_pipeline_class_name(path))
        # diffusers reads a component's other weight files only when it has no .safetensors: blame only those
        weights = sorted(f for f in path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES)
        used = [f for f in weights if f.suffix == ".safetensors" or not list(f.parent.glob("*.safetensors"))]
        with _naming_bad_weights(used), _complete_weights():
            return cls.from_pretrained(str(path), local_files_only=True, **_pipeline_kwargs(cls), **extra)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} not found: no such file or directory (and not a hub id 'org/name')")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") if local_files_only is None else local_files_only
    with _complete_weights():  # outside the try: its own refusal is not a missing hub model
        try:
            return DiffusionPipeline.from_pretrained(model, local_files_only=offline, safety_checker=None,
                                                     requires_safety_checker=False, **extra)
        except (OSError, ValueError) as e:  # hub unreachable or not in the local cache
            raise ModelNotFoundError(
                f"could not load hub model {model!r} ({type(e).__name__}); on a machine with internet run "
                f"`huggingface-cli download {model} --local-dir DIR` and pass model: DIR"
            ) from None


def load_controlnet(path: str):
    """A diffusers ControlNetModel from a local directory (config.json + weights) or a hub id."""
    from diffusers import ControlNetModel

    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"controlnet {path} is a directory without config.json: give a diffusers "
                                     "ControlNetModel directory (save_pretrained output)")
        weights = sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
        with _naming_bad_weights(weights), _complete_weights():
            return ControlNetModel.from_pretrained(str(p), local_files_only=True)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelNotFoundError(f"controlnet {path!r} not found: no such directory (and not a hub id 'org/name')")
    with _complete_weights():  # outside the try: its own refusal is not a missing hub model
        try:
            return ControlNetModel.from_pretrained(path, local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"))
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"could not load hub controlnet {path!r} ({type(e).__name__}); on a machine with "
                                     f"internet run `huggingface-cli download {path} --local-dir DIR` and pass DIR") from None


def check_controlnet(controlnet, unet, vae_scale_factor: int) -> None:
    """One line when a ControlNet was made for another base model than this UNet (and its VAE)."""
    c, u = controlnet.config, unet.config

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type", "in_channels"):
        if norm(c.get(key)) != norm(u.get(key)):
            raise ValueError(f"the ControlNet does not match the base model: its {key} is {c.get(key)}, the UNet's is "
                             f"{u.get(key)}; use a ControlNet trained for this base (SD-1.x ControlNets for SD-1.x, "
                             "SDXL ones for SDXL)")
    factor = 2 ** (len(c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if factor != vae_scale_factor:
        raise ValueError(f"the ControlNet's image encoder downsamples by {factor}, the VAE by {vae_scale_factor}: "
                         "use a ControlNet trained for this base model")


def guidance_scale_embedding(w: float, dim: int) -> Tensor:
    """LCM's guidance-scale embedding (1, dim) of w (sinusoidal in 1000 w; Meng et al. 2023 as LCM uses it)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = (w * 1000.0) * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class Backbone(nn.Module):
    """A frozen text-to-image latent-diffusion UNet model behind one interface, whatever its family.

    Families, recognised from the components themselves: SD-1.x/2.x (one text encoder; also LCM and the
    Turbo distillations), SDXL (two text encoders, the second's pooled projection and the micro-conditioning
    ``time_ids``; UNet ``addition_embed_type == "text_time"``). A ``controlnet`` adds its residuals to every
    UNet call. The interface: ``encode_prompts`` -> ``Conditioning``; ``denoiser`` (eps of a latent at a
    timestep, CFG batched); ``decode``; ``latent_shape(height, width)``; ``scheduler`` (the default schedule)
    and ``default_sampler``.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 controlnet=None, force_zeros_for_empty_prompt: bool = True):
        """Any diffusers UNet2DConditionModel, AutoencoderKL, text encoder(s), tokenizer(s) and scheduler (a
        test double too); ``controlnet`` a ControlNetModel for this base."""
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        if controlnet is not None:
            check_controlnet(controlnet, unet, 2 ** (len(vae.config.block_out_channels) - 1))
        self.controlnet = controlnet
        # SDXL's pipelines use zero embeddings as the unconditional input when no negative prompt is given
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_grad_(False)
        self.eval()
        leave_out_of_checkpoints(self)

    @classmethod
    def load(cls, model: str, *, model_config: str | None = None, local_files_only: bool | None = None,
             dtype: torch.dtype = torch.float32, vae_checkpointing: bool = False) -> "Backbone":
        """Load by hub id, local diffusers directory, or one .safetensors/.ckpt file (+ ``model_config``)."""
        return PretrainedBackbone(model, model_config=model_config, local_files_only=local_files_only,
                                  vae_checkpointing=vae_checkpointing).to(dtype)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # a VAE whose config says force_upcast (SDXL's) overflows in float16: it stays float32, as in
        # diffusers' pipelines (or load the fp16-fixed VAE with PretrainedBackbone(vae=...))
        if self.vae_upcast and module_dtype(self.vae) == torch.float16:
            self.vae.float()
        return self

    @property
    def vae_upcast(self) -> bool:
        return bool(getattr(self.vae.config, "force_upcast", False))

    @property
    def family(self) -> str:
        """``sdxl`` for a UNet with SDXL's text_time added conditioning, ``sd`` otherwise."""
        return "sdxl" if self.unet.config.get("addition_embed_type") == "text_time" else "sd"

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (UNet sample size x VAE factor: SD-1.5 512, SDXL 1024)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def default_sampler(self) -> str:
        """``lcm`` for an LCM model, ``ddim`` for few-step distilled models on their own trailing grid (their
        sampler), ``edict`` (the official DOODL) otherwise."""
        from .sampling import default_grid

        if type(self.scheduler).__name__ == "LCMScheduler":
            return "lcm"
        return "ddim" if default_grid(self.scheduler) == "model" else "edict"

    samplers = ("ddim", "edict", "lcm")  # the samplers of an eps / v-prediction UNet

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
        from .sampling import Schedule

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
        micro-conditioning original and target size (default: the model's), crop (0, 0), as its pipeline."""
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
        prompt (""), zeros (its pipelines' ``force_zeros_for_empty_prompt``)."""
        cond = self.encode_prompts([prompt], size)
        if self.family == "sdxl" and prompt == "" and self.force_zeros_for_empty_prompt:
            cond = Conditioning(torch.zeros_like(cond.hidden), {"text_embeds": torch.zeros_like(cond.added["text_embeds"]),
                                                                "time_ids": cond.added["time_ids"]})
        return cond

    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0) -> Denoiser:
        """eps(x_t, t) of the items conditioned on ``cond``. An LCM UNet (``time_cond_proj_dim``) takes the
        guidance scale as an embedding instead of CFG, as its pipeline; ``control_image`` (N, 3, H, W) in
        [0, 1] feeds the ControlNet."""
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

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae_upcast and module_dtype(self.vae) == torch.float32:
            # a float32 VAE kept for its float16 overflow runs outside any float16 autocast region
            with torch.autocast(latents.device.type, enabled=False):
                return decode_latents(self.vae, latents)
        return decode_latents(self.vae, latents)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """VAE-encode images in [-1, 1] to float32 latents: the posterior mean, or with ``generators``
        (one CPU generator per image) a posterior sample, mean + std N(0, I), as the official editing
        code (``latent_dist.sample(generator)``). The noise is drawn in float32 whatever the precision."""
        cfg = self.vae.config
        post = self.vae.encode(to_module_dtype(images.to(self.vae.device), self.vae)).latent_dist
        z = at_least_float32(post.mean)
        if generators is not None:
            if len(generators) != len(z):
                raise ValueError(f"{len(generators)} generators for {len(z)} images: give one per image")
            noise = torch.stack([torch.randn(z.shape[1:], generator=g, dtype=torch.float32) for g in generators])
            z = z + post.std.to(z.dtype) * noise.to(z.device, z.dtype)
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor


def resolve_backbone(model: "Backbone | str", model_config: str | None = None, local_files_only: bool | None = None,
                     vae_checkpointing: bool = False, controlnet: str | None = None) -> Backbone:
    """The module's ``model:`` value as a Backbone: an object as it is, a path or hub id loaded (the shortcut)."""
    if isinstance(model, Backbone):
        if model_config is not None or vae_checkpointing or local_files_only is not None or controlnet is not None:
            raise ValueError("model_config, vae_checkpointing, local_files_only and controlnet go with model: <path or "
                             "id>; for a Backbone object set them in its own init_args")
        return model
    if model_family(model, model_config, local_files_only) in FLOW_PIPELINE_FAMILIES:  # SD3 / FLUX: from the model
        from .families.flow import PretrainedFlowBackbone

        if controlnet is not None:
            raise ValueError("controlnet is for the UNet families (SD-1.x/2.x, SDXL); this SD3 / FLUX model has none "
                             "here: drop controlnet")
        return PretrainedFlowBackbone(model, model_config=model_config, local_files_only=local_files_only,
                                      vae_checkpointing=vae_checkpointing)
    return PretrainedBackbone(model, model_config=model_config, local_files_only=local_files_only,
                              vae_checkpointing=vae_checkpointing, controlnet=controlnet)


class PretrainedBackbone(Backbone):
    """A Backbone loaded from a hub id, a local diffusers directory, or one .safetensors/.ckpt file (then
    ``model_config``): the ``class_path`` form of the module's ``model:`` key, in float32.

    The family comes from the model (model_index.json's pipeline class, the UNet's config). ``controlnet``:
    a ControlNetModel directory or hub id for this base (a ControlNet pipeline directory brings its own).
    ``vae``: another AutoencoderKL directory (e.g. SDXL's fp16-fixed VAE, which needs no float32 upcast).
    Memory at 1024 px: ``vae_checkpointing`` (the decoder's gradient checkpointing: its VJP, the peak at SDXL
    size, keeps block inputs only), ``vae_tiling`` (decode in overlapping tiles), ``unet_checkpointing`` (the
    UNet's own checkpointing inside the chain's with-grad recomputation: lower peak, one more UNet forward).
    """

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 vae_checkpointing: bool = False, controlnet: str | None = None, vae: str | None = None,
                 unet_checkpointing: bool = False, vae_tiling: bool = False):
        if model_family(path, model_config, local_files_only) in FLOW_PIPELINE_FAMILIES:
            raise ValueError(f"{path} is an SD3 / FLUX (rectified-flow transformer) model: use "
                             "doodl_lightning.families.flow.PretrainedFlowBackbone (or model: <path>)")
        pipe = _load_pipeline(path, model_config, local_files_only)
        net = load_controlnet(controlnet) if controlnet else getattr(pipe, "controlnet", None)
        if isinstance(net, (list, tuple)) or type(net).__name__ == "MultiControlNetModel":
            raise ValueError("several ControlNets at once are not supported: give one controlnet")
        autoencoder = pipe.vae
        if vae:
            from diffusers import AutoencoderKL

            if not Path(os.path.expanduser(vae)).is_dir():
                raise ModelNotFoundError(f"vae {vae} is not a directory: give an AutoencoderKL directory "
                                         "(config.json + diffusion_pytorch_model.safetensors)")
            with _complete_weights():
                autoencoder = AutoencoderKL.from_pretrained(os.path.expanduser(vae), local_files_only=True)
        super().__init__(pipe.unet, autoencoder, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                         text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
                         controlnet=net,
                         force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))
        try:  # scaled-dot-product attention, the fast and memory-lean kernel
            from diffusers.models.attention_processor import AttnProcessor2_0
            for m in (self.unet, self.vae, self.controlnet):
                if m is not None:
                    m.set_attn_processor(AttnProcessor2_0())
        except Exception:  # noqa: BLE001 - older/newer diffusers already default to SDPA
            pass
        if vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if vae_tiling:
            self.vae.enable_tiling()
        if unet_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.controlnet is not None:
                self.controlnet.enable_gradient_checkpointing()
        self.float()  # the module's precision casts it later; loading keeps full precision
