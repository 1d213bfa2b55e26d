"""The reward models' reference image preprocessing, differentiably: bicubic, antialiased resizes as PIL and
torchvision do them, centre crop with either library's rounding (used by ``hps``, ``hpsv3``, ``image_reward``
too), and ``CLIPPreprocess``, a transformers ``CLIPImageProcessor`` rebuilt in torch from its config (PickScore,
MPS)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .augment import normalize
from ..precision import at_least_float32

__all__ = ["CLIPPreprocess", "RESAMPLE_MODES", "bicubic_resize", "resize_shortest_side", "center_crop",
           "processor_size"]

# PIL resample codes a processor config stores -> F.interpolate modes (the antialiased kernels match PIL's).
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


def bicubic_resize(images: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Differentiable resize to ``size`` (h, w), antialiased like PIL / torchvision tensors (``antialias=True``).

    Bicubic with antialias uses PIL's kernel (a = -0.5) both when shrinking and when enlarging. Computed in
    at least float32 (CPU has no half-precision antialiased kernel) and cast back. No clamping: the gradient
    stays non-zero at saturated pixels (torchvision does not clamp float tensors either).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(at_least_float32(images), size=size, mode=mode, align_corners=False, antialias=True)
    return out.to(images.dtype)


def resize_shortest_side(images: Tensor, shortest: int, mode: str = "bicubic") -> Tensor:
    """Resize so the shorter side is ``shortest``, keeping the aspect: the longer side becomes
    ``int(shortest * long / short)``, as torchvision ``Resize(int)`` and transformers' processors compute it."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(shortest * long / short)
    return bicubic_resize(images, (shortest, new_long) if h <= w else (new_long, shortest), mode)


def center_crop(images: Tensor, size: tuple[int, int], torchvision_rounding: bool = False,
                fill: float = -1.0) -> Tensor:
    """Centre crop to ``size`` (h, w); an image smaller than the crop is first padded with ``fill`` (-1 is
    black for images in [-1, 1]) as both libraries pad with zeros. Offsets: ``int((H - h) / 2)`` (transformers'
    processors) or, with ``torchvision_rounding``, ``int(round((H - h) / 2))`` (torchvision ``CenterCrop``)."""
    ch, cw = int(size[0]), int(size[1])
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        images = F.pad(images, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2], value=fill)
        h, w = images.shape[-2:]
    if (h, w) == (ch, cw):
        return images
    offset = (lambda d: int(round(d / 2.0))) if torchvision_rounding else (lambda d: int(d / 2.0))
    top, left = offset(h - ch), offset(w - cw)
    return images[..., top:top + ch, left:left + cw]


def processor_size(size, owner: str, what: str) -> tuple[int, int] | int:
    """A processor ``size`` / ``crop_size`` value -> (h, w), or an int for {"shortest_edge": s}."""
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if isinstance(size, int):
        return (size, size) if what == "crop_size" else size
    if get("shortest_edge") and not get("longest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise ValueError(f"{owner}: unsupported image processor {what} {dict(size) if size else size!r} "
                     "(expected {'shortest_edge': s} or {'height': h, 'width': w})")


class CLIPPreprocess:
    """A loaded transformers ``CLIPImageProcessor`` (``AutoImageProcessor.from_pretrained`` of a processor folder)
    rebuilt in torch from its config, so gradients reach the pixels: images in [-1, 1] -> [0, 1] (what
    ``do_rescale`` makes of uint8), resize of the shortest side (or to its (h, w)) with the processor's
    ``resample`` (bicubic, antialiased like PIL), centre crop, normalise with its mean / std (none without
    ``do_normalize``).

    ``owner`` names the processor in errors; ``image_size`` is the vision model's input side, which the
    processor's output must be (``model`` names that model in the error).
    """

    def __init__(self, cfg, owner: str, image_size: int, model: str = "the model"):
        self.resize = processor_size(cfg.size, owner, "size") if getattr(cfg, "do_resize", True) else None
        self.crop = processor_size(cfg.crop_size, owner, "crop_size") if getattr(cfg, "do_center_crop", True) else None
        resample = int(getattr(cfg, "resample", 3) or 3)
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"{owner}: unsupported resample {resample} (bilinear 2 or bicubic 3)")
        self.resample = RESAMPLE_MODES[resample]
        # do_rescale maps uint8 [0, 255] by rescale_factor (1/255): our [0, 1] images are that times 255.
        self.pixel_scale = 255.0 * float(cfg.rescale_factor) if getattr(cfg, "do_rescale", True) else 255.0
        normalise = getattr(cfg, "do_normalize", True)
        self.mean = tuple(float(v) for v in cfg.image_mean) if normalise else (0.0, 0.0, 0.0)
        self.std = tuple(float(v) for v in cfg.image_std) if normalise else (1.0, 1.0, 1.0)
        size = int(image_size)
        out = self.crop if self.crop is not None else self.resize
        if not isinstance(out, tuple) or out != (size, size):
            raise ValueError(f"{owner}: its images come out {out} but {model} takes {size}x{size}; "
                             "use the processor that belongs to the model")

    def __call__(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> the processor's pixel_values (N, 3, S, S), differentiably."""
        x = images
        if isinstance(self.resize, int):
            x = resize_shortest_side(x, self.resize, self.resample)
        elif self.resize is not None:
            x = bicubic_resize(x, self.resize, self.resample)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        if not math.isclose(self.pixel_scale, 1.0):  # a processor that does not rescale to [0, 1]
            x = (x + 1) * self.pixel_scale - 1  # so that (x + 1) / 2 is the processor's value
        return normalize(x, self.mean, self.std)
