"""The frozen text-to-image model's interface (``Backbone``) and the loading helpers every family shares.

What a family is (SD-1.x/2.x, SDXL, LCM, ControlNet; SD3, FLUX) lives in ``doodl_lightning.families``, one file per
family, registered under the diffusers pipeline class names it serves; this module knows none of them.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .conditioning import Conditioning
from .frozen import leave_out_of_checkpoints
from .objective import decode_latents
from .precision import at_least_float32, module_dtype, to_module_dtype
from .sampling import SAMPLERS

__all__ = ["WEIGHT_SUFFIXES", "Backbone", "ModelNotFoundError", "complete_weights", "hub_offline", "image_sides",
           "load_dtype_kwargs", "load_pipeline", "model_index", "naming_bad_weights", "pipeline_class_name", "posterior_latents"]


class ModelNotFoundError(FileNotFoundError):
    """No model at the path or hub id given (or not in the local cache offline)."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@contextmanager
def naming_bad_weights(files: list[Path]):
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
    files = sorted(f for f in folder.glob("*") if f.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
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
def complete_weights():
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


def hub_offline(local_files_only: bool | None = None) -> bool:
    """Whether hub ids are read from the local cache only: ``local_files_only``, or when None, ``HF_HUB_OFFLINE``."""
    env = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    return env if local_files_only is None else bool(local_files_only)


def model_index(model: str, model_config: str | None = None, local_files_only: bool | None = None) -> dict | None:
    """The model_index.json of a local directory, of a single file's config directory, or of a hub id (that file
    alone, from the cache offline); None when it cannot be read (the loader then says why)."""
    import json

    path = Path(os.path.expanduser(model))
    if path.is_file():
        path = Path(os.path.expanduser(model_config)) if model_config else None
    if path is not None and path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else None
    if path is not None or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(model, "model_index.json", local_files_only=hub_offline(local_files_only))
        return json.loads(Path(index).read_text())
    except Exception:  # noqa: BLE001 - unreachable, not cached, gated: the pipeline loader reports it
        return None


def pipeline_class_name(model: str, model_config: str | None = None, local_files_only: bool | None = None) -> str | None:
    """The diffusers pipeline class model_index.json names (``_class_name``, e.g. ``StableDiffusionXLPipeline``): the
    key of the family registry (``doodl_lightning.families.REGISTRY``); None when unreadable."""
    index = model_index(model, model_config, local_files_only)
    return index.get("_class_name") if index else None


def _local_class_name(path: Path) -> str | None:
    return pipeline_class_name(str(path)) if path.is_dir() else None  # a directory only: never the hub


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


def load_pipeline(model: str, config: str | None, local_files_only: bool | None, **extra):
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
        cls = _pipeline_class(_local_class_name(Path(os.path.expanduser(config))))
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        try:
            with naming_bad_weights([path]):
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
        cls = _pipeline_class(_local_class_name(path))
        # diffusers reads a component's other weight files only when it has no .safetensors: blame only those
        weights = sorted(f for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES)
        used = [f for f in weights if f.suffix == ".safetensors" or not list(f.parent.glob("*.safetensors"))]
        with naming_bad_weights(used), complete_weights():
            return cls.from_pretrained(str(path), local_files_only=True, **_pipeline_kwargs(cls), **extra)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} not found: no such file or directory (and not a hub id 'org/name')")
    with complete_weights():  # outside the try: its own refusal is not a missing hub model
        try:
            return DiffusionPipeline.from_pretrained(model, local_files_only=hub_offline(local_files_only),
                                                     safety_checker=None, requires_safety_checker=False, **extra)
        except (OSError, ValueError) as e:  # hub unreachable or not in the local cache
            raise ModelNotFoundError(
                f"could not load hub model {model!r} ({type(e).__name__}); on a machine with internet run "
                f"`huggingface-cli download {model} --local-dir DIR` and pass model: DIR"
            ) from None


def image_sides(height: int | None, width: int | None, default: int, multiple: int, reason: str,
                each=None) -> tuple[int, int]:
    """(height, width) of the image asked for (None: ``default``; one number: a square), each side a positive
    multiple of ``multiple``, else a one-line error ``"<side> <px> is not a positive multiple of <multiple>:
    <reason>; use e.g. <px>"``; the side is named "resolution" for a square. ``each(name, px)``, when given, checks
    a side further (after its multiple, before the next side)."""
    height = height or default
    width = width or height
    sides = (("resolution", height),) if height == width else (("height", height), ("width", width))
    for name, res in sides:
        if res <= 0 or res % multiple:
            raise ValueError(f"{name} {res} is not a positive multiple of {multiple}: {reason}; use e.g. "
                             f"{max(multiple, res // multiple * multiple)}")
        if each is not None:
            each(name, res)
    return height, width


def load_dtype_kwargs(load_dtype: str | None) -> dict:
    """``load_pipeline``'s keywords for a ``load_dtype`` option (``bfloat16``, ``float16``, ``float32``; None: the
    files' own dtypes), refused in one line otherwise."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if load_dtype is not None and load_dtype not in dtypes:
        raise ValueError(f"load_dtype must be one of {', '.join(dtypes)} or null, got {load_dtype!r}")
    return {"torch_dtype": dtypes[load_dtype]} if load_dtype else {}


def apply_memory_options(backbone: torch.nn.Module, transformer_checkpointing: bool = False,
                         vae_checkpointing: bool = False, vae_tiling: bool = False,
                         load_dtype: str | None = None) -> None:
    """A loaded transformer family's memory options (its ``transformer`` and ``vae``): gradient checkpointing of
    either, VAE tiling; without ``load_dtype`` the weights are kept in float32 (the module's precision casts them
    later). A VAE without gradient checkpointing in this diffusers is refused in one line."""
    if transformer_checkpointing:
        backbone.transformer.enable_gradient_checkpointing()
    if vae_checkpointing:
        if not getattr(backbone.vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"vae_checkpointing: diffusers' {type(backbone.vae).__name__} has no gradient "
                             "checkpointing: drop vae_checkpointing (vae_tiling lowers the decoder's memory instead)")
        backbone.vae.enable_gradient_checkpointing()
    if vae_tiling:
        backbone.vae.enable_tiling()
    if not load_dtype:
        backbone.float()


def posterior_latents(mean: Tensor, std: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
    """A VAE posterior (its ``latent_dist``'s ``mean`` and ``std``) -> float32 latents: the mean, or with
    ``generators`` (one CPU generator per image) a posterior sample, mean + std N(0, I), as the official editing
    code (``latent_dist.sample(generator)``). The noise is drawn in float32 whatever the precision."""
    z = at_least_float32(mean)
    if generators is not None:
        if len(generators) != len(z):
            raise ValueError(f"{len(generators)} generators for {len(z)} images: give one per image")
        noise = torch.stack([torch.randn(z.shape[1:], generator=g, dtype=torch.float32) for g in generators])
        z = z + std.to(z.dtype) * noise.to(z.device, z.dtype)
    return z


class Backbone(nn.Module, ABC):
    """A frozen text-to-image latent model behind one interface, whatever its family: what the module, the CLI, the
    chain's gradient code and the benchmarks call.

    Every family sets ``vae`` (an AutoencoderKL; scaling and shift factor in its config), ``scheduler`` (the model's
    own), ``unet`` (the denoising network -- a transformer for the flow families -- which the compute meter hooks and
    the resume fingerprint reads), ``text_encoder`` and ``controlnet`` (None where it has none). Class attributes:
    ``schedule_type`` (the schedule its chain runs on: every registered sampler of that schedule type runs on the
    family, ``samplers``), ``supports_cuda_graphs`` (whether its denoising network may
    be replayed as a CUDA graph: the UNets yes, the flow transformers no) and ``without_controlnet`` (a family
    with no ControlNet here: its name, in ``from_model``'s refusal of a ``controlnet``). The shared parts (the VAE's scale factor,
    decoding, encoding images, staying frozen) are implemented here; a family implements the rest.
    """

    schedule_type: type | None = None
    supports_cuda_graphs: bool = False
    without_controlnet: str | None = None

    @property
    def samplers(self) -> tuple[str, ...]:
        """The registered samplers this family runs: those of its ``schedule_type`` (a new sampler needs no line here)."""
        return tuple(name for name, s in SAMPLERS.items() if s.schedule_type is self.schedule_type)

    def __init__(self):
        super().__init__()
        self.controlnet = None

    def freeze(self) -> None:
        """No gradients, evaluation mode, and out of the module's checkpoints: what a family's ``__init__`` ends with."""
        self.requires_grad_(False)
        self.eval()
        leave_out_of_checkpoints(self)

    @classmethod
    def from_model(cls, model: str, model_config: str | None = None, local_files_only: bool | None = None,
                   vae_checkpointing: bool = False, controlnet: str | list[str] | None = None) -> "Backbone":
        """The ``model: <path or id>`` shortcut for a model registered to this class: ``cls(model, ...)`` with the
        shortcut's options (``controlnet`` only when given; refused in one line by a family ``without_controlnet``)."""
        if controlnet is not None and cls.without_controlnet:
            raise ValueError(f"controlnet is for the UNet families (SD-1.x/2.x, SDXL); this {cls.without_controlnet} "
                             "model has none here: drop controlnet")
        return cls(model, model_config=model_config, local_files_only=local_files_only, vae_checkpointing=vae_checkpointing,
                   **({} if controlnet is None else {"controlnet": controlnet}))

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
    @abstractmethod
    def family(self) -> str:
        """The family's short name (``sd``, ``sdxl``, ``sd3``, ``flux``): messages, records, the CLI's summary."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The denoising network's dtype (the precision the module cast it to)."""

    @property
    @abstractmethod
    def default_size(self) -> int:
        """The model's native image side in pixels."""

    @property
    @abstractmethod
    def default_sampler(self) -> str:
        """The sampler used when the config names none (one of ``samplers``)."""

    @abstractmethod
    def rows_per_evaluation(self, guidance_scale: float) -> int:
        """Rows one item occupies in a model call (2 with classifier-free guidance batched): the compute meter's divisor."""

    @abstractmethod
    def check_sampler(self, sampler: str, grid: str | None = None) -> None:
        """One line (a ValueError) when ``sampler`` (or the ``timestep_grid``) is not one this family runs."""

    @abstractmethod
    def schedule(self, steps: int, grid: str | None = None, size: tuple[int, int] | None = None):
        """The chain's time grid of ``steps`` steps for images of ``size`` (height, width; None: the model's)."""

    @abstractmethod
    def latent_shape(self, height: int | None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of a ``height`` x ``width`` image's latents (None: the model's size; one number: a square)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of each prompt ("" = the null prompt), as the family's pipeline builds it."""

    def encode_negative(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """The unconditional input of classifier-free guidance: the negative prompt's conditioning."""
        return self.encode_prompts([prompt], size)

    @abstractmethod
    def denoiser(self, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance_scale: float,
                 control_image: Tensor | None = None, control_scale: float = 1.0):
        """The model callable of the items conditioned on ``cond`` (eps or velocity), what the samplers call."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_upcast(self) -> bool:
        return bool(getattr(self.vae.config, "force_upcast", False))

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
        z = posterior_latents(post.mean, post.std, generators)
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor
