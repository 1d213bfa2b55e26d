"""What a differentiable computation keeps for its backward, in bytes: the memory claims' measuring stick."""
from __future__ import annotations

import torch


def saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves while ``fn(*args)`` runs (its graph is dropped afterwards)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return total
