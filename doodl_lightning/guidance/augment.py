"""Multicrop "cutouts": random square crops of each image, resized to a guidance model's input size."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import default_generators
from ..checks import check_finite
from ..precision import at_least_float32

__all__ = ["Cutouts", "RESAMPLE", "clamp_images", "resize", "normalize"]

# how a cutout reaches the model's input size: "pool" is the official ``MakeCutouts`` (``F.adaptive_avg_pool2d``,
# doodl.py l. 166-188), "bilinear" our earlier antialiased bilinear resize (``resize``)
RESAMPLE = ("pool", "bilinear")


def clamp_images(images: Tensor) -> Tensor:
    """[-1, 1] images clamped to that range, as the official loss functions do before every guidance model.

    doodl.py's CLIP, aesthetic and FGVC losses (l. 301, 384, 623) all start with ``((im / 2) + 0.5).clamp(0, 1)``:
    VAE decodes often overshoot [-1, 1], and those pixels then carry neither loss nor gradient. Clamping in
    [-1, 1] is the same map before the affine move to [0, 1] (which ``normalize`` does).
    """
    return images.clamp(-1.0, 1.0)


def resize(images: Tensor, size: int) -> Tensor:
    """Differentiable resize to (size, size); antialiased when shrinking so small models see no aliasing.

    Half-precision images are resized in float32 and rounded once (CPU has no half antialiased kernel).
    """
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    out = F.interpolate(at_least_float32(images), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out.to(images.dtype)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[-1, 1] images -> a model's input normalisation ((x + 1) / 2 - mean) / std, per channel.

    Computed in at least float32 (half-precision images are rounded once at the end); float64 stays float64, so a
    64-true run's guidance losses are not rounded to float32 here.
    """
    # Built from Python floats each call so a model cast to bf16 does not round the constants.
    dtype = torch.promote_types(images.dtype, torch.float32)
    scale = torch.tensor([0.5 / s for s in std], dtype=dtype, device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)], dtype=dtype, device=images.device)
    return (images.to(dtype) * scale + shift.view(1, -1, 1, 1)).to(images.dtype)


class Cutouts(nn.Module):
    """Random square crops, size = rand**cut_power * (max_size - min_size) + min_size, as the official DOODL.

    ``forward(images (N, C, H, W), generators)`` returns (N * max(num_cuts, 1), C, cut_size, cut_size),
    item-major: rows ``i * num_cuts : (i + 1) * num_cuts`` are item i's cuts. ``num_cuts=0`` means no crops,
    just the whole image resized (one row per item; ``resize``, antialiased when shrinking). Item i's crops are
    drawn only from ``generators[i]`` (on CPU), so they do not depend on which other items share the batch. With
    ``generators=None`` each call uses fresh generators seeded ``DEFAULT_SEED + i``: the same crops every call.
    ``resample``: how each crop reaches ``cut_size``: "pool" (default) is the official ``F.adaptive_avg_pool2d``
    (doodl.py ``MakeCutouts``, l. 187), "bilinear" the antialiased bilinear ``resize`` (our earlier default).
    """

    def __init__(self, cut_size: int, num_cuts: int = 16, cut_power: float = 0.3, resample: str = "pool"):
        super().__init__()
        check_finite(cut_power=cut_power)
        if cut_size < 1 or num_cuts < 0:
            raise ValueError(f"Cutouts needs cut_size >= 1 and num_cuts >= 0, got {cut_size=} {num_cuts=}")
        if resample not in RESAMPLE:
            raise ValueError(f"unknown cutout resample {resample!r}: use one of {', '.join(map(repr, RESAMPLE))}")
        self.cut_size = int(cut_size)
        self.num_cuts = int(num_cuts)
        self.cut_power = float(cut_power)
        self.resample = resample

    def _to_cut_size(self, crop: Tensor) -> Tensor:
        if self.resample == "bilinear":
            return resize(crop, self.cut_size)
        # the official pooling; half precision pooled in float32 and rounded once, as ``resize`` does
        return F.adaptive_avg_pool2d(at_least_float32(crop), self.cut_size).to(crop.dtype)

    @property
    def cuts_per_item(self) -> int:
        """Rows per item in the output."""
        return max(self.num_cuts, 1)

    def forward(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """(N, C, H, W) -> (N * cuts_per_item, C, cut_size, cut_size), item-major."""
        if self.num_cuts == 0:
            return resize(images, self.cut_size)
        n, _, height, width = images.shape
        if generators is None:
            generators = default_generators(n)
        if len(generators) != n:
            raise ValueError(f"Cutouts got {len(generators)} generators for {n} images; need one per image")
        max_size = min(height, width)
        min_size = min(height, width, self.cut_size)
        cuts = []
        for image, gen in zip(images, generators):
            # Always 3 draws per cut from the item's own generator: the stream is the same whatever the sizes.
            u = torch.rand(self.num_cuts, 3, generator=gen, dtype=torch.float64)
            sizes = (u[:, 0] ** self.cut_power * (max_size - min_size) + min_size).long().clamp(min_size, max_size)
            for (size, ux, uy) in zip(sizes.tolist(), u[:, 1].tolist(), u[:, 2].tolist()):
                x0 = min(int(ux * (width - size + 1)), width - size)
                y0 = min(int(uy * (height - size + 1)), height - size)
                crop = image[None, :, y0 : y0 + size, x0 : x0 + size]
                cuts.append(self._to_cut_size(crop))
        return torch.cat(cuts)

    def extra_repr(self) -> str:
        return f"cut_size={self.cut_size}, num_cuts={self.num_cuts}, cut_power={self.cut_power}, resample={self.resample}"
