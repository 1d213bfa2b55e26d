"""Safe loading of guidance weights: safetensors or torch.load(weights_only=True), one clear error per bad file."""
from __future__ import annotations

import inspect
import logging
import os
import pickle
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "load_state_dict_file",
    "load_into",
    "load_open_clip",
    "load_images",
    "resolve_image_paths",
    "IMAGE_SUFFIXES",
    "one_line",
    "require_file",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_state_dict_file(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a flat {name: tensor} state dict from .safetensors, or any other file with torch.load(weights_only=True)."""
    path = require_file(path, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(
            f"{what} {path}: could not be read as a safetensors file or a weights-only torch state dict "
            f"(arbitrary pickled objects are refused): {one_line(e, 200)}"
        ) from None
    # Training scripts often wrap the weights ({"state_dict": ...}, {"model": ...}) or save them from DDP.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{what} {path}: expected a non-empty {{name: tensor}} state dict, got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_into(model: nn.Module, state_dict: dict[str, Tensor], path: str | os.PathLike, what: str) -> None:
    """Strictly load ``state_dict`` into ``model``; on mismatch one error naming the file and the first bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} != expected {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise ValueError(f"{what} {path} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_open_clip(
    model_name: str, pretrained: str | None, model_config: str | None
) -> tuple[nn.Module, Callable, str]:
    """Build an open_clip model; returns (model, eval preprocess transform, registered model name).

    ``model_config``: an open_clip model-config JSON (or a folder of them) registered with
    ``open_clip.add_model_config``; open_clip names a config by its file stem, so a file's stem becomes the
    model name. ``pretrained``: an open_clip tag (downloaded by open_clip) or a local checkpoint path, loaded
    by open_clip's own ``pretrained=path`` mechanism with ``weights_only=True``; None keeps random weights.
    """
    import open_clip

    schema = model_name.startswith(("hf-hub:", "local-dir:"))  # open_clip resolves these (and their weights)
    if schema:
        pass
    elif model_config is not None:
        config = Path(model_config).expanduser()
        if not config.exists():
            raise FileNotFoundError(f"open_clip model config not found: {config}")
        open_clip.add_model_config(config)
        if config.is_file():
            model_name = config.stem
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"open_clip model config {config}: no valid config named {model_name!r} "
                "(a config JSON needs embed_dim, vision_cfg and text_cfg)"
            )
    elif model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; pass model_config=<config.json> or one of "
                         f"{', '.join(open_clip.list_models()[:8])}, ...")

    looks_like_path = pretrained is not None and (
        os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES) or os.path.exists(pretrained)
    )
    if looks_like_path:
        # Check the file ourselves first: open_clip would report a missing path as an unknown tag.
        pretrained = str(require_file(pretrained, f"open_clip checkpoint for {model_name}"))
    elif pretrained is not None and not schema:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"{pretrained!r} is neither a file nor an open_clip pretrained tag for {model_name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
    elif pretrained is None and not schema:
        log.warning("open_clip model %s has random weights (pretrained=None)", model_name)

    # Recent open_clip takes weights_only; older releases rely on torch.load's own default (True since torch 2.6).
    safe = {"weights_only": True} if "weights_only" in inspect.signature(open_clip.create_model).parameters else {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device="cpu", **safe
        )
    except Exception as e:  # open_clip raises RuntimeError for both download and state-dict failures
        if looks_like_path and "Weights only load failed" in str(e):
            raise ValueError(
                f"open_clip checkpoint {pretrained}: not a weights-only state dict (arbitrary pickled objects are "
                "refused); save the weights with safetensors or torch.save(model.state_dict())"
            ) from None
        if looks_like_path:
            raise ValueError(
                f"open_clip checkpoint {pretrained} could not be loaded into {model_name} "
                f"(expected an open_clip state dict in .safetensors or a weights-only torch file): {one_line(e)}"
            ) from None
        if pretrained is not None:
            raise RuntimeError(
                f"open_clip could not fetch pretrained={pretrained!r} for {model_name} (offline?): download the "
                f"checkpoint and pass its local path as pretrained. Cause: {one_line(e, 200)}"
            ) from None
        raise
    return model.eval(), preprocess, model_name


def resolve_image_paths(references: list[str] | str) -> list[Path]:
    """Image files from a path, a folder (its images, sorted) or a list of either."""
    items = [references] if isinstance(references, (str, os.PathLike)) else list(references)
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no reference images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"reference image not found: {path}")
    if not paths:
        raise ValueError("references is empty: give image paths or a folder of images")
    return paths


def load_images(paths: list[Path]):
    """Open images as RGB PIL images; transparency is composited onto white, grayscale expanded to RGB."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(background, im)
                images.append(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"reference image {path} could not be read: {one_line(e, 200)}") from None
    return images
