"""Tiny open_clip models for tests: a model-config JSON registered like a real one, random weights, no downloads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size must cover open_clip's BPE tokenizer (49408 ids); the rest is tiny.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip_config(folder: str | Path, name: str = "tiny_clip_test", **vision_overrides) -> Path:
    """Write an open_clip model-config JSON named ``<name>.json`` (open_clip keys configs by file stem)."""
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["vision_cfg"].update(vision_overrides)
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def save_tiny_clip(config_path: str | Path, out_path: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Build the config's model with seeded random weights and save its state dict (.safetensors or torch.save)."""
    import open_clip

    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(Path(config_path).stem, pretrained=None)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out_path = Path(out_path)
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out_path))
    else:
        torch.save(state, out_path)
    return state
