"""PickScore guidance: the Pick-a-Pic preference model (a CLIP-H fine-tune) scores each image against its prompt.

Also home of ``need_prompts``, which the prompt-conditioned rewards share; the differentiable resizes and crop
(``bicubic_resize``, ``resize_shortest_side``, ``center_crop``) live in ``clip_processor`` and are re-exported here.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Guidance
from .clip_processor import CLIPPreprocess, bicubic_resize, center_crop, resize_shortest_side
from .loading import one_line
from ..precision import at_least_float32, to_module_dtype

__all__ = ["PickScoreGuidance", "bicubic_resize", "resize_shortest_side", "center_crop", "need_prompts"]

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def need_prompts(owner: str, prompts: Sequence[str] | None, n: int) -> list[str]:
    """The items' prompts as a list, or a one-line error when there is not one per image."""
    if prompts is None or len(prompts) != n:
        got = "no" if prompts is None else len(prompts)
        raise ValueError(f"{owner} scores each image against its prompt, so it needs one prompt per image "
                         f"({n} images, {got} prompts)")
    return [str(p) for p in prompts]


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
        self.pixels = CLIPPreprocess(cfg, f"PickScore processor {processor_dir}",
                                     int(self.model.config.vision_config.image_size))
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> the processor's pixel_values (N, 3, S, S), differentiably."""
        return self.pixels(images)

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
