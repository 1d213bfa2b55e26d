"""Symmetry guidance: the image should equal its horizontal mirror."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Guidance

__all__ = ["SymmetryGuidance"]


class SymmetryGuidance(Guidance):
    """Per-item mean squared difference between the image and its left-right mirror."""

    default_name = "symmetry"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        self.freeze()

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """(N, 3, H, W) -> (N,) mirror MSE (no weights: computed in the images' own dtype)."""
        return (images - images.flip(-1)).pow(2).mean(dim=(1, 2, 3))
