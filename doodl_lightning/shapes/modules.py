"""The shapes world's LightningModules, one per model, gathered in one place: ``python -m
doodl_lightning.shapes.train`` (LightningCLI) picks one by ``model.class_path`` in ``experiments/shapes/*.yaml``.

Where each lives:

``base_module``         ``ShapesModule``: seed-per-batch data, warmup + cosine learning rate, export at the end
``generator_modules``   ``VAEModule``, ``DiffusionModule`` (together the ``sd-shapes`` directory)
``clip_modules``        ``ClipModule`` (open_clip), ``AestheticModule`` (LAION-style head on its features)
``classifier_modules``  ``ClassifierModule`` (guidance), ``EvaluatorModule`` (measurement only)
``export``              the model card (``write_card``, ``QUALITY_MARK``) and float16 state dicts
``augment``             the classifiers' noise + shift augmentation
``schedule``            SD-1.x's noise schedule (``SD_SCHEDULER_CONFIG``: sd-shapes', epsilon prediction)

Older configs and checkpoints name ``doodl_lightning.shapes.modules.<Class>``; those paths keep working."""
from __future__ import annotations

from .augment import augment
from .base_module import ShapesModule
from .classifier_modules import ClassifierModule, EvaluatorModule
from .clip_modules import OPENAI_MEAN, OPENAI_STD, AestheticModule, ClipModule
from .export import QUALITY_MARK, write_card
from .generator_modules import DiffusionModule, VAEModule, edge_loss
from .schedule import SD_SCHEDULER_CONFIG

__all__ = ["ShapesModule", "VAEModule", "DiffusionModule", "ClipModule", "AestheticModule", "ClassifierModule",
           "EvaluatorModule", "SD_SCHEDULER_CONFIG", "OPENAI_MEAN", "OPENAI_STD", "QUALITY_MARK", "augment",
           "edge_loss", "write_card"]
