"""The independent evaluator: a plain CNN (no residual blocks; a different architecture, seed and data
stream from the guidance classifier) predicting every attribute of single-shape images plus the
procedural quality score. It is used ONLY to measure generations, never to guide them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ATTRIBUTES, ATTRIBUTE_NAMES, IMAGE_SIZE, NUM_CLASSES

__all__ = ["ShapesEvaluatorNet", "Evaluator", "load_evaluator"]


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ShapesEvaluatorNet(nn.Module):
    """VGG-style CNN on 32x32 inputs in [-1, 1]; heads: one linear classifier per attribute + quality."""

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.MaxPool2d(2),
        )  # -> [4w, 4, 4]: the flatten keeps where the shape is
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, NUM_CLASSES[a]) for a in ATTRIBUTES})
        self.quality = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(x))
        out = {a: head(h) for a, head in self.heads.items()}
        out["quality"] = self.quality(h).squeeze(-1)
        return out


class Evaluator:
    """``evaluator(images)`` with images [N, 3, H, W] in [-1, 1] (resized to 32x32 if needed) returns
    ``{attr: LongTensor [N]}`` for shape, colour, size, position, background (indices into
    ``data.ATTRIBUTE_NAMES[attr]``), ``{attr + "_probs": [N, C]}`` and ``"quality"``: FloatTensor [N] (0..10).
    ``names(pred)`` turns a prediction into per-image dicts of attribute names."""

    def __init__(self, net: ShapesEvaluatorNet, device="cpu"):
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        outs = []
        for chunk in images.split(batch_size):
            x = chunk.to(self.device, torch.float32)
            if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
                x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
            outs.append(self.net(x))
        res = {}
        for a in ATTRIBUTES:
            logits = torch.cat([o[a] for o in outs])
            res[a] = logits.argmax(-1).cpu()
            res[a + "_probs"] = logits.softmax(-1).cpu()
        res["quality"] = torch.cat([o["quality"] for o in outs]).cpu()
        return res

    @staticmethod
    def names(pred: dict[str, torch.Tensor]) -> list[dict]:
        n = len(pred["shape"])
        return [{a: ATTRIBUTE_NAMES[a][int(pred[a][i])] for a in ATTRIBUTES} | {"quality": float(pred["quality"][i])}
                for i in range(n)]


def load_evaluator(path, device="cpu") -> Evaluator:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    net = ShapesEvaluatorNet(width=cfg["width"], hidden=cfg["hidden"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    return Evaluator(net, device)
