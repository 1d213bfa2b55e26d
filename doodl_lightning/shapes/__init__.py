"""The shapes world: a miniature Stable Diffusion, CLIP, classifier, aesthetic head and independent
evaluator trained on procedural shapes, shipped as safetensors under ``weights/``.

Paths (all inside the installed package)::

    weights_dir()/sd-shapes/                   Stable-Diffusion-layout diffusers directory
    weights_dir()/shapes-clip/shapes-clip.json open_clip model config (open_clip names a model by the file stem)
    weights_dir()/shapes-clip/open_clip_model.safetensors
    weights_dir()/classifier/                  config.json (arch "timm:test_resnet"), model.safetensors, labels.txt
    weights_dir()/aesthetic/head.safetensors   LAION linear-head format {weight [1, D], bias [1]}
    weights_dir()/evaluator/                   measurement only; ``load_evaluator()``
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "weights_dir", "sd_dir", "clip_config_path", "clip_checkpoint_path", "CLIP_MODEL_NAME", "classifier_dir",
    "classifier_spec", "aesthetic_head_path", "evaluator_dir", "load_evaluator", "register_shapes_clip",
]

CLIP_MODEL_NAME = "shapes-clip"


def weights_dir() -> Path:
    """Directory of the shipped shapes-world weights."""
    return Path(__file__).resolve().parent / "weights"


def sd_dir() -> Path:
    """The shapes diffusion model: load with ``StableDiffusionPipeline.from_pretrained(sd_dir())``."""
    return weights_dir() / "sd-shapes"


def clip_config_path() -> Path:
    """open_clip model config JSON of shapes-CLIP (``open_clip.add_model_config(path)`` registers "shapes-clip":
    open_clip's registry names a model after its config file's stem, hence not ``config.json``)."""
    return weights_dir() / "shapes-clip" / f"{CLIP_MODEL_NAME}.json"


def clip_checkpoint_path() -> Path:
    """shapes-CLIP checkpoint, the ``pretrained=`` argument of ``open_clip.create_model_and_transforms``."""
    return weights_dir() / "shapes-clip" / "open_clip_model.safetensors"


def register_shapes_clip() -> str:
    """``open_clip.add_model_config`` the shipped config; returns the model name."""
    import open_clip

    open_clip.add_model_config(str(clip_config_path()))
    return CLIP_MODEL_NAME


def classifier_dir() -> Path:
    """Guidance classifier: ``config.json`` (arch, input_size, mean, std), ``model.safetensors``, ``labels.txt``."""
    return weights_dir() / "classifier"


def classifier_spec() -> dict:
    """The guidance classifier's config: arch ("timm:<name>"), num_classes, input_size, mean, std, labels."""
    cfg = json.loads((classifier_dir() / "config.json").read_text())
    cfg["labels"] = (classifier_dir() / "labels.txt").read_text().split("\n")[: cfg["num_classes"]]
    cfg["weights"] = str(classifier_dir() / "model.safetensors")
    return cfg


def aesthetic_head_path() -> Path:
    """Aesthetic-style linear head on normalised shapes-CLIP image features (LAION format)."""
    return weights_dir() / "aesthetic" / "head.safetensors"


def evaluator_dir() -> Path:
    return weights_dir() / "evaluator"


def load_evaluator(device="cpu", path=None):
    """The independent evaluator (measurement only, never guidance): a callable images[-1, 1] -> dict."""
    from .evaluator import load_evaluator as _load

    return _load(path or evaluator_dir(), device=device)
