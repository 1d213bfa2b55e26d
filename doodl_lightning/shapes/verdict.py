"""The independent evaluator's verdict as a black-box reward: 1 when it reads the item's target shape, else 0.

The evaluator is otherwise measurement only. Issue 28 (item 4) asks for a reward with no gradient in the shapes world,
held out from the guide: this callable, wrapped in ``guidance.BlackBoxReward``, is that reward. A run that optimises
it has the evaluator as both reward and judge, so its evaluator accuracy is no held-out measure: report the guide
classifier's verdict beside it (``experiments/benchmarks/blackbox_demo.py`` does).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import ShapesWeights
from .data import SHAPES

__all__ = ["EvaluatorVerdict"]


class EvaluatorVerdict:
    """``verdict(images, prompts) -> (N,)``: 1.0 where the evaluator's most likely shape is the prompt's target class
    (and, with ``threshold``, its probability is at least that), else 0.0. A step function of the image: no useful
    gradient even where the network has one, which is the point.

    targets: prompt -> shape name (``data.SHAPES``: circle, triangle, square, pentagon, hexagon, star).
    weights: a shapes-world weights directory (null: the shipped one). device: where the evaluator runs.
    """

    def __init__(self, targets: Mapping[str, str], threshold: float | None = None, weights: str | None = None,
                 device: str = "cpu"):
        if not isinstance(targets, Mapping) or not targets:
            raise ValueError("EvaluatorVerdict: targets must map each prompt to a shape name, e.g. "
                             "{'a small red polygon': 'triangle'}")
        unknown = sorted({str(v) for v in targets.values() if v not in SHAPES})
        if unknown:
            raise ValueError(f"EvaluatorVerdict: unknown target shape {unknown[0]!r}; choose one of {', '.join(SHAPES)}")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(f"EvaluatorVerdict: threshold must be in [0, 1) or null, got {threshold!r}")
        self.targets = {p: SHAPES.index(v) for p, v in targets.items()}
        self.threshold = threshold
        self.evaluator = (ShapesWeights() if weights is None else ShapesWeights(weights)).evaluator(device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        missing = next((p for p in prompts if p not in self.targets), None)
        if missing is not None:
            raise ValueError(f"EvaluatorVerdict: prompt {missing!r} has no target: add it to targets")
        out = self.evaluator(images)
        want = torch.tensor([self.targets[p] for p in prompts])
        hit = out["shape"] == want
        if self.threshold is not None:
            hit &= out["shape_probs"].gather(1, want[:, None])[:, 0] >= self.threshold
        return hit.float()
