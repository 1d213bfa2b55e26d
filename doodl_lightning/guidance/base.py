"""The guidance interface: a frozen differentiable objective, images in [-1, 1] -> per-item loss."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Guidance", "default_generators", "DEFAULT_SEED"]

DEFAULT_SEED = 0


def default_generators(n: int, seed: int = DEFAULT_SEED) -> list[torch.Generator]:
    """One CPU generator per item, item i seeded ``seed + i`` (used when the caller passes none)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


class Guidance(nn.Module):
    """Base class: a frozen objective mapping images (N, 3, H, W) in [-1, 1] to a loss (N,), lower is better.

    Subclasses load their models in ``__init__`` and call ``self.freeze()`` at its end. The frozen models
    are left out of ``state_dict()`` (and not expected by ``load_state_dict``): they are inputs, loaded
    from their own files, so they never go into the optimisation's checkpoints.
    """

    default_name = "guidance"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__()
        self.weight = float(weight)
        self.name = name or self.default_name
        self._load_prefix = ""
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_remember_prefix)
        self.register_load_state_dict_post_hook(_forgive_own_missing_keys)

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
    ) -> Tensor:
        """images (N, 3, H, W) in [-1, 1], differentiable -> per-item loss (N,), lower is better."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


def _drop_own_keys(module: Guidance, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _remember_prefix(module: Guidance, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    module._load_prefix = prefix


def _forgive_own_missing_keys(module: Guidance, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(module._load_prefix)]
