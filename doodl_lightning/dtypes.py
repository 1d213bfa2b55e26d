"""The one precision rule outside the models: losses and images are at least float32, float64 stays."""
from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """Half-precision tensors widened to float32; float32 and float64 kept (so a 64-true run stays exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
