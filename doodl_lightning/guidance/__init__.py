"""Guidance objectives: frozen differentiable models, images in [-1, 1] -> per-item loss (N,), lower is better."""
from .aesthetic import AestheticGuidance
from .augment import Cutouts
from .base import Guidance
from .blackbox import BlackBoxReward
from .classifier import ClassifierGuidance
from .clip import CLIPGuidance, CLIPImageGuidance, CLIPTextGuidance, spherical_dist_loss
from .hps import HPSGuidance
from .hpsv3 import HPSv3Guidance
from .image_reward import ImageRewardGuidance
from .mps import MPSGuidance
from .noise_norm import NoiseNormRegularizer
from .pickscore import PickScoreGuidance
from .robust import ExpectationOverTransforms
from .symmetry import SymmetryGuidance

__all__ = [
    "Guidance",
    "Cutouts",
    "CLIPGuidance",
    "CLIPTextGuidance",
    "CLIPImageGuidance",
    "AestheticGuidance",
    "ClassifierGuidance",
    "HPSGuidance",
    "HPSv3Guidance",
    "MPSGuidance",
    "PickScoreGuidance",
    "ImageRewardGuidance",
    "SymmetryGuidance",
    "NoiseNormRegularizer",
    "ExpectationOverTransforms",
    "BlackBoxReward",
    "spherical_dist_loss",
]
