"""Precision in one place: the dtype each frozen model computes in, and the float32 of what is optimised.

The rule: the diffusion model is cast to the dtype of the Lightning ``precision`` setting
(``frozen_dtype``; guidance models follow it under the ``-true`` precisions, which cast the whole module)
and every input is cast to the dtype of the module it enters (``to_module_dtype``); everything that is
optimised or accumulated -- latents, optimiser state, the sampler's linear algebra, losses, images -- is
at least float32 (``at_least_float32``, ``keep_optimised_dtypes``), and float64 under ``64-true``, so a
parity run stays exact. Backward passes that recompute the chain re-enter the forward's autocast setting.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["PRECISION_DTYPES", "amp_unscale_cancelled", "at_least_float32", "autocast_state", "frozen_dtype", "keep_optimised_dtypes", "module_dtype",
           "restored_autocast", "to_module_dtype"]

PRECISION_DTYPES = {
    "32": torch.float32, "32-true": torch.float32, "64": torch.float64, "64-true": torch.float64,
    "16": torch.float16, "16-mixed": torch.float16, "16-true": torch.float16, "transformer-engine-float16": torch.float16,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
}
HALF = (torch.float16, torch.bfloat16)


def frozen_dtype(precision) -> torch.dtype:
    """The dtype frozen weights are kept and run in under a Lightning ``precision`` setting."""
    key = str(precision)
    if key not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[key]


def at_least_float32(t: Tensor) -> Tensor:
    """Half-precision tensors widened to float32; float32 and float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def module_dtype(module: nn.Module, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype a module computes in: that of its first floating-point parameter (``default`` if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def to_module_dtype(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` cast to the dtype ``module`` computes in (unchanged for a module without weights)."""
    dtype = module_dtype(module)
    return x if dtype is None else x.to(dtype)


@contextmanager
def amp_unscale_cancelled(grad: Tensor, scaler):
    """``16-mixed``: Lightning's GradScaler divides gradients by its scale before the optimiser step, but
    ours were never multiplied by it (the chain keeps fp16 VJPs in range by powers of two itself), so
    pre-multiply for the step and restore afterwards. A no-op without a scaler."""
    if scaler is None:
        yield
        return
    grad.mul_(scaler.get_scale())
    try:
        yield
    finally:
        grad.div_(scaler.get_scale())


def keep_optimised_dtypes(module: nn.Module, apply) -> None:
    """Run ``module._apply``-style ``apply`` but keep the latents (float32) and float64 buffers out of a
    half-precision cast: Lightning's ``16-true``/``bf16-true`` cast the whole module; only their device
    follows. (``64-true`` may widen them.)"""
    # .data aliases the storage, not the object: safe even when torch swaps parameter objects
    keep = {n: t.data for n, t in module._parameters.items() if t is not None}
    keep.update({n: b.data for n, b in module._buffers.items() if b is not None and b.is_floating_point()})
    apply()
    for name, old in keep.items():
        new = getattr(module, name)
        if new.dtype != old.dtype and new.dtype in HALF:
            new.data = old.data.to(new.device)
            if isinstance(new, nn.Parameter) and new.grad is not None:
                new.grad = None  # a cast gradient would be rounded; the next step recomputes it


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast setting a forward ran under, for a backward that recomputes it (Lightning calls
    backward outside the forward's autocast region)."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def restored_autocast(state: tuple[str, bool, torch.dtype]):
    """Re-enter the autocast setting of ``autocast_state``."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
