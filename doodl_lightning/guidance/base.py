"""The guidance interface: a frozen differentiable objective, images in [-1, 1] -> per-item loss."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .. import precision
from ..checks import check_finite
from ..frozen import leave_out_of_checkpoints

__all__ = ["Guidance", "default_generators", "per_prompt", "DEFAULT_SEED"]

T = TypeVar("T")

DEFAULT_SEED = 0


def default_generators(n: int, seed: int = DEFAULT_SEED) -> list[torch.Generator]:
    """One CPU generator per item, item i seeded ``seed + i`` (used when the caller passes none)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def per_prompt(table: Mapping[str, T], prompts: Sequence[str] | None, n: int, owner: str, arg: str,
               value: str = "...") -> list[T]:
    """``table[prompt]`` for each of the ``n`` items' prompts: what a guidance argument given as a dict
    prompt -> value means. One-line errors name the guidance, the prompt and the fix (``value`` describes an entry)."""
    if prompts is None or len(prompts) != n:
        got = "no" if prompts is None else len(prompts)
        raise ValueError(f"{owner}: {arg} is given per prompt, so it needs one prompt per image "
                         f"({n} images, {got} prompts)")
    missing = next((p for p in prompts if p not in table), None)
    if missing is not None:
        known = ", ".join(map(repr, list(table)[:4])) + (", ..." if len(table) > 4 else "")
        raise ValueError(f"{owner}: prompt {missing!r} is not in {arg} (whose prompts are {known}); "
                         f"add {missing!r}: {value} to {arg}")
    return [table[p] for p in prompts]


class Guidance(nn.Module, metaclass=ABCMeta):
    """Base class: a frozen objective mapping images (N, 3, H, W) in [-1, 1] to a loss (N,), lower is better.

    Subclasses load their models in ``__init__``, call ``self.freeze()`` at its end and implement ``loss``;
    ``forward`` (called as ``g(images, prompts=..., generators=...)``) is the one place that handles precision:
    the images are cast to the dtype the guidance's models compute in and the loss comes back at least float32.
    The frozen models are left out of the ``state_dict()`` of any module holding the guidance (and not
    expected by its ``load_state_dict``): they are inputs, loaded from their own files, so they never go into
    the optimisation's checkpoints (``frozen.leave_out_of_checkpoints``).
    """

    default_name = "guidance"
    # True for an objective that also sees each image's initial latent (x_T of its chain): ``loss`` then takes a
    # ``latents=`` keyword, and ``objective.evaluate`` sends that term's gradient to the latents directly
    needs_latents = False
    # True for a measurement only (e.g. an independent evaluator): allowed under ``model.metrics``, refused as guidance
    metric_only = False
    # True for a prior on the latents rather than a reward of the image (the noise-norm regulariser): it is
    # optimised like any term but never chooses the best iteration, which is the lowest weighted sum of the reward
    # terms alone (``Evaluation.reward``), as ReNO keeps the lowest reward loss recorded before its regulariser
    regularizer = False

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__()
        self.name = name or self.default_name
        check_finite(**{f"{self.name}: weight": weight})  # before any model loads
        self.weight = float(weight)
        leave_out_of_checkpoints(self)

    def freeze(self) -> "Guidance":
        """Stop gradients to every parameter and switch to eval mode (dropout / batch-norm statistics off)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "Guidance":
        # Lightning calls .train() on the whole LightningModule every epoch; guidance stays in eval.
        return super().train(False)

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        """images (N, 3, H, W) in [-1, 1], differentiable -> per-item loss (N,), lower is better.

        ``prompts``: the items' diffusion prompts (used by text and per-prompt targets); ``generators``: one
        CPU generator per item for the random cutouts (None: a fixed default seed per item). The images enter
        ``loss`` in the dtype of the guidance's weights (unchanged for a guidance without weights); the loss
        returned is at least float32 (float64 stays float64). ``latents``: the initial latent (N, C, h, w) of each
        image's chain, required by (and only passed to) an objective with ``needs_latents``; it keeps its dtype.
        """
        images = precision.to_module_dtype(images, self)
        if not self.needs_latents:
            return precision.at_least_float32(self.loss(images, prompts, generators))
        if latents is None:
            raise ValueError(f"{self.name} ({type(self).__name__}) scores the initial latents, which this caller does "
                             f"not give (it scores images only): drop {self.name} from its guidance")
        return precision.at_least_float32(self.loss(images, prompts, generators, latents=latents))

    def metric_value(self, images: Tensor, prompts: Sequence[str] | None = None,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """The per-item value logged when this module is a held-out metric (``model.metrics``): its loss, unless the
        loss bends the quantity for optimisation (``AestheticGuidance``: the score is clipped there, not here)."""
        return self(images, prompts, generators)

    @abstractmethod
    def loss(
        self, images: Tensor, prompts: Sequence[str] | None, generators: Sequence[torch.Generator] | None
    ) -> Tensor:
        """The per-item loss (N,) of images already in the guidance's dtype; what subclasses implement."""

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"

