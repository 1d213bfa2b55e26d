"""What a prompt becomes for the denoiser: text-encoder hidden states plus a family's added embeddings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Per-prompt conditioning, batch-first in every tensor.

    ``hidden``: the cross-attention context (N, L, D) (SD-1.x/2.x: the text encoder's last hidden state;
    SDXL: the penultimate hidden states of both text encoders, concatenated). ``added``: the UNet's
    ``added_cond_kwargs`` (SDXL: ``text_embeds`` (N, D2), the second encoder's pooled projection, and
    ``time_ids`` (N, 6), the micro-conditioning original size, crop and target size; with an IP-Adapter,
    ``image_embeds`` (N, 1, D) or (N, 1, L, D), the reference image's embedding, one image per row, as diffusers'
    ``prepare_ip_adapter_image_embeds`` shapes each adapter's). Indexing, ``cat`` and
    ``expand`` act on every tensor at once, so a batch of items is sliced like one tensor.
    """

    hidden: Tensor
    added: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        n = self.hidden.shape[0]
        bad = {k: tuple(v.shape) for k, v in self.added.items() if v.shape[0] != n}
        if bad:
            raise ValueError(f"conditioning tensors disagree on the batch size: hidden has {n} rows, {bad}")

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, idx) -> "Conditioning":
        if isinstance(idx, int):
            idx = [idx]
        return Conditioning(self.hidden[idx], {k: v[idx] for k, v in self.added.items()})

    def expand(self, n: int) -> "Conditioning":
        """A one-row conditioning repeated (as a view) to ``n`` rows; an ``n``-row one unchanged."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of {len(self)} rows to {n}")
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = set(parts[0].added)
        if any(set(p.added) != keys for p in parts):
            raise ValueError("cannot concatenate conditionings of different model families")
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})

    def with_added(self, **tensors: Tensor) -> "Conditioning":
        """This conditioning with more added embeddings (one row, expanded as a view, or one per row)."""
        n = len(self)
        more = {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in tensors.items()}
        return Conditioning(self.hidden, {**self.added, **more})

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.hidden.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def float(self) -> "Conditioning":
        return self.to(torch.float32)

    @staticmethod
    def of(value: "Conditioning | Tensor | None") -> "Conditioning | None":
        """A Conditioning from a bare hidden-state tensor (SD-1.x/2.x); None and Conditionings unchanged."""
        return value if value is None or isinstance(value, Conditioning) else Conditioning(value)
