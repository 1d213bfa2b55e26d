"""The LightningModule: the initial noise of a batch of items is its only trainable parameter."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from .backbone import Backbone, precision_dtype
from .data import Item, initial_noise, load_source_image, make_items, shard, step_generator
from .guidance.base import Guidance
from .objective import Evaluation, evaluate
from .optim import DOODLOptimizer, masked_step
from .sampling import GRIDS, GuidedEps, OneStepGradient, Schedule, check_sampler, edict_invert, sample_ddim, sample_edict
from .sampling.edict import check_mix_weight
from .dtypes import at_least_float32


def default_model() -> str:
    """The shipped shapes-world model directory (the README's CPU default)."""
    return os.path.join(os.path.dirname(__file__), "shapes", "weights", "sd-shapes")


class DOODL(LightningModule):
    """End-to-end optimisation of diffusion latents (DOODL, Wallace et al. 2023, arXiv 2303.13703).

    The defaults are the official method (salesforce/DOODL ``doodl.py``, ``gen()``); the names of the
    official options are kept. Args (the YAML keys under ``model:``):
        model: hub id, local diffusers directory, or one .safetensors/.ckpt file (then ``model_config``).
        prompts, seeds, prompt_file: the items, every prompt with every seed.
        guidance: guidance modules (``class_path`` + ``init_args``); the loss is their weighted sum.
        sampler / backprop: ``edict`` | ``ddim`` and ``checkpoint`` | ``reversible`` | ``autograd``.
        steps, mix_weight, guidance_scale: the sampler (mix_weight is EDICT's p).
        timestep_grid: ``official`` (offset 0: 900, ..., 0 for 10 steps) or ``model`` (the model's
            scheduler config, SD: 901, ..., 1).
        micro_batch: items per chain evaluation (None = all this rank's items at once).
        opt_t: optimise only the last ``opt_t`` sampler steps (the earlier ones run once, without grad;
            the pair is then tied if ``tied_latents``).
        source_image: edit a real image: VAE-encode (a posterior sample), EDICT-invert, optimise from
            that pair (renormalisation off, ``opt_t`` refused, as the official code).
        grad_scale, clip_grad_val, use_momentum, momentum, use_nesterov, perturb_grad_scale,
        tied_latents, optimize_first_edict_image_only, renormalize_latents: the official update
            (``DOODLOptimizer``); renormalize_latents defaults to on unless editing.
        latent_traversal: False runs the official non-traversal baselines instead of optimising:
            guidance on eps at every step, with the one-step estimate (``one_step_baseline``) or the
            gradient through the rest of the chain; generate with ``guided_images()``.
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
        timestep_grid: str = "official",
        mix_weight: float = 0.93,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        micro_batch: int | None = None,
        opt_t: int | None = None,
        source_image: str | None = None,
        grad_scale: float = 1.0,
        clip_grad_val: float | None = 1e-3,
        use_momentum: bool = True,
        momentum: float = 0.9,
        use_nesterov: bool = False,
        perturb_grad_scale: float = 1e-4,
        tied_latents: bool = True,
        optimize_first_edict_image_only: bool = False,
        renormalize_latents: bool | None = None,
        latent_traversal: bool = True,
        one_step_baseline: bool = False,
        drift_tolerance: float = 1e-3,
        vae_checkpointing: bool = False,
        cuda_graphs: bool = False,
        local_files_only: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["guidance"])
        self.automatic_optimization = False
        check_sampler(sampler, backprop)
        check_mix_weight(mix_weight)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if timestep_grid not in GRIDS:
            raise ValueError(f"unknown timestep_grid {timestep_grid!r}; choose one of {', '.join(GRIDS)}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or null, got {micro_batch}")
        if opt_t is not None and not 1 <= opt_t <= steps:
            raise ValueError(f"opt_t must be in [1, steps={steps}] or null, got {opt_t}")
        if grad_scale <= 0:
            raise ValueError(f"grad_scale must be > 0 (it multiplies the loss), got {grad_scale}")
        if source_image is not None and not os.path.isfile(source_image):
            raise FileNotFoundError(f"source_image {source_image} does not exist")
        if source_image is not None and sampler != "edict":
            raise ValueError("editing a source_image needs sampler 'edict' (exact inversion)")
        if source_image is not None and opt_t is not None:
            raise ValueError("opt_t cannot be combined with source_image (the official code optimises an edit at x_T): drop opt_t")
        if source_image is not None and renormalize_latents:
            raise ValueError("renormalize_latents must be off when editing a source_image (the inverted pair is not "
                             "Gaussian noise; the official code asserts it): drop renormalize_latents")
        if optimize_first_edict_image_only and sampler != "edict":
            raise ValueError("optimize_first_edict_image_only needs sampler 'edict' (DDIM makes one image)")
        self.items: list[Item] = make_items(prompts, seeds if seeds is not None else [0], prompt_file)
        self.guidance = nn.ModuleList(guidance or [])
        names = [g.name for g in self.guidance]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance names must be unique (they are log keys), got {names}; set name: ...")
        if not self.guidance:
            raise ValueError("no guidance modules: give model.guidance: [{class_path: ...}] (nothing to optimise)")
        self.backbone = Backbone.load(model or default_model(), model_config=model_config,
                                      local_files_only=local_files_only, vae_checkpointing=vae_checkpointing)
        self.latent_shape = self.backbone.latent_shape(resolution)
        self.pair_size = 2 if sampler == "edict" else 1
        self.renormalize = (source_image is None) if renormalize_latents is None else renormalize_latents
        self.local_items: list[Item] = []
        self._restored = False
        self._final: Evaluation | None = None
        self.last: Evaluation | None = None      # the latest step's evaluation of this rank's items
        self.stepped = None                      # which local items the latest step changed
        self._final_step = -1
        self._graphed = None
        self._guided_calls = 0

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
        # Lightning's half "-true" precisions cast the whole module; the latents (float32) and the
        # renormalisation target (float64) keep their dtype: only their device follows. ("64-true"
        # may widen them.)
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
        # the pair (x_T, y_T) of each item, both x_T at the start (official: latent_pair = [latent, latent])
        self.latents = nn.Parameter(z.unsqueeze(1).repeat(1, self.pair_size, 1, 1, 1))
        # the renormalisation target: the norm of x_T, kept through opt_t (official orig_norm); float64
        # so that a 64-true run renormalises exactly
        self.register_buffer("initial_norm", z.double().flatten(1).norm(dim=1))
        self.register_buffer("active", torch.ones(len(z), dtype=torch.bool))
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
        return DOODLOptimizer([self.latents], grad_scale=hp.grad_scale, clip_grad_val=hp.clip_grad_val,
                              use_momentum=hp.use_momentum, momentum=hp.momentum, use_nesterov=hp.use_nesterov,
                              perturb_grad_scale=hp.perturb_grad_scale, tied_latents=hp.tied_latents)

    def configure_callbacks(self):
        from callbacks.renormalize import LatentRenormalization

        return [LatentRenormalization()] if self.renormalize else []

    def train_dataloader(self):
        # one batch per optimisation step; the items live in the module, the batch is a tick
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- the chain ---------------------------------------------------------------------------------
    @property
    def full_schedule(self) -> Schedule:
        """The whole chain of ``steps`` steps on ``timestep_grid``."""
        return Schedule.from_scheduler(self.backbone.scheduler, self.hparams.steps, self.hparams.timestep_grid)

    @property
    def schedule(self) -> Schedule:
        """The chain that is optimised: all ``steps``, or the last ``opt_t`` of them.

        The tail is a chain of its own: its leapfrog order restarts at its first step (official
        ``enumerate(timesteps)`` over the shortened list).
        """
        key = (self.hparams.steps, self.hparams.opt_t, self.hparams.timestep_grid)
        if getattr(self, "_schedule_key", None) != key:
            full = self.full_schedule
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
            terms = {g.name: at_least_float32(g(images.to(_dtype_of(g, images.dtype)), prompts=prompts, generators=gens))
                     for g in self.guidance}
            total = sum((g.weight * terms[g.name] for g in self.guidance), torch.zeros(len(items), device=images.device))
            return total, terms

        return loss_fn

    def evaluate_items(self, backward: bool) -> Evaluation:
        """Evaluate every local item (in micro-batches); with ``backward`` fill ``latents.grad``."""
        hp = self.hparams
        outs = []
        for idx in self._chunks():
            pair = self.latents[idx]
            outs.append(evaluate(
                self._denoiser(idx), pair[:, 0], self.schedule, self.backbone.decode, self._loss_fn(idx, self.global_step),
                sampler=hp.sampler, backprop=hp.backprop, mix_weight=hp.mix_weight,
                y=pair[:, 1] if self.pair_size == 2 else None, drift_tolerance=hp.drift_tolerance, backward=backward,
                first_image_only=hp.optimize_first_edict_image_only))
        return _concat(outs)

    def training_step(self, batch, batch_idx):
        if not self.hparams.latent_traversal:
            raise RuntimeError("latent_traversal: false is the official guided-sampling baseline, which optimises "
                               "nothing: generate with DOODL.guided_images(), not fit")
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
        per_item = {"loss": ev.total, "latent_norm": self.latents.detach()[:, 0].flatten(1).norm(dim=1),
                    "grad_norm": grad.flatten(1).norm(dim=1)}
        per_item.update({f"loss_{k}": v for k, v in ev.terms.items()})
        gathered = {k: self.gather_items(v) for k, v in per_item.items()}
        logs = {f"train/{k}": float(v.mean()) for k, v in gathered.items()}
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
        """Editing: the source image's EDICT inversion becomes every item's (untied) pair.

        As the official code: a sample of the VAE posterior (each item's own seed draws it), not its
        mean, then EDICT inversion over the whole chain; renormalisation is off.
        """
        c, h, w = self.latent_shape
        f = self.backbone.vae_scale_factor
        x = load_source_image(self.hparams.source_image, (w * f, h * f)).to(self.device)
        gens = [torch.Generator().manual_seed(it.seed) for it in self.local_items]
        z0 = self.backbone.encode_images(x.expand(len(gens), -1, -1, -1), generators=gens)
        n = len(self.local_items)
        inv = edict_invert(self._denoiser(list(range(n))), z0, self.full_schedule, self.hparams.mix_weight)
        self.source_round_trip_error = inv.round_trip_error
        self.latents.data = torch.stack([inv.x, inv.y], dim=1).to(self.latents.dtype)

    @torch.no_grad()
    def _run_prefix(self) -> None:
        """opt_t: run the first steps - opt_t steps once, without gradient; optimise from there.

        Then the pair is tied (its mean) if ``tied_latents``, and the renormalisation target stays the
        norm of x_T (official doodl.py, the ``opt_t`` branch).
        """
        full = self.full_schedule
        start = len(full) - self.hparams.opt_t
        if start == 0:
            return
        head = full.head(start)
        eps = self._denoiser(list(range(len(self.local_items))))
        z = self.latents.detach()
        if self.hparams.sampler == "ddim":
            pair = sample_ddim(eps, z[:, 0], head).unsqueeze(1)
        else:
            pair = torch.stack(sample_edict(eps, z[:, 0], z[:, 1], head, self.hparams.mix_weight), dim=1)
            if self.hparams.tied_latents:
                pair = pair.mean(dim=1, keepdim=True).expand_as(pair)
        self.latents.data = pair.to(self.latents.dtype).contiguous()

    def final_evaluation(self) -> Evaluation:
        """Evaluate the final latents once (no gradient); cached until the next step."""
        if self._final is None or self._final_step != self.global_step:
            with torch.no_grad():
                self._final = self.evaluate_items(backward=False)
            self._final_step = self.global_step
        return self._final

    @torch.no_grad()
    def guided_images(self) -> Evaluation:
        """The official ``latent_traversal=False`` baselines: sample once, adding to eps at every step
        sqrt(1 - abar_t) times the gradient of grad_scale * loss, either the one-step estimate
        (``one_step_baseline``) or 0.5 x the gradient through the rest of the chain (both EDICT images).
        """
        hp = self.hparams
        outs = []
        for idx in self._chunks():
            eps = self._denoiser(idx)
            grad = self._one_step_gradient(idx) if hp.one_step_baseline else self._chain_gradient(idx)
            guided = GuidedEps(eps, grad, self.schedule)
            z = self.latents[idx].detach()
            if hp.sampler == "ddim":
                finals = (sample_ddim(guided, z[:, 0], self.schedule),)
            else:
                finals = sample_edict(guided, z[:, 0], z[:, 1], self.schedule, hp.mix_weight)
            images = self.backbone.decode(finals[0])
            total, terms = self._loss_fn(idx, 0)(images)
            outs.append(Evaluation(total, terms, images))
        return _concat(outs)

    def _guided_loss_fn(self, idx: list[int]):
        # fresh cutouts at every guidance call, repeatable: one generator stream per call
        self._guided_calls += 1
        return self._loss_fn(idx, self._guided_calls)

    def _one_step_gradient(self, idx: list[int]) -> OneStepGradient:
        eps_uncond = self.backbone.denoiser(self._cond[idx], self._uncond, 0.0)

        def loss_of_latents(sample: Tensor) -> Tensor:
            return self._guided_loss_fn(idx)(self.backbone.decode(sample))[0]

        return OneStepGradient(eps_uncond, loss_of_latents, self.schedule, self.hparams.grad_scale)

    def _chain_gradient(self, idx: list[int]):
        """d(grad_scale * S)/dx_t through the rest of the chain from (x_t, x_t), times 0.5 (official cond_fn)."""
        hp = self.hparams
        index = {t: i for i, t in enumerate(self.schedule.timesteps)}

        def grad(x: Tensor, t: int) -> Tensor:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                evaluate(self._denoiser(idx), leaf, self.schedule.tail(index[int(t)]), self.backbone.decode,
                         self._guided_loss_fn(idx), sampler=hp.sampler, backprop=hp.backprop, mix_weight=hp.mix_weight,
                         y=leaf if self.pair_size == 2 else None, drift_tolerance=hp.drift_tolerance, backward=True)
            return 0.5 * hp.grad_scale * leaf.grad

        return grad


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
