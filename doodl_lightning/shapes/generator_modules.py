"""The shapes world's generator, trained in two stages: ``VAEModule`` (the autoencoder) then
``DiffusionModule`` (a text-conditional UNet and its text encoder on the frozen VAE's latents), exported
together as the Stable-Diffusion-layout ``sd-shapes`` directory."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as D
from .base_module import ShapesModule
from .export import write_card
from .schedule import SD_SCHEDULER_CONFIG

__all__ = ["VAEModule", "DiffusionModule", "edge_loss"]


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
