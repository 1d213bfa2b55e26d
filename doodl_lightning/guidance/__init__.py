"""Guidance objectives: frozen differentiable models, images in [-1, 1] -> per-item loss (N,), lower is better."""
from .aesthetic import AestheticGuidance
from .augment import Cutouts
from .base import Guidance
from .classifier import ClassifierGuidance
from .clip import CLIPGuidance, CLIPImageGuidance, CLIPTextGuidance, spherical_dist_loss
from .symmetry import SymmetryGuidance

__all__ = [
    "Guidance",
    "Cutouts",
    "CLIPGuidance",
    "CLIPTextGuidance",
    "CLIPImageGuidance",
    "AestheticGuidance",
    "ClassifierGuidance",
    "SymmetryGuidance",
    "spherical_dist_loss",
]
