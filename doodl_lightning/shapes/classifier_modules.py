"""The shapes world's classifiers: ``ClassifierModule`` (the guidance classifier, a timm / torchvision
architecture by name) and ``EvaluatorModule`` (the independent evaluator, measurement only)."""
from __future__ import annotations

import json
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .augment import augment
from .base_module import ShapesModule
from .export import fp16_state_dict, write_card

__all__ = ["ClassifierModule", "EvaluatorModule"]


def _load_arch(arch: str, num_classes: int) -> nn.Module:
    kind, name = arch.split(":", 1)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown architecture spec {arch!r} (want 'timm:<name>' or 'torchvision:<name>')")


class ClassifierModule(ShapesModule):
    """Fine-grained shape classifier for classifier guidance: a timm/torchvision architecture by name, input
    upsampled to ``input_size``, normalised with ``mean``/``std`` (0.5 = images in [-1, 1] as they are),
    trained with Gaussian-noise (sigma up to ``noise_sigma_max`` in [-1, 1] units) and +-``max_shift`` px
    shift augmentation so that latent optimisation cannot fool it cheaply."""

    data_what = "procedural single shapes (fine classes), noise + shift augmentation"

    def __init__(self, arch: str = "timm:test_resnet", input_size: int = 64, noise_sigma_max: float = 0.4,
                 max_shift: int = 2, p_two: float = 0.0, label_smoothing: float = 0.0, lr: float = 2e-3,
                 batch_size: int = 128, data_seed: int = 5_000_000, warmup_steps: int = 100, min_lr_ratio: float = 0.02,
                 weight_decay: float = 0.01, export_dir: Optional[str] = None):
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        self.net = _load_arch(arch, len(D.SHAPES))
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def forward(self, x):  # x in [-1, 1], any size
        x = F.interpolate(x, size=(self.hparams.input_size,) * 2, mode="bilinear", align_corners=False)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return self.net(((x + 1) / 2 - m) / s)

    def training_step(self, seed, batch_idx):
        attrs, x, _ = self.batch(seed, p_two=self.hparams.p_two)
        g = torch.Generator().manual_seed(int(seed) + 7)
        x = augment(x, self.hparams.noise_sigma_max, self.hparams.max_shift, g)
        logits = self(x)
        y = attrs.shape[:, 0].to(self.device)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def export(self, out, info):
        from safetensors.torch import save_file

        h = self.hparams
        save_file(fp16_state_dict(self.net.state_dict()), str(out / "model.safetensors"))
        (out / "labels.txt").write_text("\n".join(D.SHAPES) + "\n")
        cfg = {"arch": h.arch, "num_classes": len(D.SHAPES), "input_size": h.input_size, "mean": list(self.mean),
               "std": list(self.std), "input_range": "images in [0, 1] (= ([-1, 1] + 1) / 2), bilinearly resized "
               "from 32x32 to input_size, then (x - mean) / std", "noise_sigma_max": h.noise_sigma_max,
               "max_shift": h.max_shift, "weights_dtype": "float16"}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        n = sum(p.numel() for p in self.net.parameters())
        info["parameters"] = f"{n / 1e6:.2f}M"
        write_card(out, "shapes fine-grained classifier (guidance)",
                   f"`{h.arch}` with {len(D.SHAPES)} classes (labels.txt: {', '.join(D.SHAPES)}), input "
                   f"{h.input_size}x{h.input_size}, mean = std = 0.5 (i.e. images in [-1, 1] as they are, resized). "
                   f"Build with `timm.create_model('{h.arch.split(':', 1)[1]}', num_classes={len(D.SHAPES)})` and "
                   f"load `model.safetensors` (float16; cast to float). Trained with noise sigma ~ U(0, "
                   f"{h.noise_sigma_max}) and +-{h.max_shift} px shifts.", info)


# ------------------------------------------------------------------------------------------------------------
class EvaluatorModule(ShapesModule):
    """The independent evaluator (``evaluator.ShapesEvaluatorNet``): every attribute + quality regression.
    Own seed and data stream; mild noise augmentation (sigma up to ``noise_sigma_max``) so that generator
    artefacts do not throw it."""

    data_what = "procedural single shapes from an independent seed range; mild noise augmentation"

    def __init__(self, width: int = 32, hidden: int = 128, noise_sigma_max: float = 0.1, quality_weight: float = 0.1,
                 lr: float = 2e-3, batch_size: int = 128, data_seed: int = 900_000_000, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.02, weight_decay: float = 0.01, seed: int = 12345,
                 export_dir: Optional[str] = None):
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        from .evaluator import ShapesEvaluatorNet

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = ShapesEvaluatorNet(width, hidden)

    def training_step(self, seed, batch_idx):
        attrs, x, _ = self.batch(seed)
        g = torch.Generator().manual_seed(int(seed) + 11)
        x = augment(x, self.hparams.noise_sigma_max, 0, g)
        out = self.net(x)
        labels = {k: v.to(self.device) for k, v in attrs.labels().items()}
        loss = sum(F.cross_entropy(out[a], labels[a]) for a in D.ATTRIBUTES)
        loss = loss + self.hparams.quality_weight * F.mse_loss(out["quality"], attrs.quality.to(self.device))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc_shape", (out["shape"].argmax(-1) == labels["shape"]).float().mean(), prog_bar=True)
        return loss

    def export(self, out, info):
        from safetensors.torch import save_file

        self.net.eval()
        save_file(fp16_state_dict(self.net.state_dict()), str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"arch": "doodl_lightning.shapes.evaluator.ShapesEvaluatorNet",
                                                     "width": self.hparams.width, "hidden": self.hparams.hidden,
                                                     "input_size": D.IMAGE_SIZE, "input_range": "[-1, 1]",
                                                     "attributes": {a: list(D.ATTRIBUTE_NAMES[a]) for a in D.ATTRIBUTES}},
                                                    indent=2))
        write_card(out, "shapes independent evaluator (measurement only)",
                   "VGG-style CNN predicting shape (6 fine classes), colour, size, position, background and the "
                   "quality score of single-shape 32x32 images. Never used for guidance. "
                   "`doodl_lightning.shapes.ShapesWeights().evaluator()`.", info)
