"""CLIP guidance: spherical distance between CLIP embeddings of the image's cutouts and a text or image target."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Cutouts, clamp_images, normalize, resize
from .base import Guidance, per_prompt
from .loading import load_images, load_open_clip, resolve_image_paths
from ..precision import at_least_float32, module_dtype, to_module_dtype

__all__ = ["spherical_dist_loss", "reduce_cutouts", "CUTOUT_REDUCTIONS", "CLIPImageEncoder", "CLIPGuidance",
           "CLIPTextGuidance", "CLIPImageGuidance"]

# how the per-cutout distances of one image become its loss: "min" is the official one (doodl.py's
# ``spherical_dist_loss`` returns ``dist.min()`` whenever it gets more than one distance, l. 198-199), "mean" our
# earlier reduction (every cutout gets a gradient, not only the closest)
CUTOUT_REDUCTIONS = ("min", "mean")
# grayscale PIL modes: doodl.py skips one-band reference images (``len(im.getbands()) == 1``, l. 282); "LA", which
# it would fail on, is skipped alike; palette ("P") images are one band too but colour, so they are kept (converted)
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def spherical_dist_loss(x: Tensor, y: Tensor) -> Tensor:
    """Squared great-circle distance 2 * arcsin(|x - y| / 2)**2 between normalised embeddings (last dim).

    Element-wise over the leading dims (no reduction): ``reduce_cutouts`` takes the official minimum over cutouts.
    """
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def reduce_cutouts(dist: Tensor, reduction: str) -> Tensor:
    """(N, cuts) distances -> (N,): the minimum over each item's cutouts (official) or their mean."""
    return dist.amin(1) if reduction == "min" else dist.mean(1)


def _check_reduction(reduction: str) -> str:
    if reduction not in CUTOUT_REDUCTIONS:
        raise ValueError(f"unknown cutout_reduction {reduction!r}: use 'min' (the official DOODL loss) or 'mean'")
    return reduction


class CLIPImageEncoder(nn.Module):
    """Clamp to [-1, 1] -> cutouts -> CLIP normalisation -> image tower -> normalised embeddings (N, cuts_per_item, D).

    The clamp is the official one (doodl.py clamps every image to [0, 1] before its guidance models): pixels of a
    VAE decode outside [-1, 1] carry neither loss nor gradient.
    """

    def __init__(self, visual: nn.Module, num_cuts: int = 16, cut_power: float = 0.3, resample: str = "pool"):
        super().__init__()
        self.visual = visual
        cfg = getattr(visual, "preprocess_cfg", {})
        size = getattr(visual, "image_size", cfg.get("size", 224))
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.cutouts = Cutouts(self.input_size, num_cuts, cut_power, resample)
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def embed(self, pixels: Tensor) -> Tensor:
        """CLIP-normalised pixels (B, 3, s, s) -> unit embeddings (B, D), at least float32."""
        return F.normalize(at_least_float32(self.visual(to_module_dtype(pixels, self.visual))), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """Whole images (N, 3, H, W) in [-1, 1] (clamped), resized to the tower's input size -> unit embeddings (N, D)."""
        return self.embed(normalize(resize(clamp_images(images), self.input_size), self.mean, self.std))

    def reference_pixels(self, image) -> Tensor:
        """One RGB PIL reference image -> CLIP-normalised pixels (3, s, s) as doodl.py's ``load_transform`` (l. 274-277).

        ``ToTensor``, ``Resize(s)`` (shorter side to s, bilinear without antialiasing: torchvision 0.12's tensor
        resize, which the official environment pins), ``CenterCrop(s)``, normalise; s is the tower's input size
        (224 in doodl.py). Computed in float64 (the embedding runs in the tower's dtype).
        """
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float64) / 255.0
        s = self.input_size
        h, w = x.shape[-2:]
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        x = x[:, top:top + s, left:left + s]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std

    def forward(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] (clamped) -> (N, cuts_per_item, D) unit embeddings."""
        cuts = self.cutouts(clamp_images(images), generators)
        emb = self.embed(normalize(cuts, self.mean, self.std))
        return emb.view(images.shape[0], self.cutouts.cuts_per_item, -1)


class CLIPGuidance(Guidance):
    """Base of the guidances on an open_clip image tower: loads the model and builds the cutout ``encoder``.

    Attributes: ``encoder`` (a ``CLIPImageEncoder``), ``model_name`` (the open_clip name the model is
    registered under), ``preprocess`` (the model's eval transform for PIL images) and, with
    ``text_tower=True``, ``model`` (the whole CLIP model); otherwise the text tower is dropped. ``resample``: how
    cutouts reach the tower's input size ("pool", the official ``F.adaptive_avg_pool2d``, or "bilinear").
    """

    def __init__(self, model_name: str, pretrained: str | None, model_config: str | None, num_cuts: int,
                 cut_power: float, weight: float = 1.0, name: str | None = None, text_tower: bool = False,
                 resample: str = "pool"):
        super().__init__(weight, name)
        model, self.preprocess, self.model_name = load_open_clip(model_name, pretrained, model_config)
        if text_tower:
            self.model = model
        self.encoder = CLIPImageEncoder(model.visual, num_cuts, cut_power, resample)

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit CLIP embeddings (N, D) of whole images (N, 3, H, W) in [-1, 1] (no cutouts)."""
        return self.encoder.embed_images(images)


class CLIPTextGuidance(CLIPGuidance):
    """Spherical distance between the cutouts' CLIP embeddings and a prompt's (the fixed ``prompt`` or each item's).

    As doodl.py's ``clip_loss_fn``: the image clamped to [-1, 1], 16 cutouts (cut_power 0.3, pooled to the input
    size), and the loss is the MINIMUM distance over an image's cutouts (``cutout_reduction="min"``; "mean"
    averages them instead). The official ``gen()`` guides with LAION ViT-g-14 (laion2b_s12b_b42k); the default
    ``model_name`` here, ViT-B-32, is ours (a lighter model; set ``model_name``/``pretrained`` for the official one).
    """

    default_name = "clip_text"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model_config: str | None = None,
                 prompt: str | None = None, num_cuts: int = 16, cut_power: float = 0.3, weight: float = 1.0,
                 name: str | None = None, cutout_reduction: str = "min", resample: str = "pool"):
        _check_reduction(cutout_reduction)  # before the model loads: a typo fails fast
        super().__init__(model_name, pretrained, model_config, num_cuts, cut_power, weight, name, text_tower=True,
                         resample=resample)
        self.cutout_reduction = cutout_reduction
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.prompt = prompt
        self._text_cache: dict[tuple[str, torch.dtype | None], Tensor] = {}
        self.freeze()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings (len(prompts), D), at least float32, cached per prompt (the text tower is frozen).

        The cache is per tower dtype, so a tower cast to float64 after a first call re-embeds at float64.
        """
        device = next(self.model.parameters()).device
        dtype = module_dtype(self.model)
        todo = sorted({p for p in prompts if (p, dtype) not in self._text_cache})
        if todo:
            emb = F.normalize(at_least_float32(self.model.encode_text(self.tokenizer(todo).to(device))), dim=-1)
            self._text_cache.update(((p, dtype), e) for p, e in zip(todo, emb))
        return torch.stack([self._text_cache[p, dtype].to(device) for p in prompts])

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item spherical distance to the text, the minimum (or mean) over its cutouts: (N,)."""
        n = images.shape[0]
        if self.prompt is not None:
            prompts = [self.prompt] * n
        elif prompts is None or len(prompts) != n:
            raise ValueError(f"{self.name}: no prompt set, so forward needs one prompt per image ({n} images)")
        text = self.encode_text(list(prompts))
        image = self.encoder(images, generators)
        return reduce_cutouts(spherical_dist_loss(image, text[:, None]), self.cutout_reduction)


class CLIPImageGuidance(CLIPGuidance):
    """Visual personalisation: spherical distance to the normalised mean embedding of reference images.

    ``references``: image paths, a folder of images (or a list of both), or a dict mapping each prompt to
    those, for one reference set per prompt (each item is pulled to its own prompt's set). Attributes:
    ``targets`` (K, D), one unit target per set (K = 1 without a dict), ``index`` (prompt -> row of
    ``targets``; None without a dict), ``target`` (the single set's (D,) target; None with a dict) and
    ``references`` (the image paths used: a list, or a dict prompt -> list).

    As doodl.py's ``clip_loss_fn`` with ``clip_viz_paths``: the target is built with the official reference
    transform (``CLIPImageEncoder.reference_pixels``), grayscale reference images are skipped with a warning (as
    doodl.py skips them), and the loss is the minimum distance over cutouts (``cutout_reduction``, see
    ``CLIPTextGuidance``, also for the official model, ViT-g-14, against our default ViT-B-32).
    """

    default_name = "clip_image"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model_config: str | None = None,
                 references: list[str] | str | dict[str, list[str] | str] | None = None, num_cuts: int = 16,
                 cut_power: float = 0.3, weight: float = 1.0, name: str | None = None, cutout_reduction: str = "min",
                 resample: str = "pool"):
        if not references:
            raise ValueError("CLIPImageGuidance needs references: image paths, a folder of images, "
                             "or a dict prompt -> those")
        _check_reduction(cutout_reduction)
        by_prompt = isinstance(references, Mapping)
        sets = {str(p): resolve_image_paths(r) for p, r in references.items()} if by_prompt else {
            "": resolve_image_paths(references)}
        sets = {p: _without_grayscale(found, p) for p, found in sets.items()}
        super().__init__(model_name, pretrained, model_config, num_cuts, cut_power, weight, name, resample=resample)
        self.cutout_reduction = cutout_reduction
        paths = {p: [str(x) for x in found] for p, found in sets.items()}
        self.references = paths if by_prompt else paths[""]
        self.index = {p: k for k, p in enumerate(sets)} if by_prompt else None
        targets = torch.stack([self.embed_references(found) for found in sets.values()])
        self.register_buffer("targets", targets, persistent=False)
        self._targets_dtype = module_dtype(self.encoder.visual)  # what the targets were embedded in
        self.freeze()

    def _widen_targets(self) -> None:
        """Re-embed the references once the tower runs in float64 (a 64-true run casts it after construction).

        Casting the buffer alone would keep the float32 embedding's rounding (~1e-7) in every float64 loss.
        """
        if module_dtype(self.encoder.visual) == torch.float64 and self._targets_dtype != torch.float64:
            sets = list(self.references.values()) if self.index is not None else [self.references]
            self.targets = torch.stack([self.embed_references(paths) for paths in sets])
            self._targets_dtype = torch.float64

    @torch.no_grad()
    def embed_references(self, paths: Sequence[str | Path]) -> Tensor:
        """The unit target (D,) of one reference set: the normalised mean of its images' unit CLIP embeddings.

        Each image goes through the official transform (``CLIPImageEncoder.reference_pixels``: shorter side resized
        to the input size, centre crop, normalise), which handles any size and aspect; the result does not depend
        on the images' order.
        """
        pixels = torch.stack([self.encoder.reference_pixels(im) for im in load_images([Path(p) for p in paths])])
        device = next(self.encoder.visual.parameters()).device
        return F.normalize(self.encoder.embed(pixels.to(device)).mean(0), dim=-1)

    @property
    def target(self) -> Tensor | None:
        """The single reference set's unit target (D,); None when the references are given per prompt."""
        return self.targets[0] if self.index is None else None

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item spherical distance to its reference target, the minimum (or mean) over its cutouts: (N,)."""
        self._widen_targets()
        image = self.encoder(images, generators)
        n = images.shape[0]
        rows = [0] * n if self.index is None else per_prompt(self.index, prompts, n, self.name, "references",
                                                              "<image paths or folder>")
        target = self.targets[rows].to(image.dtype)
        return reduce_cutouts(spherical_dist_loss(image, target[:, None]), self.cutout_reduction)


def _without_grayscale(paths: list[Path], prompt: str) -> list[Path]:
    """The reference paths without grayscale images, which doodl.py skips (l. 282-284); a warning names each."""
    from PIL import Image

    kept = []
    for path in paths:
        try:
            with Image.open(path) as im:
                mode = im.mode
        except OSError:
            kept.append(path)  # load_images reports the unreadable file with its reason
            continue
        if mode in _GRAYSCALE_MODES:
            warnings.warn(f"CLIPImageGuidance: skipping grayscale reference image {path} (mode {mode}), as the "
                          f"official DOODL does; convert it to RGB to use it", stacklevel=3)
        else:
            kept.append(path)
    if not kept:
        where = f" for prompt {prompt!r}" if prompt else ""
        raise ValueError(f"CLIPImageGuidance: every reference image{where} is grayscale, and grayscale references are "
                         f"skipped (as the official DOODL does); give colour (RGB) images")
    return kept
