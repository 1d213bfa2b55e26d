"""What a shapes-world module writes when training ends: float16 safetensors state dicts and a model card
(``README.md``) whose "Measured quality" section, between two ``QUALITY_MARK`` lines, ``shapes.quality`` fills in."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["QUALITY_MARK", "fp16_state_dict", "write_card"]

QUALITY_MARK = "<!-- quality -->"


def fp16_state_dict(sd: dict) -> dict:
    """A state dict on the CPU in float16 (floating-point tensors only), contiguous, for ``safetensors``."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def write_card(path: Path, title: str, what: str, info: dict, extra: str = "") -> None:
    """A short model card: what it is, data, training command/steps/time/device, a quality placeholder."""
    lines = [f"# {title}", "", what, "", "## Training", ""]
    for k, v in info.items():
        lines.append(f"- {k}: {v}")
    if extra:
        lines += ["", extra]
    lines += ["", "## Measured quality", "", QUALITY_MARK, "(run `python -m doodl_lightning.shapes.quality`)",
              QUALITY_MARK, ""]
    (path / "README.md").write_text("\n".join(lines))
