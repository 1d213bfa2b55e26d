"""LightningModules that train the shapes world, one per model. Their typed ``__init__`` arguments are
the YAML keys of ``experiments/shapes/*.yaml``. Data are rendered on the module's device inside
``training_step`` from a per-batch seed (see ``data.SeedDataset``), so there is no data loading cost.

Every module exports its weights when training ends (``export_dir``), as safetensors plus a model card
(``README.md``) recording the data, command, steps, wall time and device; ``shapes.quality`` later fills
in the measured quality."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..testing.architectures import SD1_SCHEDULER_CONFIG
from . import data as D

__all__ = ["ShapesModule", "VAEModule", "DiffusionModule", "ClipModule", "AestheticModule", "ClassifierModule",
           "EvaluatorModule", "SD_SCHEDULER_CONFIG", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Stable Diffusion 1.x's noise schedule, predicting the noise
SD_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG, prediction_type="epsilon")
QUALITY_MARK = "<!-- quality -->"


def _fp16_state_dict(sd: dict) -> dict:
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


class ShapesModule(L.LightningModule):
    """Common training loop plumbing: seed-per-batch data, a progress-based warmup + cosine learning rate
    (progress = the larger of step / max_steps and elapsed / max_time, so a time-limited run still anneals),
    timing and export at the end of training."""

    data_what = "procedural shapes (doodl_lightning.shapes.data), rendered fresh every step"

    def __init__(self, lr: float = 1e-3, batch_size: int = 64, data_seed: int = 0, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.05, weight_decay: float = 0.0, export_dir: Optional[str] = None):
        super().__init__()
        self._t0: float | None = None

    # -- data --------------------------------------------------------------------------------------------
    def train_dataloader(self):
        return DataLoader(D.SeedDataset(10**9, self.hparams.data_seed), batch_size=None, shuffle=False)

    # -- optimisation -------------------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _progress(self) -> float:
        t = self.trainer
        p = 0.0
        if t.max_steps and t.max_steps > 0:
            p = self.global_step / t.max_steps
        max_time = None
        for cb in t.callbacks:
            if type(cb).__name__ == "Timer" and getattr(cb, "_duration", None):
                max_time = cb._duration
        if max_time and self._t0 is not None:
            p = max(p, (time.time() - self._t0) / max_time)
        return min(max(p, 0.0), 1.0)

    def on_train_batch_start(self, batch, batch_idx):
        h = self.hparams
        warm = min(1.0, (self.global_step + 1) / max(1, h.warmup_steps))
        cos = h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self._progress()))
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] = h.lr * warm * cos
        self.log("train/lr", h.lr * warm * cos, prog_bar=False)

    def on_train_start(self):
        self._t0 = time.time()

    def on_train_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            info = {
                "data": self.data_what,
                "command": " ".join(["python -m doodl_lightning.shapes.train"] + sys.argv[1:])
                if "shapes.train" not in " ".join(sys.argv[:1]) else " ".join(sys.argv),
                "steps": self.global_step,
                "batch size": self.hparams.batch_size,
                "wall time": f"{time.time() - (self._t0 or time.time()):.0f} s",
                "device": torch.cuda.get_device_name() if self.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            }
            out = Path(self.hparams.export_dir)
            out.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                self.export(out, info)

    def export(self, out: Path, info: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, seed, n=None, caption=None, **kw):
        n = n or self.hparams.batch_size
        return D.make_batch(int(seed), n, self.device, caption=caption, **kw)


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: blind to flat offsets, sharp on outlines."""
    return sum(F.l1_loss(torch.diff(rec, dim=d), torch.diff(x, dim=d)) for d in (-1, -2))


# ------------------------------------------------------------------------------------------------------------
class VAEModule(ShapesModule):
    """diffusers ``AutoencoderKL``, f = 2^(len(block_out_channels)-1); loss MSE + L1 + kl_weight * KL."""

    def __init__(self, block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 latent_channels: int = 4, norm_num_groups: int = 16, kl_weight: float = 1e-6, p_two: float = 0.2,
                 lr: float = 1e-3, batch_size: int = 64, data_seed: int = 1_000_000, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.05, weight_decay: float = 0.0, init_from: Optional[str] = None,
                 train_decoder_only: bool = False, edge_weight: float = 0.0, export_dir: Optional[str] = None):
        """``init_from``: a VAE directory (or an sd-shapes directory) to continue from; ``train_decoder_only``:
        freeze the encoder (the latent space, its scaling factor and a diffusion model trained on it stay valid);
        ``edge_weight``: weight of an L1 loss on image gradients. Outlines are a few percent of the pixels, so
        pixel losses barely see a small hexagon's corners; without this term the decoder drew small hexagons
        as circles (the evaluator read 31% of reconstructed hexagons as circles at 32 dB PSNR)."""
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        from diffusers import AutoencoderKL

        if init_from:
            sub = "vae" if (Path(init_from) / "vae").is_dir() else None
            self.vae = AutoencoderKL.from_pretrained(init_from, subfolder=sub, torch_dtype=torch.float32)
            if train_decoder_only:
                for m in (self.vae.encoder, self.vae.quant_conv):
                    if m is not None:
                        m.requires_grad_(False)
            return
        n = len(block_out_channels)
        self.vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                 up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                                 layers_per_block=layers_per_block, latent_channels=latent_channels,
                                 norm_num_groups=norm_num_groups, sample_size=D.IMAGE_SIZE)

    def training_step(self, seed, batch_idx):
        _, x, _ = self.batch(seed, p_two=self.hparams.p_two)
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 0.5 * F.l1_loss(rec, x) + self.hparams.kl_weight * post.kl().mean()
        if self.hparams.edge_weight:
            edge = edge_loss(rec, x)
            self.log("train/loss_edge", edge)
            loss = loss + self.hparams.edge_weight * edge
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/psnr", 10 * torch.log10(4.0 / mse.detach()), prog_bar=True)  # range [-1,1] -> peak 2
        return loss

    def export(self, out, info):
        if not self.hparams.train_decoder_only:
            _, x, _ = self.batch(seed=2**31 - 7, n=1024)
            z = torch.cat([self.vae.encode(c).latent_dist.sample() for c in x.split(256)])
            self.vae.register_to_config(scaling_factor=float(1.0 / z.std()))
            info["scaling_factor"] = f"{1.0 / z.std():.4f} (1 / std of latents of fresh renders)"
        else:
            info["note"] = f"decoder fine-tuned from {self.hparams.init_from} (encoder and scaling factor unchanged)"
        tmp = self.vae.to(torch.float16)
        tmp.save_pretrained(out, safe_serialization=True)
        self.vae.float()
        write_card(out, "shapes-world VAE (AutoencoderKL, 32x32x3 <-> 8x8x4)", "Trained from scratch.", info)


# ------------------------------------------------------------------------------------------------------------
class DiffusionModule(ShapesModule):
    """Text-conditional ``UNet2DConditionModel`` + ``CLIPTextModel`` (trained jointly from scratch) on the latents
    of a frozen shapes VAE, epsilon prediction on SD-1.x's noise schedule, caption dropout for classifier-free
    guidance, EMA of the weights. Exports one Stable-Diffusion-layout diffusers directory."""

    data_what = ("procedural single shapes; captions name only the coarse shape (circle / polygon / star), "
                 "other attributes dropped at random; quality words never used")

    def __init__(self, vae_path: str, unet_block_out_channels: tuple[int, ...] = (64, 128, 128),
                 unet_layers_per_block: int = 1, attention_head_dim: int = 32, text_hidden_size: int = 128,
                 text_layers: int = 3, text_heads: int = 4, text_intermediate_size: int = 512, max_length: int = 32,
                 cfg_dropout: float = 0.1, ema_decay: float = 0.999, p_two: float = 0.0, lr: float = 5e-4,
                 batch_size: int = 64, data_seed: int = 2_000_000, warmup_steps: int = 200, min_lr_ratio: float = 0.05,
                 weight_decay: float = 0.0, init_from: Optional[str] = None, export_dir: Optional[str] = None):
        """``init_from``: an exported sd-shapes directory to continue training from (its UNet and text encoder)."""
        super().__init__(lr, batch_size, data_seed, warmup_steps, min_lr_ratio, weight_decay, export_dir)
        self.save_hyperparameters()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .tokenizer import build_small_clip_tokenizer

        self.tokenizer = build_small_clip_tokenizer(D.VOCABULARY, model_max_length=max_length)
        tok = self.tokenizer
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=text_hidden_size, intermediate_size=text_intermediate_size,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=max_length,
            projection_dim=text_hidden_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
        n = len(unet_block_out_channels)
        down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
        self.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        self.vae.requires_grad_(False).eval()
        latent_size = D.IMAGE_SIZE // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=self.vae.config.latent_channels,
            out_channels=self.vae.config.latent_channels, block_out_channels=tuple(unet_block_out_channels),
            layers_per_block=unet_layers_per_block, down_block_types=down, up_block_types=up,
            cross_attention_dim=text_hidden_size, attention_head_dim=attention_head_dim)
        if init_from:
            self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from, subfolder="unet").state_dict())
            self.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(init_from, subfolder="text_encoder").state_dict())
        self.scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self._ema: list[torch.Tensor] | None = None

    def _ema_params(self):
        return [p for p in list(self.unet.parameters()) + list(self.text_encoder.parameters())]

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def training_step(self, seed, batch_idx):
        _, x, captions = self.batch(seed, caption="diffusion", p_two=self.hparams.p_two)
        rng = random.Random(int(seed) + 1)
        captions = ["" if rng.random() < self.hparams.cfg_dropout else c for c in captions]
        with torch.no_grad():
            z0 = self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(z0.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), generator=g).to(self.device)
        ab = self.alphas_cumprod[t][:, None, None, None]
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        eps = self.unet(zt, t, self.encode_text(captions)).sample
        loss = F.mse_loss(eps, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        params = [p.detach() for p in self._ema_params()]
        if self._ema is None:
            self._ema = [p.clone() for p in params]
            return
        d = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        torch._foreach_lerp_(self._ema, params, 1 - d)

    def export(self, out, info):
        from diffusers import StableDiffusionPipeline

        if self._ema is not None:
            for p, e in zip(self._ema_params(), self._ema):
                p.data.copy_(e)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float16)
        if out.exists():
            shutil.rmtree(out)
        pipe.save_pretrained(out, safe_serialization=True)
        pipe.to(torch.float32)
        # weights are stored in float16 to keep the package small, but the models are float32 models:
        # transformers >= 5 loads in the config's dtype ("auto"), so record float32 there
        te_cfg_path = out / "text_encoder" / "config.json"
        te_cfg = json.loads(te_cfg_path.read_text())
        te_cfg["dtype"] = te_cfg["torch_dtype"] = "float32"
        te_cfg_path.write_text(json.dumps(te_cfg, indent=2))
        # tokenizer.json (written above) plus vocab.json / merges.txt for transformers' slow tokenizer
        from .tokenizer import build_small_clip_tokenizer

        build_small_clip_tokenizer(D.VOCABULARY, save_dir=out / "tokenizer", model_max_length=self.hparams.max_length)
        n_unet = sum(p.numel() for p in self.unet.parameters())
        n_text = sum(p.numel() for p in self.text_encoder.parameters())
        info["ema decay"] = self.hparams.ema_decay
        info["parameters"] = f"UNet {n_unet / 1e6:.2f}M, text encoder {n_text / 1e6:.2f}M (vocabulary {len(self.tokenizer)})"
        write_card(out, "sd-shapes: a miniature Stable Diffusion of the shapes world",
                   "Stable-Diffusion-layout diffusers directory (load with `StableDiffusionPipeline.from_pretrained`). "
                   "32x32 RGB images, 8x8x4 latents, SD-1.x noise schedule, DDIM scheduler, weights stored in float16. "
                   "Vocabulary-expansion set-up: the captions never named the fine shape class -- triangles, squares, "
                   "pentagons and hexagons are all \"polygon\"; it knows \"circle\" and \"star\".", info,
                   "Prompts look like `a small red polygon at the top left on a black background`; every part but "
                   "the noun is optional (`a blue star`).")


# ------------------------------------------------------------------------------------------------------------
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
        save_file(_fp16_state_dict(self.model.state_dict()), str(out / "open_clip_model.safetensors"))
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


# ------------------------------------------------------------------------------------------------------------
def _load_arch(arch: str, num_classes: int) -> nn.Module:
    kind, name = arch.split(":", 1)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown architecture spec {arch!r} (want 'timm:<name>' or 'torchvision:<name>')")


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
        save_file(_fp16_state_dict(self.net.state_dict()), str(out / "model.safetensors"))
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
        save_file(_fp16_state_dict(self.net.state_dict()), str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"arch": "doodl_lightning.shapes.evaluator.ShapesEvaluatorNet",
                                                     "width": self.hparams.width, "hidden": self.hparams.hidden,
                                                     "input_size": D.IMAGE_SIZE, "input_range": "[-1, 1]",
                                                     "attributes": {a: list(D.ATTRIBUTE_NAMES[a]) for a in D.ATTRIBUTES}},
                                                    indent=2))
        write_card(out, "shapes independent evaluator (measurement only)",
                   "VGG-style CNN predicting shape (6 fine classes), colour, size, position, background and the "
                   "quality score of single-shape 32x32 images. Never used for guidance. "
                   "`doodl_lightning.shapes.ShapesWeights().evaluator()`.", info)
