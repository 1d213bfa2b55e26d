"""CLIP guidance: spherical distance between CLIP embeddings of the image's cutouts and a text or image target."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Cutouts, normalize, resize
from .base import Guidance, per_prompt
from .loading import load_images, load_open_clip, resolve_image_paths
from ..precision import at_least_float32, to_module_dtype

__all__ = ["spherical_dist_loss", "CLIPImageEncoder", "CLIPGuidance", "CLIPTextGuidance", "CLIPImageGuidance"]


def spherical_dist_loss(x: Tensor, y: Tensor) -> Tensor:
    """Squared great-circle distance 2 * arcsin(|x - y| / 2)**2 between normalised embeddings (last dim)."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


class CLIPImageEncoder(nn.Module):
    """Cutouts -> CLIP normalisation -> image tower -> normalised embeddings (N, cuts_per_item, D)."""

    def __init__(self, visual: nn.Module, num_cuts: int = 16, cut_power: float = 0.3):
        super().__init__()
        self.visual = visual
        cfg = getattr(visual, "preprocess_cfg", {})
        size = getattr(visual, "image_size", cfg.get("size", 224))
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.cutouts = Cutouts(self.input_size, num_cuts, cut_power)
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def embed(self, pixels: Tensor) -> Tensor:
        """CLIP-normalised pixels (B, 3, s, s) -> unit embeddings (B, D), at least float32."""
        return F.normalize(at_least_float32(self.visual(to_module_dtype(pixels, self.visual))), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """Whole images (N, 3, H, W) in [-1, 1], resized to the tower's input size -> unit embeddings (N, D)."""
        return self.embed(normalize(resize(images, self.input_size), self.mean, self.std))

    def forward(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> (N, cuts_per_item, D) unit embeddings."""
        cuts = self.cutouts(images, generators)
        emb = self.embed(normalize(cuts, self.mean, self.std))
        return emb.view(images.shape[0], self.cutouts.cuts_per_item, -1)


class CLIPGuidance(Guidance):
    """Base of the guidances on an open_clip image tower: loads the model and builds the cutout ``encoder``.

    Attributes: ``encoder`` (a ``CLIPImageEncoder``), ``model_name`` (the open_clip name the model is
    registered under), ``preprocess`` (the model's eval transform for PIL images) and, with
    ``text_tower=True``, ``model`` (the whole CLIP model); otherwise the text tower is dropped.
    """

    def __init__(self, model_name: str, pretrained: str | None, model_config: str | None, num_cuts: int,
                 cut_power: float, weight: float = 1.0, name: str | None = None, text_tower: bool = False):
        super().__init__(weight, name)
        model, self.preprocess, self.model_name = load_open_clip(model_name, pretrained, model_config)
        if text_tower:
            self.model = model
        self.encoder = CLIPImageEncoder(model.visual, num_cuts, cut_power)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit CLIP embeddings (N, D) of whole images (N, 3, H, W) in [-1, 1] (no cutouts)."""
        return self.encoder.embed_images(images)


class CLIPTextGuidance(CLIPGuidance):
    """Spherical distance between the cutouts' CLIP embeddings and a prompt's (the fixed ``prompt`` or each item's)."""

    default_name = "clip_text"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model_config: str | None = None,
                 prompt: str | None = None, num_cuts: int = 16, cut_power: float = 0.3, weight: float = 1.0,
                 name: str | None = None):
        super().__init__(model_name, pretrained, model_config, num_cuts, cut_power, weight, name, text_tower=True)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.prompt = prompt
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings (len(prompts), D), at least float32, cached per prompt (the text tower is frozen)."""
        device = next(self.model.parameters()).device
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            emb = F.normalize(at_least_float32(self.model.encode_text(self.tokenizer(todo).to(device))), dim=-1)
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item spherical distance to the text, averaged over cutouts: (N,)."""
        n = images.shape[0]
        if self.prompt is not None:
            prompts = [self.prompt] * n
        elif prompts is None or len(prompts) != n:
            raise ValueError(f"{self.name}: no prompt set, so forward needs one prompt per image ({n} images)")
        text = self.encode_text(list(prompts))
        image = self.encoder(images, generators)
        return spherical_dist_loss(image, text[:, None]).mean(1)


class CLIPImageGuidance(CLIPGuidance):
    """Visual personalisation: spherical distance to the normalised mean embedding of reference images.

    ``references``: image paths, a folder of images (or a list of both), or a dict mapping each prompt to
    those, for one reference set per prompt (each item is pulled to its own prompt's set). Attributes:
    ``targets`` (K, D), one unit target per set (K = 1 without a dict), ``index`` (prompt -> row of
    ``targets``; None without a dict), ``target`` (the single set's (D,) target; None with a dict) and
    ``references`` (the resolved image paths: a list, or a dict prompt -> list).
    """

    default_name = "clip_image"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model_config: str | None = None,
                 references: list[str] | str | dict[str, list[str] | str] | None = None, num_cuts: int = 16,
                 cut_power: float = 0.3, weight: float = 1.0, name: str | None = None):
        if not references:
            raise ValueError("CLIPImageGuidance needs references: image paths, a folder of images, "
                             "or a dict prompt -> those")
        by_prompt = isinstance(references, Mapping)
        sets = {str(p): resolve_image_paths(r) for p, r in references.items()} if by_prompt else {
            "": resolve_image_paths(references)}
        super().__init__(model_name, pretrained, model_config, num_cuts, cut_power, weight, name)
        paths = {p: [str(x) for x in found] for p, found in sets.items()}
        self.references = paths if by_prompt else paths[""]
        self.index = {p: k for k, p in enumerate(sets)} if by_prompt else None
        targets = torch.stack([self.embed_references(found) for found in sets.values()])
        self.register_buffer("targets", targets, persistent=False)
        self.freeze()

    @torch.no_grad()
    def embed_references(self, paths: Sequence[str | Path]) -> Tensor:
        """The unit target (D,) of one reference set: the normalised mean of its images' CLIP embeddings.

        Each image goes through the model's own eval transform (resize shortest side, centre crop, normalise),
        which handles any size and aspect; the result does not depend on the images' order.
        """
        pixels = torch.stack([self.preprocess(im) for im in load_images([Path(p) for p in paths])])
        device = next(self.encoder.visual.parameters()).device
        return F.normalize(self.encoder.embed(pixels.to(device)).mean(0), dim=-1)

    @property
    def target(self) -> Tensor | None:
        """The single reference set's unit target (D,); None when the references are given per prompt."""
        return self.targets[0] if self.index is None else None

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item spherical distance to its reference target, averaged over cutouts: (N,)."""
        image = self.encoder(images, generators)
        n = images.shape[0]
        rows = [0] * n if self.index is None else per_prompt(self.index, prompts, n, self.name, "references",
                                                              "<image paths or folder>")
        target = self.targets[rows].to(image.dtype)
        return spherical_dist_loss(image, target[:, None]).mean(1)
