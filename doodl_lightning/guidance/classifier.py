"""Classifier guidance (the paper's fine-grained "vocabulary expansion"): cross-entropy toward a class."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .augment import Cutouts, clamp_images, normalize
from .base import Guidance, per_prompt
from .loading import one_line, require_file, load_into, load_state_dict_file
from ..precision import at_least_float32, to_module_dtype

__all__ = ["ClassifierGuidance", "build_classifier", "read_labels", "resolve_target"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_classifier(arch: str, checkpoint: str | None, num_classes: int | None) -> nn.Module:
    """"torchvision:<name>" / "timm:<name>" (random init, then the state-dict checkpoint) or "torchscript" (the file)."""
    if arch == "torchscript":
        if checkpoint is None:
            raise ValueError('arch="torchscript" needs checkpoint: the TorchScript file')
        path = require_file(checkpoint, "TorchScript classifier")
        try:
            # TorchScript archives hold code + tensors, not pickled Python objects.
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ValueError(f"TorchScript classifier {path}: not a TorchScript archive: {one_line(e, 200)}") from None
    source, _, name = arch.partition(":")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if source == "torchvision" and name:
        import torchvision

        if name not in torchvision.models.list_models():
            close = difflib.get_close_matches(name, torchvision.models.list_models(), n=4)
            raise ValueError(f"unknown torchvision model {name!r} (arch={arch!r}); close names: {close}")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif source == "timm" and name:
        try:
            import timm
        except ImportError:
            raise ValueError(f"arch={arch!r} needs the timm package (pip install timm)") from None
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=4)
            raise ValueError(f"unknown timm model {name!r} (arch={arch!r}); close names: {close}")
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        raise ValueError(f'unknown classifier arch {arch!r}: expected "torchvision:<name>", "timm:<name>" or "torchscript"')
    if checkpoint is None:
        return model  # random weights: only useful in tests
    load_into(model, load_state_dict_file(checkpoint, "classifier checkpoint"), checkpoint, "classifier checkpoint")
    return model


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line; line i (0-based, blank lines kept so numbering holds) is class i."""
    lines = require_file(path, "labels file").read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _canonical(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def resolve_target(target: int | str, labels: list[str] | None, labels_path: str | None = None) -> int:
    """Class index from an index or a class name (exact, then ignoring case and '_' vs ' ')."""
    if isinstance(target, bool):
        raise ValueError(f"classifier target must be a class index or name, got {target!r}")
    if isinstance(target, int):
        return target
    if labels is not None:
        if target in labels:
            return labels.index(target)
        canonical = [_canonical(x) for x in labels]
        if _canonical(target) in canonical:
            return canonical.index(_canonical(target))
    if target.strip().isdigit():
        return int(target)
    if labels is None:
        raise ValueError(f"classifier target {target!r} is a class name but no labels file was given")
    close = difflib.get_close_matches(target, labels, n=5) or labels[:5]
    raise ValueError(f"unknown class {target!r} in labels file {labels_path} ({len(labels)} classes); e.g. {close}")


class ClassifierGuidance(Guidance):
    """Cross-entropy of a frozen classifier's logits toward a target class, averaged over cutouts.

    ``target``: a class index or name (names need ``labels``), or a dict mapping each prompt to one, so
    items with different targets share one batch. Attribute ``target``: the resolved index, or the dict
    prompt -> index.

    As doodl.py's ``fgvc_loss_fn`` (l. 341-400) with ``gen()``'s defaults: the image clamped to [-1, 1], 16
    cutouts (cut_power 0.3) pooled to ``input_size``, ImageNet statistics, the mean cross-entropy over cutouts.
    The official WS-DAN classifiers take 512 px (``input_size: 512``) and return three outputs, the logits last:
    a model returning a tuple needs ``output``, the index of its logits (``output: 2`` for WS-DAN).
    """

    default_name = "classifier"

    def __init__(self, arch: str, checkpoint: str | None, target: int | str | dict[str, int | str],
                 labels: str | None = None, num_classes: int | None = None, input_size: int = 224,
                 mean: list[float] = IMAGENET_MEAN, std: list[float] = IMAGENET_STD, num_cuts: int = 16,
                 cut_power: float = 0.3, weight: float = 1.0, name: str | None = None, output: int | None = None,
                 resample: str = "pool"):
        super().__init__(weight, name)
        self.output = None if output is None else int(output)
        self.labels = read_labels(labels) if labels is not None else None
        if self.labels is not None and num_classes is not None and len(self.labels) != num_classes:
            raise ValueError(f"labels file {labels} has {len(self.labels)} classes but num_classes={num_classes}")
        if num_classes is None and self.labels is not None and arch != "torchscript":
            num_classes = len(self.labels)  # the labels file says how many outputs the head has
        if isinstance(target, Mapping):
            if not target:
                raise ValueError("classifier target is an empty dict: map each prompt to a class index or name")
            self.target: int | dict[str, int] = {
                str(p): resolve_target(t, self.labels, labels) for p, t in target.items()}
        else:
            self.target = resolve_target(target, self.labels, labels)
        for index in self.target.values() if isinstance(self.target, dict) else [self.target]:
            if index < 0 or (num_classes is not None and index >= num_classes):
                raise ValueError(f"classifier target index {index} out of range for {num_classes} classes")
        self.model = build_classifier(arch, checkpoint, num_classes)
        self.cutouts = Cutouts(input_size, num_cuts, cut_power, resample)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"classifier mean/std need 3 values each, got {mean} / {std}")
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.freeze()

    def logits(self, images: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """Logits per cutout, at least float32: (N, cuts_per_item, num_classes). Images clamped to [-1, 1] first."""
        x = normalize(self.cutouts(clamp_images(images), generators), self.mean, self.std)
        out = self.model(to_module_dtype(x, self.model))  # a no-op from forward; logits() is public too
        if isinstance(out, (tuple, list)):
            # which element holds the logits is the model's convention (WS-DAN: the third; an Inception export:
            # the first): never guessed
            if self.output is None:
                raise ValueError(f"{self.name}: the classifier returns {len(out)} outputs, not one tensor; set "
                                 f"output to the index of its logits (WS-DAN, as in the official DOODL: output: 2)")
            if not -len(out) <= self.output < len(out):
                raise ValueError(f"{self.name}: output={self.output} but the classifier returns {len(out)} outputs: "
                                 f"set output to an index below {len(out)} (the position of its logits)")
            out = out[self.output]
        return at_least_float32(out).view(images.shape[0], self.cutouts.cuts_per_item, -1)

    def target_indices(self, prompts: Sequence[str] | None, n: int) -> list[int]:
        """The target class of each of ``n`` items (from its prompt when ``target`` is a dict)."""
        if isinstance(self.target, dict):
            return per_prompt(self.target, prompts, n, self.name, "target", "<class index or name>")
        return [self.target] * n

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """Per-item cross-entropy toward the item's target class, averaged over cutouts: (N,)."""
        index = self.target_indices(prompts, images.shape[0])
        logits = self.logits(images, generators)
        if max(index) >= logits.shape[-1]:
            raise ValueError(f"{self.name}: target {max(index)} but the classifier has {logits.shape[-1]} outputs")
        index = torch.tensor(index, device=logits.device).view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        return -logits.log_softmax(-1).gather(-1, index).squeeze(-1).mean(1)
