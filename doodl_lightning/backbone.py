"""The frozen text-to-image model: UNet, VAE, text encoder, tokenizer and noise schedule."""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .frozen import leave_out_of_checkpoints
from .objective import decode_latents
from .precision import at_least_float32, module_dtype, to_module_dtype
from .sampling import Denoiser

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


def _load_pipeline(model: str, config: str | None, local_files_only: bool | None):
    from diffusers import StableDiffusionPipeline

    path = Path(os.path.expanduser(model))
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate prints an install hint per load
    kwargs = dict(safety_checker=None, requires_safety_checker=False,
                  low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".bin"):
            raise ValueError(f"{model}: a single-file checkpoint must be .safetensors or .ckpt")
        # the original-format file holds weights only; the pipeline layout comes from a local
        # diffusers config directory (e.g. a copy of the model's repo without its weights)
        if config is None:
            raise ValueError(f"{model} is a single file: also give model_config, a local diffusers directory "
                             "with the model's configs (model_index.json, unet/config.json, ...)")
        with _naming_bad_weights([path]):
            return StableDiffusionPipeline.from_single_file(str(path), config=config, local_files_only=True, **kwargs)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{model} is a directory without model_index.json: "
                                     "give a diffusers Stable-Diffusion-layout directory (save_pretrained output)")
        # diffusers reads a component's other weight files only when it has no .safetensors: blame only those
        weights = sorted(f for f in path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES)
        used = [f for f in weights if f.suffix == ".safetensors" or not list(f.parent.glob("*.safetensors"))]
        with _naming_bad_weights(used):
            return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} not found: no such file or directory (and not a hub id 'org/name')")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") if local_files_only is None else local_files_only
    try:
        return StableDiffusionPipeline.from_pretrained(model, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as e:  # hub unreachable or not in the local cache
        raise ModelNotFoundError(
            f"could not load hub model {model!r} ({type(e).__name__}); on a machine with internet run "
            f"`huggingface-cli download {model} --local-dir DIR` and pass model: DIR"
        ) from None


class Backbone(nn.Module):
    """A frozen Stable-Diffusion-layout model (SD-1.x, SD-2.x, or the shapes world) in one dtype."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        """Any diffusers UNet2DConditionModel, AutoencoderKL, text encoder, tokenizer and scheduler (a test double too)."""
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
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

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a square image of ``resolution`` pixels (default: the model's)."""
        f = self.vae_scale_factor
        res = resolution or self.unet.config.sample_size * f
        if res <= 0 or res % f:
            raise ValueError(f"resolution {res} is not a positive multiple of the VAE factor {f}: use e.g. {max(f, res // f * f)}")
        depth = len(self.unet.config.block_out_channels) - 1
        if (res // f) % (2**depth):
            raise ValueError(f"resolution {res} gives {res // f}-pixel latents, which the UNet's {depth} "
                             f"down-samplings cannot halve evenly: use a multiple of {f * 2**depth}")
        return self.unet.config.in_channels, res // f, res // f

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states (N, L, D) for a list of prompts ("" = the null prompt)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def denoiser(self, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Denoiser:
        return Denoiser(self.unet, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                        prediction_type=self.scheduler.config.get("prediction_type", "epsilon"),
                        alphas_cumprod=self.scheduler.alphas_cumprod)

    def decode(self, latents: Tensor) -> Tensor:
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
                     vae_checkpointing: bool = False) -> Backbone:
    """The module's ``model:`` value as a Backbone: an object as it is, a path or hub id loaded (the shortcut)."""
    if isinstance(model, Backbone):
        if model_config is not None or vae_checkpointing or local_files_only is not None:
            raise ValueError("model_config, vae_checkpointing and local_files_only go with model: <path or id>; "
                             "for a Backbone object set them in its own init_args")
        return model
    return PretrainedBackbone(model, model_config=model_config, local_files_only=local_files_only,
                              vae_checkpointing=vae_checkpointing)


class PretrainedBackbone(Backbone):
    """A Backbone loaded from a hub id, a local diffusers directory, or one .safetensors/.ckpt file (then
    ``model_config``): the ``class_path`` form of the module's ``model:`` key, in float32."""

    def __init__(self, path: str, model_config: str | None = None, local_files_only: bool | None = None,
                 vae_checkpointing: bool = False):
        pipe = _load_pipeline(path, model_config, local_files_only)
        super().__init__(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        try:  # scaled-dot-product attention, the fast and memory-lean kernel
            from diffusers.models.attention_processor import AttnProcessor2_0
            self.unet.set_attn_processor(AttnProcessor2_0())
            self.vae.set_attn_processor(AttnProcessor2_0())
        except Exception:  # noqa: BLE001 - older/newer diffusers already default to SDPA
            pass
        if vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.float()  # the module's precision casts it later; loading keeps full precision
