"""HPS guidance: Human Preference Score v2 / v2.1 (an open_clip ViT-H-14 fine-tuned on human preferences)."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import loading
from .augment import normalize
from .base import Guidance
from .clip_processor import bicubic_resize
from .loading import load_into, load_state_dict_file
from .pickscore import need_prompts
from ..precision import at_least_float32, to_module_dtype

__all__ = ["HPSGuidance", "resize_longest_side_pad"]


def resize_longest_side_pad(images: Tensor, size: int, fill: float = -1.0) -> Tensor:
    """HPSv2's evaluation transform (``ResizeMaxSize``), differentiably: bicubic resize so the longer side is
    ``size`` (the other ``round(side * scale)``), then pad to ``size`` x ``size`` with ``fill`` (-1: black, as
    HPSv2 pads the [0, 1] tensor with 0), the padding split left/top ``pad // 2``."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = bicubic_resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=fill)
    return x


def _not_random_weights_note(record: logging.LogRecord) -> bool:
    return "random" not in record.getMessage()


@contextmanager
def _no_random_weights_warning():
    # The model is built empty and the HPS weights loaded right after: the "random weights" notes of
    # load_open_clip (its logger) and of open_clip (the root logger) would be wrong here.
    loggers = [logging.getLogger(loading.__name__), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(_not_random_weights_note)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_random_weights_note)


class HPSGuidance(Guidance):
    """Loss = -HPS: ``100 * cos(image embedding, prompt embedding)`` of the HPSv2 / HPSv2.1 model.

    Weights: ``xswu/HPSv2`` on the Hugging Face hub, ``HPS_v2_compressed.pt`` (HPS v2.0) or
    ``HPS_v2.1_compressed.pt`` (v2.1): the full open_clip ViT-H-14 (986M parameters; each file about 2 GB,
    a torch ``{'state_dict': ...}`` of HPSv2's open_clip fork, whose ViT-H-14 keys and shapes are
    open_clip's), read here with ``torch.load(weights_only=True)``
    (or a ``.safetensors`` conversion) into ``open_clip.create_model(model_name)``; a bare state dict works too.
    ``model_config`` registers a custom open_clip config JSON (its stem becomes the model name), as tests do.

    As HPSv2's code scores (``hpsv2.img_score.score``): text tokenised by open_clip's tokenizer for the model,
    image and text features L2-normalised, score = their dot product. ``hpsv2.score`` returns that cosine
    (about 0.2-0.3); the HPSv2 benchmark (``evaluation.py``) reports it times 100, the scale used here. Image
    side: HPSv2's evaluation transform (``ResizeMaxSize``: bicubic resize of the longer side to the model's
    input size, zero-pad to a square; just a resize for square images), then open_clip's mean / std. Each
    item is scored against its own prompt; text embeddings are cached per prompt.
    """

    default_name = "hps"

    def __init__(self, checkpoint: str | None = None, model_name: str = "ViT-H-14", model_config: str | None = None,
                 weight: float = 1.0, name: str | None = None):
        if not checkpoint:
            raise ValueError("HPSGuidance needs checkpoint: a local HPS_v2_compressed.pt or HPS_v2.1_compressed.pt "
                             "(xswu/HPSv2 on the Hugging Face hub)")
        state = load_state_dict_file(checkpoint, "HPS checkpoint")  # refused before the big model is built
        super().__init__(weight, name)
        import open_clip

        with _no_random_weights_warning():
            model, _, self.model_name = loading.load_open_clip(model_name, None, model_config)
        load_into(model, state, checkpoint, f"HPS checkpoint (open_clip {self.model_name})")
        del state
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> the model's normalised input (N, 3, S, S), differentiably."""
        return normalize(resize_longest_side_pad(images, self.input_size), self.mean, self.std)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings (N, D), at least float32, of images in [-1, 1]."""
        pixels = to_module_dtype(self.preprocess(images), self.model)
        return F.normalize(at_least_float32(self.model.encode_image(pixels)), dim=-1)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings (len(prompts), D), at least float32, cached per prompt."""
        device = next(self.model.parameters()).device
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            emb = F.normalize(at_least_float32(self.model.encode_text(self.tokenizer(todo).to(device))), dim=-1)
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """HPS per item (N,), at least float32: 100 * cosine(image, its prompt)."""
        prompts = need_prompts(self.name, prompts, images.shape[0])
        image = self.embed_images(images)
        return 100.0 * (image * self.embed_text(prompts).to(image.dtype)).sum(-1)

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -HPS."""
        return -self.score(images, prompts)
