"""Symmetry guidance: the image should equal its horizontal mirror."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Guidance
from ..dtypes import at_least_float32

__all__ = ["SymmetryGuidance"]


class SymmetryGuidance(Guidance):
    """Per-item mean squared difference between the image and its left-right mirror."""

    default_name = "symmetry"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        self.freeze()

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str] | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """(N, 3, H, W) -> (N,) mirror MSE."""
        return at_least_float32(images - images.flip(-1)).pow(2).mean(dim=(1, 2, 3))
