"""The shapes world's CLIP (``ClipModule``, an open_clip model trained contrastively) and the LAION-style
aesthetic head on its image features (``AestheticModule``)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .base_module import ShapesModule
from .export import fp16_state_dict, write_card

__all__ = ["ClipModule", "AestheticModule", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModule(ShapesModule):
    """An open_clip CLIP (custom model config ``model_cfg``) trained contrastively on renders and ``clip_caption``s.
    Identical captions within a batch count as positives of each other (soft targets)."""

    data_what = ("procedural shapes (one or two per image) with captions naming the fine shape (coarse 10% of the "
                 "time), random attribute subsets and quality words (blurry / faint / sharp bright), plus hard-negative "
                 "captions when hard_negatives > 0")

    def __init__(self, model_cfg: dict[str, Any], model_name: str = "shapes-clip", p_two: float = 0.1,
                 hard_negatives: int = 0, aux_weight: float = 0.0, lr: float = 1e-3, batch_size: int = 128,
                 data_seed: int = 3_000_000, warmup_steps: int = 200, min_lr_ratio: float = 0.05,
                 weight_decay: float = 0.05, init_from: Optional[str] = None, export_dir: Optional[str] = None):
        """``hard_negatives``: extra captions per image with one attribute changed or two objects' colours or
        positions swapped (``data.clip_hard_negatives``), added to the batch's text pool as negatives for every
        image. ``aux_weight``: weight of auxiliary linear attribute heads on the image embedding (training only,
        never exported). Without them both towers can settle where neither encodes an attribute (position did:
        captions differing only in position embedded identically, so the contrastive gradient toward it vanished
        on both sides); the heads make the image embedding carry every attribute, which gives the text tower a
        gradient to follow. ``init_from``: an open_clip checkpoint (.safetensors) of this architecture to
        continue training from."""
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        import open_clip

        from open_clip.model import CLIP

        self.model = CLIP(**{k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
        if init_from:
            from safetensors.torch import load_file

            self.model.load_state_dict({k: v.float() for k, v in load_file(init_from).items()})
        self.tokenizer = open_clip.tokenize
        ctx = model_cfg["text_cfg"].get("context_length", 77)
        self._ctx = ctx
        self._tok_cache: dict[str, torch.Tensor] = {}
        self.aux_heads = nn.ModuleDict({a: nn.Linear(model_cfg["embed_dim"], k) for a, k in D.NUM_CLASSES.items()}) \
            if aux_weight > 0 else None
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def aux_loss(self, img, attrs) -> torch.Tensor:
        """Mean cross-entropy of the attribute heads; object attributes of two-object images are ambiguous
        (which object?), so only the background counts there."""
        one = (attrs.n_objects == 1).to(self.device)
        feats = img * math.sqrt(img.shape[1])  # unit-variance coordinates for the linear heads
        total = img.new_zeros(())
        for a, target in attrs.labels().items():
            logits, target = self.aux_heads[a](feats), target.to(self.device)
            keep = torch.ones_like(one) if a == "background" else one
            total = total + (F.cross_entropy(logits, target, reduction="none") * keep).sum() / keep.sum().clamp(min=1)
            self.log(f"train/aux_acc_{a}", ((logits.argmax(1) == target) & keep).sum() / keep.sum().clamp(min=1))
        return total / len(D.NUM_CLASSES)

    def tokenize(self, captions):
        miss = [c for c in set(captions) if c not in self._tok_cache]
        if miss:
            for c, ids in zip(miss, self.tokenizer(miss, context_length=self._ctx)):
                self._tok_cache[c] = ids
        return torch.stack([self._tok_cache[c] for c in captions]).to(self.device)

    def preprocess(self, x):
        size = self.hparams.model_cfg["vision_cfg"]["image_size"]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def captions(self, seed, attrs) -> tuple[list[str], list[str]]:
        """The batch's captions (the same as ``make_batch(seed, caption="clip")``) and its hard negatives."""
        rng, neg_rng = random.Random(int(seed)), random.Random(int(seed) + 7)
        captions, negatives = [], []
        for i in range(len(attrs)):
            state = rng.getstate()
            captions.append(D.clip_caption(attrs, i, rng))
            if self.hparams.hard_negatives:
                negatives += D.clip_hard_negatives(attrs, i, state, captions[-1], self.hparams.hard_negatives, neg_rng)
        return captions, negatives

    def training_step(self, seed, batch_idx):
        attrs, x, _ = self.batch(seed, caption=None, p_two=self.hparams.p_two)
        captions, negatives = self.captions(seed, attrs)
        n = len(captions)
        img = F.normalize(self.model.encode_image(self.preprocess(x)), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenize(captions + negatives)), dim=-1)
        scale = self.model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.t()  # [n, n + negatives]: image -> text sees the hard negatives too
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions], device=self.device)
        target = (cid[:, None] == cid[None, :]).float()
        target = target / target.sum(1, keepdim=True)  # identical captions are positives of each other
        i2t = torch.sum(-target * logits.log_softmax(1)[:, :n], 1).mean()
        t2i = torch.sum(-target * logits[:, :n].log_softmax(0), 0).mean()
        loss = 0.5 * (i2t + t2i)
        self.log("train/loss_contrastive", loss)
        if self.aux_heads is not None:
            aux = self.aux_loss(img, attrs)
            self.log("train/loss_aux", aux)
            loss = loss + self.hparams.aux_weight * aux
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def export(self, out, info):
        from safetensors.torch import save_file

        name = self.hparams.model_name
        cfg = dict(self.hparams.model_cfg)
        (out / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bilinear", "resize_mode": "shortest"}}, indent=2))
        save_file(fp16_state_dict(self.model.state_dict()), str(out / "open_clip_model.safetensors"))
        n = sum(p.numel() for p in self.model.parameters())
        info["parameters"] = f"{n / 1e6:.2f}M (text tower keeps open_clip's full 49408-token vocabulary)"
        write_card(out, f"{name}: a CLIP of the shapes world (open_clip custom model)",
                   f"Load: `open_clip.add_model_config('{name}.json')` (the registry names a model by the file stem), "
                   f"then `open_clip.create_model_and_transforms('{name}', pretrained='open_clip_model.safetensors')`; "
                   "or `open_clip.create_model_and_transforms('local-dir:<this dir>')`. Tokenizer: open_clip's default. "
                   "Images: 32x32, OpenAI mean/std. Weights stored in float16.", info)


# ------------------------------------------------------------------------------------------------------------
class AestheticModule(ShapesModule):
    """A LAION-style linear head ``Linear(D, 1)`` on L2-normalised shapes-CLIP image features (CLIP frozen),
    regressing the procedural quality score (0..10: sharpness and contrast)."""

    data_what = "procedural single shapes, 70% degraded (blur and/or contrast fade), target = data.quality_score"

    def __init__(self, clip_dir: str, model_name: str = "shapes-clip", p_degraded: float = 0.7, lr: float = 5e-2,
                 batch_size: int = 256, data_seed: int = 4_000_000, warmup_steps: int = 20, min_lr_ratio: float = 0.05,
                 weight_decay: float = 0.0, export_dir: Optional[str] = None):
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        import open_clip

        open_clip.add_model_config(str(Path(clip_dir) / f"{model_name}.json"))
        self.clip = open_clip.create_model(model_name, pretrained=str(Path(clip_dir) / "open_clip_model.safetensors"))
        self.clip.requires_grad_(False).eval()
        self.head = nn.Linear(self.clip.text_projection.shape[1] if hasattr(self.clip, "text_projection") else 64, 1)
        # scores live in 0..10 and features are unit vectors: start at mid-scale, or the first few hundred
        # steps go into moving the bias (an earlier head ended with a 3.7-point mean error that way)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 5.0)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        with torch.no_grad():
            f = self.clip.encode_image(((x + 1) / 2 - self.mean) / self.std)
        return F.normalize(f.float(), dim=-1)

    def training_step(self, seed, batch_idx):
        attrs, x, _ = self.batch(seed, p_degraded=self.hparams.p_degraded)
        pred = self.head(self.features(x)).squeeze(-1)
        loss = F.mse_loss(pred, attrs.quality.to(self.device))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def export(self, out, info):
        from safetensors.torch import save_file

        save_file({"weight": self.head.weight.detach().cpu().float().contiguous(),
                   "bias": self.head.bias.detach().cpu().float().contiguous()}, str(out / "head.safetensors"))
        write_card(out, "shapes aesthetic head (LAION linear-head format)",
                   f"`head.safetensors` = {{weight [1, {self.head.in_features}], bias [1]}}: score = weight @ "
                   "normalize(shapes-CLIP image features) + bias, predicting the procedural quality 0..10 "
                   "(5 * sharpness + 5 * contrast; pristine renders score 10). Maximise it, or L1 to a target.", info)
