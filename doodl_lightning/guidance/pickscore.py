"""PickScore guidance: the Pick-a-Pic preference model (a CLIP-H fine-tune) scores each image against its prompt.

Also home of the differentiable versions of the reference preprocessing the reward models share (bicubic,
antialiased resizes as PIL and torchvision do them, centre crop with either library's rounding), used by
``hps`` and ``image_reward`` too.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import normalize
from .base import Guidance
from .loading import one_line
from ..precision import at_least_float32, to_module_dtype

__all__ = ["PickScoreGuidance", "bicubic_resize", "resize_shortest_side", "center_crop", "need_prompts"]

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# PIL resample codes the processors store -> F.interpolate modes (the antialiased kernels match PIL's).
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def bicubic_resize(images: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Differentiable resize to ``size`` (h, w), antialiased like PIL / torchvision tensors (``antialias=True``).

    Bicubic with antialias uses PIL's kernel (a = -0.5) both when shrinking and when enlarging. Computed in
    at least float32 (CPU has no half-precision antialiased kernel) and cast back. No clamping: the gradient
    stays non-zero at saturated pixels (torchvision does not clamp float tensors either).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(at_least_float32(images), size=size, mode=mode, align_corners=False, antialias=True)
    return out.to(images.dtype)


def resize_shortest_side(images: Tensor, shortest: int, mode: str = "bicubic") -> Tensor:
    """Resize so the shorter side is ``shortest``, keeping the aspect: the longer side becomes
    ``int(shortest * long / short)``, as torchvision ``Resize(int)`` and transformers' processors compute it."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(shortest * long / short)
    return bicubic_resize(images, (shortest, new_long) if h <= w else (new_long, shortest), mode)


def center_crop(images: Tensor, size: tuple[int, int], torchvision_rounding: bool = False,
                fill: float = -1.0) -> Tensor:
    """Centre crop to ``size`` (h, w); an image smaller than the crop is first padded with ``fill`` (-1 is
    black for images in [-1, 1]) as both libraries pad with zeros. Offsets: ``int((H - h) / 2)`` (transformers'
    processors) or, with ``torchvision_rounding``, ``int(round((H - h) / 2))`` (torchvision ``CenterCrop``)."""
    ch, cw = int(size[0]), int(size[1])
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        images = F.pad(images, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2], value=fill)
        h, w = images.shape[-2:]
    if (h, w) == (ch, cw):
        return images
    offset = (lambda d: int(round(d / 2.0))) if torchvision_rounding else (lambda d: int(d / 2.0))
    top, left = offset(h - ch), offset(w - cw)
    return images[..., top:top + ch, left:left + cw]


def need_prompts(owner: str, prompts: Sequence[str] | None, n: int) -> list[str]:
    """The items' prompts as a list, or a one-line error when there is not one per image."""
    if prompts is None or len(prompts) != n:
        got = "no" if prompts is None else len(prompts)
        raise ValueError(f"{owner} scores each image against its prompt, so it needs one prompt per image "
                         f"({n} images, {got} prompts)")
    return [str(p) for p in prompts]


def _size_entry(size, owner: str, what: str) -> tuple[int, int] | int:
    """A processor ``size`` / ``crop_size`` value -> (h, w), or an int for {"shortest_edge": s}."""
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if isinstance(size, int):
        return (size, size) if what == "crop_size" else size
    if get("shortest_edge") and not get("longest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise ValueError(f"{owner}: unsupported image processor {what} {dict(size) if size else size!r} "
                     "(expected {'shortest_edge': s} or {'height': h, 'width': w})")


class PickScoreGuidance(Guidance):
    """Loss = -PickScore: ``logit_scale.exp() * cos(image embedding, prompt embedding)`` of PickScore_v1.

    Weights: ``yuvalkirstain/PickScore_v1`` on the Hugging Face hub, a ``transformers`` ``CLIPModel``
    (CLIP ViT-H/14, about 986M parameters: ``model.safetensors`` ~3.9 GB in float32, plus ``config.json``).
    Processor: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``preprocessor_config.json`` + the CLIP tokenizer
    files, a few MB). Both are read from local folders only: ``model`` (config + safetensors, or a
    ``pytorch_model.bin`` that ``transformers`` reads weights-only) and ``processor`` (default: ``model``).

    The score follows the official README: text tokenised with ``padding=True, truncation=True,
    max_length=77``; image and text features L2-normalised; times ``logit_scale.exp()`` (about 100). The image
    side is the processor's own pipeline rebuilt in torch from its config, so gradients reach the pixels:
    images in [-1, 1] -> [0, 1] (what ``do_rescale`` makes of uint8), resize of the shortest side with the
    processor's ``resample`` (bicubic, antialiased like PIL), centre crop, normalise with its mean / std.
    Each item is scored against its own prompt (one prompt per image is required); text embeddings are
    cached per prompt.
    """

    default_name = "pickscore"

    def __init__(self, model: str | None = None, processor: str | None = None, max_length: int = 77,
                 weight: float = 1.0, name: str | None = None):
        if not model:
            raise ValueError("PickScoreGuidance needs model: a local folder holding yuvalkirstain/PickScore_v1 "
                             "(config.json + model.safetensors)")
        super().__init__(weight, name)
        model_dir = _require_dir(model, "PickScore model folder", "config.json")
        if not any((model_dir / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(f"PickScore model folder {model_dir} has no weights file "
                                    f"(expected one of {', '.join(WEIGHT_FILES)})")
        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"PickScore model folder {model_dir}: config.json is not a JSON object: "
                             f"{one_line(e, 160)}") from None
        if model_type != "clip":
            raise ValueError(f"PickScore model folder {model_dir}: config.json describes a {model_type!r} model, "
                             "expected a CLIPModel ('clip')")
        processor_dir = _require_dir(processor or model, "PickScore processor folder")
        self.tokenizer, cfg = _load_processor(processor_dir)  # small: checked before the model is read
        self.model = _load_clip_model(model_dir)
        vocab = int(self.model.config.text_config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise ValueError(f"PickScore processor {processor_dir}: its tokenizer has {len(self.tokenizer)} tokens but "
                             f"the model's text vocab_size is {vocab}; use the processor that belongs to the model")
        self.max_length = int(max_length)
        self._configure_pixels(cfg, processor_dir)
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    def _configure_pixels(self, cfg, folder: Path) -> None:
        owner = f"PickScore processor {folder}"
        self.resize = _size_entry(cfg.size, owner, "size") if getattr(cfg, "do_resize", True) else None
        self.crop = _size_entry(cfg.crop_size, owner, "crop_size") if getattr(cfg, "do_center_crop", True) else None
        resample = int(getattr(cfg, "resample", 3) or 3)
        if resample not in _RESAMPLE:
            raise ValueError(f"{owner}: unsupported resample {resample} (bilinear 2 or bicubic 3)")
        self.resample = _RESAMPLE[resample]
        # do_rescale maps uint8 [0, 255] by rescale_factor (1/255): our [0, 1] images are that times 255.
        self.pixel_scale = 255.0 * float(cfg.rescale_factor) if getattr(cfg, "do_rescale", True) else 255.0
        normalise = getattr(cfg, "do_normalize", True)
        self.mean = tuple(float(v) for v in cfg.image_mean) if normalise else (0.0, 0.0, 0.0)
        self.std = tuple(float(v) for v in cfg.image_std) if normalise else (1.0, 1.0, 1.0)
        model_size = int(self.model.config.vision_config.image_size)
        out = self.crop if self.crop is not None else self.resize
        if not isinstance(out, tuple) or out != (model_size, model_size):
            raise ValueError(f"{owner}: its images come out {out} but the model takes {model_size}x{model_size}; "
                             "use the processor that belongs to the model")

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> the processor's pixel_values (N, 3, S, S), differentiably."""
        x = images
        if isinstance(self.resize, int):
            x = resize_shortest_side(x, self.resize, self.resample)
        elif self.resize is not None:
            x = bicubic_resize(x, self.resize, self.resample)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        if not math.isclose(self.pixel_scale, 1.0):  # a processor that does not rescale to [0, 1]
            x = (x + 1) * self.pixel_scale - 1  # so that (x + 1) / 2 is the processor's value
        return normalize(x, self.mean, self.std)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings (N, D), at least float32, of images in [-1, 1]."""
        pixels = to_module_dtype(self.preprocess(images), self.model)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(at_least_float32(self.model.visual_projection(pooled)), dim=-1)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings (len(prompts), D), at least float32, cached per prompt."""
        device = self.model.logit_scale.device
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            tokens = self.tokenizer(todo, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            emb = F.normalize(at_least_float32(self.model.text_projection(pooled)), dim=-1)
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """PickScore per item (N,), at least float32: logit_scale.exp() * cosine(image, its prompt)."""
        prompts = need_prompts(self.name, prompts, images.shape[0])
        image = self.embed_images(images)
        text = self.embed_text(prompts).to(image.dtype)
        return at_least_float32(self.model.logit_scale).exp().to(image.dtype) * (image * text).sum(-1)

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -PickScore."""
        return -self.score(images, prompts)


def _require_dir(path: str, what: str, must_hold: str | None = None) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    if must_hold and not (folder / must_hold).is_file():
        raise FileNotFoundError(f"{what} {folder} has no {must_hold}")
    return folder


def _load_clip_model(folder: Path) -> nn.Module:
    """``CLIPModel.from_pretrained`` of a local folder, float32; every weight must come from the file."""
    from transformers import CLIPModel

    try:
        # ignore_mismatched_sizes: mismatches come back in ``info`` and are refused below in one line.
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # transformers reports a bad file as OSError / RuntimeError / UnpicklingError
        if "Weights only load failed" in str(e) or isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"PickScore model folder {folder}: its weights file is not a weights-only state dict "
                             "(arbitrary pickled objects are refused); use model.safetensors") from None
        raise ValueError(f"PickScore model folder {folder}: could not load a CLIPModel from it (weights must be "
                         f"safetensors or a weights-only torch file): {one_line(e, 240)}") from None
    shapes = [f"{k[0]} {tuple(k[1])} != expected {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3 else str(k)
              for k in info.get("mismatched_keys") or []]
    bad = [f"{label} ({len(keys)}): {', '.join(map(str, keys[:4]))}"
           for label, keys in (("missing keys", list(info.get("missing_keys") or [])), ("wrong shapes", shapes))
           if keys]
    if bad:
        raise ValueError(f"PickScore model folder {folder}: weights do not match its config.json: " + "; ".join(bad))
    if info.get("unexpected_keys"):
        log.info("PickScore %s: ignored unused keys %s", folder, list(info["unexpected_keys"])[:4])
    return model.eval()


def _load_processor(folder: Path):
    """(tokenizer, image processor) from a local processor folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    # transformers quietly builds an empty tokenizer from a folder without its files: check them first.
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                      and (folder / "merges.txt").is_file())):
        raise FileNotFoundError(f"PickScore processor folder {folder} has no CLIP tokenizer files "
                                "(tokenizer.json, or vocab.json + merges.txt)")
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise FileNotFoundError(f"PickScore processor folder {folder} has no preprocessor_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"PickScore processor folder {folder}: could not load a CLIP tokenizer and image processor "
                         f"(expected tokenizer files + preprocessor_config.json): {one_line(e, 240)}") from None
    return tokenizer, image_processor
