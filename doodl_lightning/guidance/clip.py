"""CLIP guidance: spherical distance between CLIP embeddings of the image's cutouts and a text or image target."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Cutouts, normalize
from .base import Guidance
from .loading import load_images, load_open_clip, resolve_image_paths
from ..dtypes import at_least_float32

__all__ = ["spherical_dist_loss", "CLIPImageEncoder", "CLIPTextGuidance", "CLIPImageGuidance"]


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
        """CLIP-normalised pixels (B, 3, s, s) -> unit embeddings (B, D)."""
        dtype = next(self.visual.parameters()).dtype
        return F.normalize(at_least_float32(self.visual(pixels.to(dtype))), dim=-1)

    def forward(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> (N, cuts_per_item, D) unit embeddings."""
        cuts = self.cutouts(images, generators)
        emb = self.embed(normalize(cuts, self.mean, self.std))
        return emb.view(images.shape[0], self.cutouts.cuts_per_item, -1)


class CLIPTextGuidance(Guidance):
    """Spherical distance between the cutouts' CLIP embeddings and a prompt's (the fixed ``prompt`` or each item's)."""

    default_name = "clip_text"

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        model_config: str | None = None,
        prompt: str | None = None,
        num_cuts: int = 16,
        cut_power: float = 0.3,
        weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight, name)
        import open_clip

        model, _, self.model_name = load_open_clip(model_name, pretrained, model_config)
        self.model = model
        self.encoder = CLIPImageEncoder(model.visual, num_cuts, cut_power)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.prompt = prompt
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings (len(prompts), D), float32, cached per prompt (the text tower is frozen)."""
        device = next(self.model.parameters()).device
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            emb = F.normalize(at_least_float32(self.model.encode_text(self.tokenizer(todo).to(device))), dim=-1)
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str] | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Per-item spherical distance to the text, averaged over cutouts: (N,)."""
        n = images.shape[0]
        if self.prompt is not None:
            prompts = [self.prompt] * n
        elif prompts is None or len(prompts) != n:
            raise ValueError(f"{self.name}: no prompt set, so forward needs one prompt per image ({n} images)")
        text = self.encode_text(list(prompts))
        image = self.encoder(images, generators)
        return spherical_dist_loss(image, text[:, None]).mean(1)


class CLIPImageGuidance(Guidance):
    """Visual personalisation: spherical distance to the normalised mean embedding of reference images."""

    default_name = "clip_image"

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        model_config: str | None = None,
        references: list[str] | str | None = None,
        num_cuts: int = 16,
        cut_power: float = 0.3,
        weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight, name)
        if not references:
            raise ValueError("CLIPImageGuidance needs references: image paths or a folder of images")
        paths = resolve_image_paths(references)
        model, preprocess, self.model_name = load_open_clip(model_name, pretrained, model_config)
        # Only the image tower is needed: drop the text tower's memory.
        self.encoder = CLIPImageEncoder(model.visual, num_cuts, cut_power)
        del model
        self.references = [str(p) for p in paths]
        # The model's own eval transform (resize shortest side, centre crop, normalise) handles odd sizes.
        pixels = torch.stack([preprocess(im) for im in load_images(paths)])
        with torch.no_grad():
            target = self.encoder.embed(pixels).mean(0)
        self.register_buffer("target", F.normalize(target, dim=-1), persistent=False)
        self.freeze()

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str] | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Per-item spherical distance to the reference target, averaged over cutouts: (N,)."""
        image = self.encoder(images, generators)
        return spherical_dist_loss(image, self.target.to(image.dtype)).mean(1)
