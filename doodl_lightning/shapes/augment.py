"""Training-time image augmentation of the shapes world's classifiers (and the quality report's robustness bar)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment"]


def augment(x: torch.Tensor, noise_sigma_max: float, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """+-max_shift px random translation (edge replicate) and Gaussian noise with sigma ~ U(0, noise_sigma_max)."""
    n = x.shape[0]
    if max_shift > 0:
        s = max_shift
        xp = F.pad(x, (s, s, s, s), mode="replicate")
        ox = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        oy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        h, w = x.shape[-2:]
        idx_y = (oy[:, None] + torch.arange(h)[None]).to(x.device)  # [n, h]
        idx_x = (ox[:, None] + torch.arange(w)[None]).to(x.device)
        xp = torch.gather(xp, 2, idx_y[:, None, :, None].expand(-1, x.shape[1], -1, xp.shape[-1]))
        x = torch.gather(xp, 3, idx_x[:, None, None, :].expand(-1, x.shape[1], h, -1))
    if noise_sigma_max > 0:
        sig = torch.rand(n, generator=generator).to(x.device) * noise_sigma_max
        x = x + sig[:, None, None, None] * torch.randn(x.shape, generator=generator).to(x.device)
    return x
