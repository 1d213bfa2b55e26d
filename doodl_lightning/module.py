"""The LightningModule: the initial noise of a batch of items is its only trainable parameter."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from .backbone import Backbone, precision_dtype
from .data import Item, initial_noise, make_items, shard, step_generator
from .guidance.base import Guidance
from .objective import Evaluation, evaluate
from .optim import DOODLOptimizer, masked_step
from .sampling import BACKPROPS, SAMPLERS, OneStepGuidance, Schedule, check_sampler, edict_invert, sample_ddim, sample_edict
from .sampling.edict import check_mix_weight


def default_model() -> str:
    """The shipped shapes-world model directory (the README's CPU default)."""
    return os.path.join(os.path.dirname(__file__), "shapes", "weights", "sd-shapes")


class DOODL(LightningModule):
    """End-to-end optimisation of diffusion latents (DOODL, Wallace et al. 2023, arXiv 2303.13703).

    Args (the YAML keys under ``model:``):
        model: hub id, local diffusers directory, or one .safetensors/.ckpt file (then ``model_config``).
        prompts, seeds, prompt_file: the items, every prompt with every seed.
        guidance: guidance modules (``class_path`` + ``init_args``); the loss is their weighted sum.
        sampler / backprop: ``edict`` | ``ddim`` and ``checkpoint`` | ``reversible`` | ``autograd``.
        steps, mix_weight, guidance_scale: the sampler (mix_weight is EDICT's p).
        micro_batch: items per chain evaluation (None = all this rank's items at once).
        opt_t: optimise only the last ``opt_t`` sampler steps (the earlier ones run once, without grad).
        source_image: edit a real image: VAE-encode, EDICT-invert, optimise from there (renormalisation off).
        lr, momentum, clip, perturbation: the DOODL update (``lr`` is the official ``grad_scale``).
        renormalize: rescale latents to their initial norm after each step (default: on unless editing).
        one_step_scale: > 0 runs the one-step guidance baseline instead of optimising (for comparisons).
        cuda_graphs: replay the UNet as CUDA graphs (on CUDA devices; ignored on CPU), captured on the
            first call of each batch shape: removes the kernel-launch overhead of small batches.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: str | None = None,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        prompt_file: str | None = None,
        negative_prompt: str = "",
        guidance: list[Guidance] | None = None,
        sampler: str = "edict",
        backprop: str = "checkpoint",
        steps: int = 50,
        mix_weight: float = 0.93,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        micro_batch: int | None = None,
        opt_t: int | None = None,
        source_image: str | None = None,
        lr: float = 1.0,
        momentum: float = 0.9,
        clip: float = 1e-3,
        perturbation: float = 1e-4,
        renormalize: bool | None = None,
        drift_tolerance: float = 1e-3,
        vae_checkpointing: bool = False,
        cuda_graphs: bool = False,
        local_files_only: bool | None = None,
        one_step_scale: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["guidance"])
        self.automatic_optimization = False
        check_sampler(sampler, backprop)
        check_mix_weight(mix_weight)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or null, got {micro_batch}")
        if opt_t is not None and not 1 <= opt_t <= steps:
            raise ValueError(f"opt_t must be in [1, steps={steps}] or null, got {opt_t}")
        if one_step_scale < 0:
            raise ValueError(f"one_step_scale must be >= 0, got {one_step_scale}")
        if source_image is not None and not os.path.isfile(source_image):
            raise FileNotFoundError(f"source_image {source_image} does not exist")
        if source_image is not None and sampler != "edict":
            raise ValueError("editing a source_image needs sampler 'edict' (exact inversion)")
        self.items: list[Item] = make_items(prompts, seeds if seeds is not None else [0], prompt_file)
        self.guidance = nn.ModuleList(guidance or [])
        names = [g.name for g in self.guidance]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance names must be unique (they are log keys), got {names}; set name: ...")
        if not self.guidance and one_step_scale == 0:
            raise ValueError("no guidance modules: give model.guidance: [{class_path: ...}] (nothing to optimise)")
        self.backbone = Backbone.load(model or default_model(), model_config=model_config,
                                      local_files_only=local_files_only, vae_checkpointing=vae_checkpointing)
        self.latent_shape = self.backbone.latent_shape(resolution)
        self.renormalize = (source_image is None) if renormalize is None else renormalize
        self.local_items: list[Item] = []
        self._restored = False
        self._final: Evaluation | None = None
        self.last: Evaluation | None = None      # the latest step's evaluation of this rank's items
        self.stepped = None                      # which local items the latest step changed
        self._final_step = -1
        self._graphed = None

    # -- frozen weights never go into checkpoints -------------------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if k.startswith("backbone.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(("backbone.", "guidance."))]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match this run: missing {missing}, unexpected {result.unexpected_keys}")
        return result

    def _apply(self, fn, recurse=True):
        # Lightning's half "-true" precisions cast the whole module; the latents (and their norms)
        # stay float32: only their device follows. ("64-true" may widen them.)
        # .data aliases the storage, not the object: safe even when torch swaps parameter objects
        keep = {n: t.data for n, t in self._parameters.items() if t is not None}
        keep.update({n: b.data for n, b in self._buffers.items() if b is not None and b.is_floating_point()})
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype and new.dtype in (torch.float16, torch.bfloat16):
                new.data = old.data.to(new.device)
                if isinstance(new, nn.Parameter) and new.grad is not None:
                    new.grad = None  # a cast gradient would be rounded; the next step recomputes it
        return self

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.local_items:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        if len(self.items) < world:
            raise ValueError(f"{len(self.items)} items cannot feed {world} processes: give at least one item per process")
        self.local_items = shard(self.items, rank, world)
        z = torch.stack([initial_noise(it, self.latent_shape) for it in self.local_items])
        self.latents = nn.Parameter(z)
        self.register_buffer("initial_norm", z.flatten(1).norm(dim=1))
        self.register_buffer("active", torch.ones(len(z), dtype=torch.bool))
        self.register_buffer("pair_offset", torch.zeros_like(z))  # editing: x_T = z + d, y_T = z - d
        if self._trainer is not None:
            dtype = precision_dtype(self.trainer.precision)
            self.backbone.to(dtype)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("doodl_items")
        mine = [it.to_dict() for it in self.local_items]
        if saved is not None and saved != mine:
            raise ValueError("this checkpoint was made for different items (prompts, seeds or number of processes); "
                             "resume with the same config and trainer.devices")
        self._restored = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["doodl_items"] = [it.to_dict() for it in self.local_items]

    def on_fit_start(self) -> None:
        prompts = [it.prompt for it in self.local_items]
        # one prompt at a time: an item's embedding must not depend on which items share its rank
        self._cond = torch.cat([self.backbone.encode_prompts([q]) for q in prompts])
        self._uncond = self.backbone.encode_prompts([self.hparams.negative_prompt])
        if self.hparams.source_image is not None and not self._restored:
            self._invert_source()
        if self.hparams.opt_t is not None and not self._restored:
            self._run_prefix()

    def configure_optimizers(self):
        hp = self.hparams
        return DOODLOptimizer([self.latents], lr=hp.lr, momentum=hp.momentum, clip=hp.clip, perturbation=hp.perturbation)

    def configure_callbacks(self):
        from callbacks.renormalize import LatentRenormalization

        return [LatentRenormalization()] if self.renormalize else []

    def train_dataloader(self):
        # one batch per optimisation step; the items live in the module, the batch is a tick
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- the chain ---------------------------------------------------------------------------------
    @property
    def schedule(self) -> Schedule:
        """The chain that is optimised: all ``steps``, or the last ``opt_t`` of them."""
        key = (self.hparams.steps, self.hparams.opt_t)
        if getattr(self, "_schedule_key", None) != key:
            full = Schedule.from_scheduler(self.backbone.scheduler, self.hparams.steps)
            k = self.hparams.opt_t
            self._schedule, self._schedule_key = (full if k is None else full.tail(len(full) - k)), key
        return self._schedule

    def _denoiser(self, idx: list[int]):
        eps = self.backbone.denoiser(self._cond[idx], self._uncond, self.hparams.guidance_scale)
        if self.hparams.get("cuda_graphs") and self.device.type == "cuda":
            if self._graphed is None:
                from .cuda_graphs import GraphedUNet

                self._graphed = GraphedUNet(self.backbone.unet, auto_prepare=True)
            eps.unet = self._graphed
        return eps

    def _chunks(self) -> list[list[int]]:
        n, m = len(self.local_items), self.hparams.micro_batch or len(self.local_items)
        return [list(range(i, min(i + m, n))) for i in range(0, n, m)]

    def _loss_fn(self, idx: list[int], step: int):
        items = [self.local_items[i] for i in idx]
        prompts = [it.prompt for it in items]

        def loss_fn(images: Tensor):
            gens = [step_generator(it, step, stream=1) for it in items]
            terms = {g.name: g(images.to(_dtype_of(g, images.dtype)), prompts=prompts, generators=gens).float()
                     for g in self.guidance}
            total = sum((g.weight * terms[g.name] for g in self.guidance), torch.zeros(len(items), device=images.device))
            return total, terms

        return loss_fn

    def evaluate_items(self, backward: bool) -> Evaluation:
        """Evaluate every local item (in micro-batches); with ``backward`` fill ``latents.grad``."""
        hp = self.hparams
        outs = []
        for idx in self._chunks():
            z = self.latents[idx]
            d = self.pair_offset[idx]
            outs.append(evaluate(
                self._denoiser(idx), z + d, self.schedule, self.backbone.decode, self._loss_fn(idx, self.global_step),
                sampler=hp.sampler, backprop=hp.backprop, mix_weight=hp.mix_weight,
                y=(z - d) if hp.sampler == "edict" else None, drift_tolerance=hp.drift_tolerance, backward=backward))
        return _concat(outs)

    def training_step(self, batch, batch_idx):
        if self.hparams.one_step_scale > 0:
            raise RuntimeError("one_step_scale > 0 is the one-step baseline: generate with DOODL.one_step_images(), not fit")
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        ev = self.evaluate_items(backward=True)
        grad = self.latents.grad
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            # "16-mixed" un-scales gradients before the step; ours were never scaled (the chain keeps
            # fp16 VJPs in range itself), so pre-scale to cancel it
            grad.mul_(scaler.get_scale())
        active = self.active.clone()
        self.stepped = active
        masked_step(opt, self.latents, active)
        if scaler is not None:
            grad.div_(scaler.get_scale())
        self.last = ev
        self._log_step(ev, grad)
        return None

    def on_train_start(self) -> None:
        for opt in self.trainer.optimizers:
            if isinstance(opt, DOODLOptimizer):
                opt.noise_generator = lambda row, k: step_generator(self.local_items[row], k, stream=2)

    # -- logging -----------------------------------------------------------------------------------
    def gather_items(self, values: Tensor) -> Tensor:
        """A per-local-item vector -> the vector over ALL items (in item order), on every rank."""
        world = self.trainer.world_size if self._trainer is not None else 1
        values = values.detach().float()
        if world == 1:
            return values.cpu()
        m = math.ceil(len(self.items) / world)
        padded = torch.full((m,), float("nan"), device=values.device)
        padded[: len(values)] = values
        every = self.all_gather(padded).reshape(world, m).cpu()  # row r holds items r, r + world, ...
        out = torch.empty(len(self.items))
        for r in range(world):
            n_r = len(self.items[r::world])
            out[r::world] = every[r, :n_r]
        return out

    def _log_step(self, ev: Evaluation, grad: Tensor) -> None:
        n = len(self.items)
        per_item = {"loss": ev.total, "latent_norm": self.latents.detach().flatten(1).norm(dim=1),
                    "grad_norm": grad.flatten(1).norm(dim=1)}
        per_item.update({f"loss_{k}": v for k, v in ev.terms.items()})
        gathered = {k: self.gather_items(v) for k, v in per_item.items()}
        logs = {f"train/{k}": float(v.mean()) for k, v in gathered.items()}
        logs["train/lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        logs["train/active_items"] = float(self.gather_items(self.active.float()).sum())
        if "reversible_drift" in ev.info:
            logs["train/reversible_drift"] = float(ev.info["reversible_drift"])
        for k, v in gathered.items():
            for i in range(n):
                logs[f"items/{k}/{i:03d}"] = float(v[i])
        self.log("loss", logs["train/loss"], prog_bar=True, logger=False, batch_size=n)
        self.log_dict(logs, batch_size=n)

    # -- options around the optimisation ---------------------------------------------------------
    @torch.no_grad()
    def _invert_source(self) -> None:
        from PIL import Image

        img = Image.open(self.hparams.source_image).convert("RGB")
        c, h, w = self.latent_shape
        f = self.backbone.vae_scale_factor
        img = img.resize((w * f, h * f), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h * f, w * f, 3)
        x = (x.permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0).to(self.device)
        z0 = self.backbone.encode_images(x)
        full = Schedule.from_scheduler(self.backbone.scheduler, self.hparams.steps)
        n = len(self.local_items)
        inv = edict_invert(self._denoiser(list(range(n))), z0.expand(n, -1, -1, -1), full, self.hparams.mix_weight)
        self.source_round_trip_error = inv.round_trip_error
        self.latents.data = ((inv.x + inv.y) / 2).to(self.latents.dtype)
        self.pair_offset.copy_((inv.x - inv.y) / 2)
        self.initial_norm.copy_(self.latents.detach().flatten(1).norm(dim=1))

    @torch.no_grad()
    def _run_prefix(self) -> None:
        """opt_t: run the first steps - opt_t steps once, without gradient; optimise from there."""
        full = Schedule.from_scheduler(self.backbone.scheduler, self.hparams.steps)
        start = len(full) - self.hparams.opt_t
        if start == 0:
            return
        head = Schedule(full.timesteps[:start], full.alphas_cumprod[:start], full.alphas_cumprod_prev[:start])
        eps = self._denoiser(list(range(len(self.local_items))))
        if self.hparams.sampler == "ddim":
            z = sample_ddim(eps, self.latents.detach(), head)
            self.latents.data = z
        else:
            x, y = sample_edict(eps, self.latents + self.pair_offset, self.latents - self.pair_offset, head, self.hparams.mix_weight)
            self.latents.data = (x + y) / 2
            self.pair_offset.copy_((x - y) / 2)
        self.initial_norm.copy_(self.latents.detach().flatten(1).norm(dim=1))

    def final_evaluation(self) -> Evaluation:
        """Evaluate the final latents once (no gradient); cached until the next step."""
        if self._final is None or self._final_step != self.global_step:
            with torch.no_grad():
                self._final = self.evaluate_items(backward=False)
            self._final_step = self.global_step
        return self._final

    @torch.no_grad()
    def one_step_images(self) -> Evaluation:
        """The one-step guidance baseline (no optimisation): sample with eps' = eps + s sqrt(1-abar) grad."""
        hp = self.hparams
        outs = []
        for idx in self._chunks():
            loss_fn = self._loss_fn(idx, 0)
            guided = OneStepGuidance(self._denoiser(idx), lambda z0: loss_fn(self.backbone.decode(z0))[0],
                                     self.schedule, hp.one_step_scale)
            z = self.latents[idx].detach()
            if hp.sampler == "ddim":
                finals = (sample_ddim(guided, z, self.schedule),)
            else:
                finals = sample_edict(guided, z, z, self.schedule, hp.mix_weight)
            images = self.backbone.decode(finals[0])
            total, terms = loss_fn(images)
            outs.append(Evaluation(total, terms, images))
        return _concat(outs)


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else default


def _concat(outs: list[Evaluation]) -> Evaluation:
    """Micro-batch evaluations -> one over all items (info: the worst value of each entry)."""
    info: dict = {}
    for o in outs:
        for k, v in o.info.items():
            info[k] = max(info.get(k, v), v)
    return Evaluation(total=torch.cat([o.total for o in outs]),
                      terms={k: torch.cat([o.terms[k] for o in outs]) for k in outs[0].terms},
                      images=torch.cat([o.images for o in outs]), info=info)
