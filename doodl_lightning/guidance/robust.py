"""Guidance that gradient steps find harder to fool: the expectation of a guide's loss over random transformations."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Guidance, default_generators
from ..precision import at_least_float32


def random_transforms(n: int, generator: torch.Generator, flip: bool, translate: float, min_scale: float
                      ) -> Tensor:
    """``n`` affine maps (n, 2, 3) of ``F.affine_grid`` (output -> input coordinates in [-1, 1]): a horizontal flip
    with probability 1/2 (``flip``), a zoom into a window of relative size s ~ U[min_scale, 1], and a shift of up
    to ``translate`` of the image size each way. Always 4 draws per map from ``generator``, whatever is switched off,
    so an item's stream does not depend on the settings it is compared under."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    sign = torch.where((u[:, 0] < 0.5) & flip, -1.0, 1.0).to(torch.float64)
    s = min_scale + (1.0 - min_scale) * u[:, 1]
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sign * s
    theta[:, 1, 1] = s
    theta[:, 0, 2] = (2 * u[:, 2] - 1) * 2 * translate  # [-1, 1] spans the image: 2 x the fraction
    theta[:, 1, 2] = (2 * u[:, 3] - 1) * 2 * translate
    return theta


class ExpectationOverTransforms(Guidance):
    """The mean of a guide's loss over ``samples`` random transformations of each image (expectation over
    transformation, Athalye et al. 2018, "Synthesizing robust adversarial examples"): horizontal flips, zooms into a
    window of relative size >= ``min_scale``, shifts of up to ``translate`` of the image (reflected at the border)
    and Gaussian pixel noise of standard deviation ``noise`` (images in [-1, 1]). A gradient step that fools the
    guide with a pattern fixed to pixel positions fools few of the transformed copies, so the expectation favours
    changes that survive them, as an independent evaluator's verdict would. The official code's cutouts are one
    such family (``num_cuts`` of the guide); this one adds the others and works on any guide.

    ``guide``: the wrapped guidance (its own ``weight`` is ignored: this module's counts). Each item's
    transformations and noise come from its generator (the search's per-item, per-step stream), the wrapped guide's
    own cutouts from generators drawn from it, so an item's loss does not depend on the batch.
    Cost: ``samples`` evaluations of the guide per image.
    """

    default_name = "eot"

    def __init__(self, guide: Guidance, samples: int = 8, flip: bool = True, translate: float = 0.0625,
                 min_scale: float = 0.85, noise: float = 0.02, weight: float = 1.0, name: str | None = None):
        if not isinstance(guide, Guidance):
            raise ValueError(f"ExpectationOverTransforms: guide must be a Guidance module, got {type(guide).__name__}")
        super().__init__(weight=weight, name=name or f"eot_{guide.name}")
        if getattr(guide, "needs_latents", False) or getattr(guide, "metric_only", False):
            raise ValueError(f"{self.name}: {guide.name} ({type(guide).__name__}) is not an image reward to average "
                             f"over transformations; wrap an image guide (classifier, CLIP, aesthetic, reward model)")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"{self.name}: samples must be an integer >= 1, got {samples!r}")
        for key, value, lo, hi in (("translate", translate, 0.0, 0.5), ("min_scale", min_scale, 0.1, 1.0),
                                   ("noise", noise, 0.0, 1.0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{self.name}: {key} must be in [{lo}, {hi}], got {value!r}")
        self.guide = guide
        self.samples, self.flip, self.translate = samples, bool(flip), float(translate)
        self.min_scale, self.noise = float(min_scale), float(noise)
        self.freeze()

    def transformed(self, images: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, list]:
        """(N samples, 3, H, W) item-major transformed copies, and a generator per copy for the wrapped guide."""
        k, rows, gens = self.samples, [], []
        for image, g in zip(images, generators):
            theta = random_transforms(k, g, self.flip, self.translate, self.min_scale)
            x = at_least_float32(image).unsqueeze(0).expand(k, -1, -1, -1)
            grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            if self.noise > 0:
                x = x + self.noise * torch.randn(x.shape, generator=g, dtype=torch.float32).to(x)
            rows.append(x.to(image.dtype))
            seeds = torch.randint(0, 2 ** 62, (k,), generator=g).tolist()
            gens += [torch.Generator().manual_seed(s) for s in seeds]
        return torch.cat(rows), gens

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        n = images.shape[0]
        generators = default_generators(n) if generators is None else generators
        x, gens = self.transformed(images, generators)
        repeated = None if prompts is None else [p for p in prompts for _ in range(self.samples)]
        return self.guide(x, prompts=repeated, generators=gens).view(n, self.samples).mean(dim=1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, samples={self.samples}, flip={self.flip}, translate={self.translate}, "
                f"min_scale={self.min_scale}, noise={self.noise}")
