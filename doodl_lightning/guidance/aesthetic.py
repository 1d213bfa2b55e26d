"""Aesthetic guidance: a LAION aesthetic predictor head on normalised CLIP image features; maximise the score."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .clip import CLIPGuidance
from .loading import load_into, load_state_dict_file
from ..checks import check_finite
from ..precision import at_least_float32, to_module_dtype

__all__ = ["AestheticGuidance", "load_aesthetic_head"]

_EXPECTED = "a LAION aesthetic head: {weight: [1, D], bias: [1]} (v1 linear) or layers.{0,2,4,6,7}.{weight,bias} (improved MLP)"


class _MLPHead(nn.Module):
    """The improved predictor's ``layers`` stack, rebuilt with Linears at the file's indices (Dropout elsewhere)."""

    def __init__(self, shapes: dict[int, tuple[int, int]]):
        super().__init__()
        self.layers = nn.Sequential(
            *(nn.Linear(shapes[i][1], shapes[i][0]) if i in shapes else nn.Dropout(0.0) for i in range(max(shapes) + 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def load_aesthetic_head(path: str | Path) -> nn.Module:
    """Build the head a file describes: v1 ``Linear(D, 1)`` or the improved predictor's Linear stack.

    The improved predictor (christophschuhmann/improved-aesthetic-predictor) is Linear/Dropout layers with no
    activations; its Linears sit at indices 0, 2, 4, 6, 7 of ``layers``, rebuilt at the same indices so the
    file's keys load unchanged.
    """
    state = load_state_dict_file(path, "aesthetic head")
    if set(state) == {"weight", "bias"} and state["weight"].ndim == 2:
        head: nn.Module = nn.Linear(state["weight"].shape[1], 1)
    else:
        keys = [re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k) for k in state]
        index = sorted({int(m.group(1)) for m in keys if m})
        ok = index and all(keys) and all(f"layers.{i}.weight" in state and state[f"layers.{i}.weight"].ndim == 2
                                         for i in index)
        if not ok:
            raise ValueError(f"aesthetic head {path}: expected {_EXPECTED}; got keys {sorted(state)[:6]}")
        shapes = {i: tuple(state[f"layers.{i}.weight"].shape) for i in index}
        chain = [shapes[i] for i in index]
        if any(prev[0] != nxt[1] for prev, nxt in zip(chain, chain[1:])):
            raise ValueError(f"aesthetic head {path}: layer shapes {chain} do not chain (out of one != in of next)")
        head = _MLPHead(shapes)
    load_into(head, state, path, "aesthetic head")
    out_features = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
    if out_features != 1:
        raise ValueError(f"aesthetic head {path}: expected one output score, got {out_features}")
    return head


def _head_in_features(head: nn.Module) -> int:
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


class AestheticGuidance(CLIPGuidance):
    """Loss = -score (maximise), or |score - target| when ``target`` is set; score averaged over cutouts.

    As doodl.py's ``aesthetic_loss_fn`` / ``aesthetic_score`` (l. 553-650): the image clamped to [-1, 1], cutouts
    pooled to the input size, and each cutout's score clipped to ``score_clip`` = [1, 10] (``.clip(1, 10)``)
    BEFORE the mean, so a cutout scored outside that range carries no gradient; ``score_clip=None`` turns the
    clipping off. ``score`` (a measurement) stays unclipped.
    """

    default_name = "aesthetic"

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", model_config: str | None = None,
                 head: str | None = None, target: float | None = None, num_cuts: int = 16, cut_power: float = 0.3,
                 weight: float = 1.0, name: str | None = None, score_clip: tuple[float, float] | None = (1.0, 10.0),
                 resample: str = "pool"):
        if not head:
            raise ValueError("AestheticGuidance needs head: a local LAION aesthetic predictor file (.pth/.safetensors)")
        check_finite(target=target)
        if score_clip is not None and (len(score_clip) != 2 or not float(score_clip[0]) < float(score_clip[1])):
            raise ValueError(f"AestheticGuidance score_clip must be [low, high] with low < high (the official is "
                             f"[1, 10]) or null for no clipping, got {score_clip!r}")
        head_module = load_aesthetic_head(head)  # checked before the (larger) CLIP model is loaded
        super().__init__(model_name, pretrained, model_config, num_cuts, cut_power, weight, name,
                         resample=resample)  # image tower only
        self.head = head_module
        embed_dim = self.encoder.visual.output_dim
        if _head_in_features(self.head) != embed_dim:
            raise ValueError(
                f"aesthetic head {head} takes {_head_in_features(self.head)}-d features but "
                f"{self.model_name} embeds to {embed_dim} (v1/improved heads expect ViT-L-14, 768)"
            )
        self.target = None if target is None else float(target)
        self.score_clip = None if score_clip is None else (float(score_clip[0]), float(score_clip[1]))
        self.freeze()

    def cutout_scores(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """Predicted aesthetic score of each cutout (N, cuts_per_item), unclipped, at least float32."""
        features = self.encoder(images, generators)  # unit-norm (as the LAION predictors were trained), >= float32
        return at_least_float32(self.head(to_module_dtype(features, self.head))).squeeze(-1)

    def score(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """Predicted aesthetic score per item (N,), averaged over cutouts, unclipped, at least float32."""
        return self.cutout_scores(images, generators).mean(1)

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item loss (N,): -score, or |score - target|, of the mean of the cutouts' clipped scores."""
        return self._loss_of(self.cutout_scores(images, generators), self.score_clip)

    def metric_value(self, images: Tensor, prompts: Sequence[str] | None = None,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """As a held-out metric: the loss of the UNclipped scores. The clip only silences the gradient of
        out-of-range cutouts while optimising; a measurement clipped at 10 would hide every score past it."""
        images = to_module_dtype(images, self)
        return at_least_float32(self._loss_of(self.cutout_scores(images, generators), None))

    def _loss_of(self, scores: Tensor, score_clip: tuple[float, float] | None) -> Tensor:
        if score_clip is not None:
            scores = scores.clamp(*score_clip)
        score = scores.mean(1)
        return -score if self.target is None else (score - self.target).abs()
