"""The shapes world: a miniature Stable Diffusion, CLIP, classifier, aesthetic head and independent
evaluator trained on procedural shapes, shipped as safetensors under ``weights/``.

``ShapesWeights`` is the one accessor of a weights directory (the shipped one by default, or a copy of
its layout such as the tests' tiny random world): paths, loaders and recommended settings::

    sd-shapes/                          Stable-Diffusion-layout diffusers directory
    shapes-clip/shapes-clip.json        open_clip model config (open_clip names a model by the file stem)
    shapes-clip/open_clip_model.safetensors
    classifier/                         config.json (arch "timm:test_resnet", input size, mean, std),
                                        model.safetensors, labels.txt
    aesthetic/head.safetensors          LAION linear-head format {weight [1, D], bias [1]}
    evaluator/                          measurement only, never guidance
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CLIP_MODEL_NAME", "ShapesWeights", "weights_dir"]

CLIP_MODEL_NAME = "shapes-clip"


def weights_dir() -> Path:
    """Directory of the shipped shapes-world weights."""
    return Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ShapesWeights:
    """Paths, loaders and recommended settings of a shapes-world weights directory."""

    root: Path = field(default_factory=weights_dir)
    # sd-shapes' classifier-free guidance scale, chosen on held-out prompt sets (its model card): higher
    # scales draw "polygon" as rounded hexagons read as circles, lower ones blur stars
    guidance_scale: float = 2.5
    sd: Path = field(init=False)               # the diffusion model: ``model:`` of the DOODL module
    clip_config: Path = field(init=False)      # open_clip config; its stem is the model name it registers
    clip_checkpoint: Path = field(init=False)
    classifier: Path = field(init=False)       # directory: config.json, model.safetensors, labels.txt
    aesthetic_head: Path = field(init=False)
    evaluator_dir: Path = field(init=False)

    def __post_init__(self):
        root = Path(self.root)
        layout = {"root": root, "sd": root / "sd-shapes", "clip_config": root / "shapes-clip" / f"{CLIP_MODEL_NAME}.json",
                  "clip_checkpoint": root / "shapes-clip" / "open_clip_model.safetensors",
                  "classifier": root / "classifier", "aesthetic_head": root / "aesthetic" / "head.safetensors",
                  "evaluator_dir": root / "evaluator"}
        for name, path in layout.items():
            object.__setattr__(self, name, path)

    def has(self, *parts: str) -> bool:
        """Whether the directory holds these parts (``sd-shapes``, ``shapes-clip``, ``classifier``, ...)."""
        return all((self.root / p).exists() for p in parts)

    # -- guidance arguments (the YAML keys of the framework's guidance classes) ---------------------
    def clip_kwargs(self) -> dict:
        """``model_name``, ``model_config``, ``pretrained`` of the CLIP-based guidance classes."""
        return {"model_name": CLIP_MODEL_NAME, "model_config": str(self.clip_config), "pretrained": str(self.clip_checkpoint)}

    def classifier_config(self) -> dict:
        """The guidance classifier's config.json: arch ("timm:<name>"), num_classes, input_size, mean, std."""
        return json.loads((self.classifier / "config.json").read_text())

    def classifier_labels(self) -> list[str]:
        return (self.classifier / "labels.txt").read_text().split("\n")[: self.classifier_config()["num_classes"]]

    def classifier_kwargs(self) -> dict:
        """``ClassifierGuidance`` arguments but the target: arch, checkpoint, labels, num_classes, input_size, mean, std."""
        cfg = self.classifier_config()
        return {"arch": cfg["arch"], "checkpoint": str(self.classifier / "model.safetensors"),
                "labels": str(self.classifier / "labels.txt"), "num_classes": cfg["num_classes"],
                "input_size": cfg["input_size"], "mean": cfg["mean"], "std": cfg["std"]}

    # -- loaders -----------------------------------------------------------------------------------
    def backbone(self):
        """The diffusion model as the framework's ``Backbone`` (float32)."""
        from ..families import PretrainedBackbone

        return PretrainedBackbone(str(self.sd))

    def register_clip(self) -> str:
        """``open_clip.add_model_config`` the shipped config; returns the model name."""
        import open_clip

        open_clip.add_model_config(str(self.clip_config))
        return CLIP_MODEL_NAME

    def evaluator(self, device="cpu"):
        """The independent evaluator (measurement only, never guidance): a callable images[-1, 1] -> dict."""
        from .evaluator import load_evaluator

        return load_evaluator(self.evaluator_dir, device=device)
