"""The independent evaluator as held-out metrics of a noise optimisation (``model.metrics``), never guidance."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance.base import Guidance
from .data import ATTRIBUTE_NAMES, COARSE_SHAPES, FINE_TO_COARSE, IMAGE_SIZE, POSITION_PHRASE
from .evaluator import ShapesEvaluatorNet

__all__ = ["EvaluatorMetric", "prompt_attributes", "MEASURES"]

MEASURES = ("quality", "prompt")


def prompt_attributes(prompt: str) -> dict[str, list[int]]:
    """The evaluator classes a single-object shapes prompt names, per attribute:
    ``{"colour": [3], "shape": [1, 2, 3, 4]}``
    for "a green polygon" (a coarse noun allows each of its fine classes). One-line errors for two objects or none."""
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    if " and " in text:
        raise ValueError(f"the evaluator reads single-object images; prompt {prompt!r} names two objects")
    named: dict[str, list[int]] = {}
    for k, phrase in sorted(enumerate(POSITION_PHRASE), key=lambda kp: -len(kp[1])):  # "at the top left" first
        if f" {phrase} " in text:
            named.setdefault("position", []).append(k)
            text = text.replace(f" {phrase} ", " ")
    if len(named.get("position", [])) > 1:
        raise ValueError(f"prompt {prompt!r} names {len(named['position'])} positions")
    for attr in ("colour", "size", "background", "shape"):
        for k, word in enumerate(ATTRIBUTE_NAMES[attr]):
            if f" {word} " in text:
                named.setdefault(attr, []).append(k)
    for c, coarse in enumerate(COARSE_SHAPES):
        if coarse not in ATTRIBUTE_NAMES["shape"] and f" {coarse} " in text:
            named.setdefault("shape", []).extend(k for k, to in enumerate(FINE_TO_COARSE) if to == c)
    if not named.get("shape"):
        nouns = ", ".join(ATTRIBUTE_NAMES["shape"] + COARSE_SHAPES[1:2])
        raise ValueError(f"prompt {prompt!r} names no shape (one of {nouns})")
    return named


class EvaluatorMetric(Guidance):
    """The shapes world's independent evaluator (``weights/evaluator``: own architecture, seed and data) as a
    held-out metric, lower is better like every objective:

    - ``measure: quality``: 10 - the predicted procedural quality (0..10; 0 = a pristine render), ReNO's
      ``10 - score`` convention for its aesthetic reward;
    - ``measure: prompt``: 1 - the mean over the attributes the item's prompt names (colour, shape -- a coarse
      "polygon" counts each of its fine classes --, size, position, background) of the probability the evaluator
      gives them: 0 = the evaluator is sure the image shows the prompt.

    A measurement only (``metric_only``): ``model.metrics`` accepts it, ``model.guidance`` refuses it, so what
    judges a run is never what it optimised. ``evaluator_dir``: a weights folder (default: the shipped one).
    """

    default_name = "evaluator"
    metric_only = True

    def __init__(self, measure: str = "quality", evaluator_dir: str | None = None, weight: float = 1.0,
                 name: str | None = None):
        if measure not in MEASURES:
            raise ValueError(f"unknown evaluator measure {measure!r}; choose one of {', '.join(MEASURES)}")
        super().__init__(weight, name or f"evaluator_{measure}")
        from safetensors.torch import load_file

        from . import ShapesWeights

        path = Path(evaluator_dir) if evaluator_dir else ShapesWeights().evaluator_dir
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"evaluator_dir {path} has no config.json: give the shapes evaluator's "
                                    f"weights folder")
        cfg = json.loads((path / "config.json").read_text())
        self.net = ShapesEvaluatorNet(width=cfg["width"], hidden=cfg["hidden"])
        self.net.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
        self.measure = measure
        self._wanted: dict[str, dict[str, list[int]]] = {}  # prompt -> named classes (cache)
        self.freeze()

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        x = images
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        out = self.net(x)
        if self.measure == "quality":
            return 10.0 - out["quality"].float()
        if prompts is None or len(prompts) != len(images):
            raise ValueError(f"{self.name}: measure 'prompt' needs one prompt per image ({len(images)} images)")
        losses = []
        for i, prompt in enumerate(prompts):
            if prompt not in self._wanted:
                self._wanted[prompt] = prompt_attributes(prompt)
            probs = [out[attr][i].float().softmax(-1)[classes].sum() for attr, classes in self._wanted[prompt].items()]
            losses.append(1 - torch.stack(probs).mean())
        return torch.stack(losses)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, measure={self.measure!r} (held out: never optimised)"
