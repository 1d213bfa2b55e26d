"""Multicrop "cutouts": random square crops of each image, resized to a guidance model's input size."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import default_generators
from ..checks import check_finite
from ..precision import at_least_float32

__all__ = ["Cutouts", "resize", "normalize"]


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
    """[-1, 1] images -> a model's input normalisation ((x + 1) / 2 - mean) / std, per channel."""
    # Built from Python floats each call so a model cast to bf16 does not round the constants.
    scale = torch.tensor([0.5 / s for s in std], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device)
    return (images.float() * scale + shift.view(1, -1, 1, 1)).to(images.dtype)


class Cutouts(nn.Module):
    """Random square crops, size = rand**cut_power * (max_size - min_size) + min_size, as the official DOODL.

    ``forward(images (N, C, H, W), generators)`` returns (N * max(num_cuts, 1), C, cut_size, cut_size),
    item-major: rows ``i * num_cuts : (i + 1) * num_cuts`` are item i's cuts. ``num_cuts=0`` means no crops,
    just the whole image resized (one row per item). Item i's crops are drawn only from ``generators[i]``
    (on CPU), so they do not depend on which other items share the batch. With ``generators=None`` each call
    uses fresh generators seeded ``DEFAULT_SEED + i``: the same crops every call.
    """

    def __init__(self, cut_size: int, num_cuts: int = 16, cut_power: float = 0.3):
        super().__init__()
        check_finite(cut_power=cut_power)
        if cut_size < 1 or num_cuts < 0:
            raise ValueError(f"Cutouts needs cut_size >= 1 and num_cuts >= 0, got {cut_size=} {num_cuts=}")
        self.cut_size = int(cut_size)
        self.num_cuts = int(num_cuts)
        self.cut_power = float(cut_power)

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
                cuts.append(resize(crop, self.cut_size))
        return torch.cat(cuts)

    def extra_repr(self) -> str:
        return f"cut_size={self.cut_size}, num_cuts={self.num_cuts}, cut_power={self.cut_power}"
