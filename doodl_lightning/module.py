"""The LightningModule: the initial noise of a batch of items is its only trainable parameter."""
from __future__ import annotations

import functools
import math

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from .backbone import Backbone, resolve_backbone
from .checks import check_finite
from .conditioning import Conditioning
from .data import Item, make_items, shard, step_generator, unshard
from .guidance.base import Guidance
from .objective import (Evaluation, check_guidance, concat_evaluations, evaluate, held_out_metrics, reward_loss,
                        weighted_guidance)
from .optim import (DOODLOptimizer, PerItemAdam, PerItemSGD, check_alternative_update, check_update, masked_step,
                    renormalize_latents)
from .precision import amp_unscale_cancelled, frozen_dtype, keep_optimised_dtypes
from .resume import mismatch, trajectory
from .sampling import Schedule, check_guidance_scale, check_mix_weight, check_sampler, check_steps
from .start import ChainStart


class NonFiniteLoss(ValueError):
    """A loss or gradient turned NaN / infinite: the run stops (``DOODL._refuse_non_finite``); ``cli.py`` prints the
    one line and exits 2, as for bad input (a ValueError, since the cause is almost always a setting or a model)."""


def default_model() -> str:
    """The shipped shapes-world model directory (the README's CPU default)."""
    from .shapes import ShapesWeights  # the one thing the core takes from the shapes world

    return str(ShapesWeights().sd)


class DOODL(LightningModule):
    """End-to-end optimisation of diffusion latents (DOODL, Wallace et al. 2023, arXiv 2303.13703).

    The defaults and option names are the official method's (salesforce/DOODL ``doodl.py``, ``gen()``).
    The YAML keys under ``model:`` (the README's table says more):
        model: a ``Backbone`` object (``class_path: doodl_lightning.backbone.PretrainedBackbone``) or the
            shortcut, a hub id / diffusers directory / single file (+ model_config, local_files_only,
            vae_checkpointing); null = the shipped shapes world.
        prompts x seeds, or prompt_file: the items. guidance: modules whose weighted sum is the loss (images, or
            the initial latents: ``NoiseNormRegularizer``). metrics: held-out guidance modules measured on each
            step's images and logged (``metrics/<name>``, results.jsonl), never optimised.
        sampler, backprop, steps, timestep_grid, mix_weight, guidance_scale, height, width (or resolution, a
            square), micro_batch, drift_tolerance, cuda_graphs: the chain and how its gradient is computed.
            ``sampler`` and ``timestep_grid`` null: the model's (``Backbone.default_sampler``; the official DOODL
            EDICT on the official grid, DDIM on the model's trailing grid for Turbo/Lightning, ``lcm`` for LCM,
            ``flow`` (Euler on the pipeline's grid; ``flow_edict`` the invertible one) for SD3 / FLUX).
        controlnet, control_images, controlnet_scale: a ControlNet and its conditioning image (one for all
            items, or one per prompt).
        opt_t, source_image: where the chain starts (``ChainStart``).
        grad_scale, clip_grad_val, use_momentum, momentum, use_nesterov, perturb_grad_scale, tied_latents,
            optimize_first_edict_image_only, renormalize_latents: the update (``DOODLOptimizer``).
        update_rule: ``official`` (the above), or ``adam`` / ``sgd`` (torch's, on d loss / d latents, with ``lr``,
            per-item ``max_grad_norm`` clipping; sgd uses ``momentum`` and ``use_nesterov``): the variants a
            fair comparison tunes on validation.
    The official non-optimising baselines (``latent_traversal=False``) are ``baselines.guided_sampling``.
    """

    def __init__(
        self,
        model: Backbone | str | None = None,
        model_config: str | None = None,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        prompt_file: str | None = None,
        negative_prompt: str = "",
        guidance: list[Guidance] | None = None,
        metrics: list[Guidance] | None = None,
        sampler: str | None = None,
        backprop: str = "checkpoint",
        steps: int = 50,
        timestep_grid: str | None = None,
        mix_weight: float = 0.93,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        height: int | None = None,
        width: int | None = None,
        controlnet: str | None = None,
        control_images: list[str] | None = None,
        controlnet_scale: float = 1.0,
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
        update_rule: str = "official",
        lr: float = 0.01,
        max_grad_norm: float | None = None,
        drift_tolerance: float = 1e-3,
        vae_checkpointing: bool = False,
        cuda_graphs: bool = False,
        local_files_only: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["guidance", "metrics", "model"])
        self.hparams["model"] = model if isinstance(model, str) or model is None else type(model).__name__
        self.automatic_optimization = False
        if sampler is not None:
            check_sampler(sampler, backprop, first_image_only=optimize_first_edict_image_only)
        check_steps(steps, timestep_grid)
        if resolution is not None and (height is not None or width is not None):
            raise ValueError("give resolution (a square) or height and width, not both")
        check_mix_weight(mix_weight)
        check_guidance_scale(guidance_scale)
        check_finite(controlnet_scale=controlnet_scale, drift_tolerance=drift_tolerance)
        check_update(grad_scale, clip_grad_val, momentum, perturb_grad_scale)
        check_alternative_update(update_rule, lr, max_grad_norm)
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or null, got {micro_batch}")
        self.start = ChainStart(steps, sampler or "edict", mix_weight, opt_t, source_image, tied_latents,
                                renormalize_latents)  # checks the start's keys before any model loads
        check_guidance(guidance, metrics, self.start.renormalize)
        self.items: list[Item] = make_items(prompts, seeds if seeds is not None else [0], prompt_file)
        self.guidance = nn.ModuleList(guidance)
        self.metrics = nn.ModuleList(metrics or [])  # held out: measured on the images, never optimised
        self.backbone = resolve_backbone(model or default_model(), model_config, local_files_only, vae_checkpointing,
                                         controlnet)
        if sampler is None:  # the model's own: resolved once, recorded in the hyperparameters and checkpoints
            self.hparams.sampler = sampler = self.backbone.default_sampler
            check_sampler(sampler, backprop, first_image_only=optimize_first_edict_image_only)
            self.start = ChainStart(steps, sampler, mix_weight, opt_t, source_image, tied_latents, renormalize_latents)
        self.backbone.check_sampler(sampler, timestep_grid)  # e.g. ddim on a flow model (SD3 / FLUX): one line, now
        if cuda_graphs:
            from .families.flow import FlowBackbone

            if isinstance(self.backbone, FlowBackbone):
                raise ValueError("cuda_graphs replays a UNet; this model is a flow transformer (SD3 / FLUX): drop cuda_graphs")
        if sampler == "lcm" and opt_t is not None:
            raise ValueError("opt_t needs a DDIM-like sampler (ddim or edict); the LCM sampler re-noises between "
                             "steps: drop opt_t or set sampler: ddim")
        self.latent_shape = self.backbone.latent_shape(height or resolution, width or resolution)
        self.image_size = (self.latent_shape[1] * self.backbone.vae_scale_factor,
                           self.latent_shape[2] * self.backbone.vae_scale_factor)
        self.control_images = self._load_control_images(control_images)
        self.local_items: list[Item] = []        # this rank's items, set in setup
        self._final: tuple[int, Evaluation] | None = None
        self._restored = False                   # resumed from a checkpoint: the start is already applied
        self.last: Evaluation | None = None      # the latest step's evaluation of this rank's items
        self.stepped = None                      # which local items the latest step changed
        self._graphed = None                     # the UNet's CUDA graphs (cuda_graphs)

    def _apply(self, fn, recurse=True):  # the latents keep float32 under half precisions
        keep_optimised_dtypes(self, lambda: super(DOODL, self)._apply(fn, recurse))
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
        pair, norm = self.start.noise(self.local_items, self.latent_shape)
        self.latents = nn.Parameter(pair)  # (N, P, C, h, w): the pair (x_T, y_T) of each item
        self.register_buffer("initial_norm", norm)  # the renormalisation target (official orig_norm)
        self.register_buffer("active", torch.ones(len(pair), dtype=torch.bool))
        if self._trainer is not None:
            self.backbone.to(frozen_dtype(self.trainer.precision))

    def prepare(self, device: torch.device | str | None = None) -> "DOODL":
        """Without a Trainer (evaluation, baselines): set up this process's items, move, encode the prompts."""
        self.setup("fit")
        if device is not None:
            self.to(device)
        self.on_fit_start()
        return self

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resume must continue the checkpoint's trajectory: any difference in what defines it (items,
        # sampler, update, guidance, weights, precision, processes) is an error, never silently mixed in.
        # Checkpoints older than the trajectory record only get the item check below.
        if "doodl_trajectory" in checkpoint:
            path = self._trainer.ckpt_path if self._trainer is not None else None
            problem = mismatch(checkpoint["doodl_trajectory"], trajectory(self),
                               f"checkpoint {path}" if path else "the checkpoint")
            if problem:
                raise ValueError(problem)
        mine = [it.to_dict() for it in self.local_items]
        if checkpoint.get("doodl_items", mine) != mine:
            raise ValueError("this checkpoint was made for different items (prompts, seeds or number of processes); "
                             "resume with the same config and trainer.devices")
        self._restored = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["doodl_items"] = [it.to_dict() for it in self.local_items]
        checkpoint["doodl_trajectory"] = trajectory(self)

    def _load_control_images(self, paths: list[str] | None) -> Tensor | None:
        """The ControlNet's conditioning image of each prompt (P, 3, H, W) in [0, 1], or None."""
        if paths is None:
            if self.backbone.controlnet is not None:
                raise ValueError("the model has a ControlNet but no control_images were given: add model.control_images: "
                                 "[path] (one for all items, or one per prompt)")
            return None
        if self.backbone.controlnet is None:
            raise ValueError("control_images given but the model has no ControlNet: add model.controlnet: <dir or hub id>")
        prompts = list(dict.fromkeys(it.prompt for it in self.items))
        if len(paths) not in (1, len(prompts)):
            raise ValueError(f"{len(paths)} control_images for {len(prompts)} prompts: give one image, or one per prompt "
                             "(in prompt order)")
        from .data import load_control_image

        h, w = self.image_size
        images = torch.cat([load_control_image(p, (w, h)) for p in paths])
        return images.expand(len(prompts), -1, -1, -1) if len(paths) == 1 else images

    def _control(self, idx: list[int]) -> Tensor | None:
        """The control images of the local items ``idx`` (each item has its prompt's image)."""
        if self.control_images is None:
            return None
        prompts = list(dict.fromkeys(it.prompt for it in self.items))
        rows = [prompts.index(self.local_items[i].prompt) for i in idx]
        return self.control_images[rows].to(self.device)

    def lcm_noises(self, idx: list[int]) -> list[Tensor] | None:
        """The noise the LCM sampler adds after each step but the last, per item from (seed, step) alone:
        fixed across iterations, so the chain is a deterministic function of x_T."""
        if self.hparams.sampler != "lcm":
            return None
        items = [self.local_items[i] for i in idx]
        return [torch.stack([torch.randn(self.latent_shape, generator=step_generator(it, k, stream=4)) for it in items])
                .to(self.device) for k in range(len(self.schedule) - 1)]

    def on_fit_start(self) -> None:
        # one prompt at a time: an item's embedding must not depend on which items share its rank
        size = self.image_size
        self._cond = Conditioning.cat([self.backbone.encode_prompts([it.prompt], size) for it in self.local_items])
        self._uncond = self.backbone.encode_negative(self.hparams.negative_prompt, size)
        if not self._restored:
            every = list(range(len(self.local_items)))
            self.latents.data = self.start.prepare(self.latents.detach(), self.denoiser(every), self.full_schedule,
                                                   self.backbone, self.local_items)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.update_rule == "adam":
            return PerItemAdam([self.latents], lr=hp.lr, max_grad_norm=hp.max_grad_norm, tied_latents=hp.tied_latents)
        if hp.update_rule == "sgd":
            return PerItemSGD([self.latents], lr=hp.lr, momentum=hp.momentum, nesterov=hp.use_nesterov,
                              max_grad_norm=hp.max_grad_norm, tied_latents=hp.tied_latents)
        opt = DOODLOptimizer([self.latents], grad_scale=hp.grad_scale, clip_grad_val=hp.clip_grad_val,
                             use_momentum=hp.use_momentum, momentum=hp.momentum, use_nesterov=hp.use_nesterov,
                             perturb_grad_scale=hp.perturb_grad_scale, tied_latents=hp.tied_latents)
        # the perturbation of item r at step k: from (seed, k) alone, so resumes and ranks repeat it
        opt.noise_generator = lambda r, k: step_generator(self.local_items[r], k, stream=2)
        return opt

    def train_dataloader(self):  # one batch per optimisation step: the items live in the module
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- the chain ---------------------------------------------------------------------------------
    @functools.cached_property
    def full_schedule(self) -> Schedule:
        """The whole chain of ``steps`` steps on ``timestep_grid`` (built once: the chain reads it per step)."""
        return self.backbone.schedule(self.hparams.steps, self.hparams.timestep_grid, self.image_size)

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The chain that is optimised: all ``steps``, or the last ``opt_t`` of them."""
        return self.start.optimised(self.full_schedule)

    def denoiser(self, idx: list[int], guidance_scale: float | None = None):
        """eps(x_t, t) of the local items ``idx`` (their prompts), with classifier-free guidance."""
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        eps = self.backbone.denoiser(self._cond[idx], self._uncond, scale, control_image=self._control(idx),
                                     control_scale=self.hparams.controlnet_scale)
        if self.hparams.cuda_graphs and self.device.type == "cuda":
            if self._graphed is None:
                from .cuda_graphs import GraphedUNet

                self._graphed = GraphedUNet(self.backbone.unet, auto_prepare=True)
            eps.unet = self._graphed
        return eps

    def chunks(self) -> list[list[int]]:
        """The local items in micro-batches."""
        n, m = len(self.local_items), self.hparams.micro_batch or len(self.local_items)
        return [list(range(i, min(i + m, n))) for i in range(0, n, m)]

    def loss_fn(self, idx: list[int], stream_step: int):
        """The weighted guidance loss of items ``idx``; cutouts drawn from (seed, ``stream_step``) generators."""
        items = [self.local_items[i] for i in idx]
        return weighted_guidance(self.guidance, [it.prompt for it in items],
                                 [step_generator(it, stream_step, stream=1) for it in items])

    def metric_values(self, idx: list[int], images: Tensor) -> dict[str, Tensor]:
        """The held-out ``metrics`` of items ``idx`` on their (detached) images, under no_grad: never optimised.
        Their cutouts come from (seed, stream 4) generators fixed over the run, so a metric measures every step alike."""
        if not len(self.metrics):
            return {}
        items = [self.local_items[i] for i in idx]
        return held_out_metrics(self.metrics, images, [it.prompt for it in items],
                                [step_generator(it, 0, stream=4) for it in items])

    def evaluate_items(self, backward: bool, latents: Tensor | None = None) -> Evaluation:
        """Evaluate every local item (in micro-batches) from ``latents`` (default: the parameter); with
        ``backward`` fill ``latents.grad``. The held-out metrics are measured on each item's image after the
        backward (``metric_values``)."""
        hp = self.hparams
        latents = self.latents if latents is None else latents
        outs = []
        for idx in self.chunks():
            pair = latents[idx]
            outs.append(evaluate(
                self.denoiser(idx), pair[:, 0], self.schedule, self.backbone.decode, self.loss_fn(idx, self.global_step),
                sampler=hp.sampler, backprop=hp.backprop, mix_weight=hp.mix_weight,
                y=pair[:, 1] if self.start.pair_size == 2 else None, drift_tolerance=hp.drift_tolerance,
                backward=backward, first_image_only=hp.optimize_first_edict_image_only, noises=self.lcm_noises(idx)))
            outs[-1].metrics = self.metric_values(idx, outs[-1].images)
        ev = concat_evaluations(outs)
        ev.reward = reward_loss(self.guidance, ev.total, ev.terms)  # what the best iteration goes by
        return ev

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        ev = self.evaluate_items(backward=True)
        grad = self.latents.grad
        self._refuse_non_finite(ev, grad)  # before the update: the latents stay the last ones with a finite loss
        self.stepped = self.active.clone()
        with amp_unscale_cancelled(grad, getattr(self.trainer.precision_plugin, "scaler", None)):
            masked_step(opt, self.latents, self.stepped)
        if self.start.renormalize:
            renormalize_latents(self.latents, self.initial_norm, self.stepped)
        self.last = ev
        self._log_step(ev, grad)
        return None

    def final_evaluation(self) -> Evaluation:
        """Evaluate the final latents once (no gradient); cached until the next step."""
        if self._final is None or self._final[0] != self.global_step:
            with torch.no_grad():
                ev = self.evaluate_items(backward=False)
            self._refuse_non_finite(ev, final=True)
            self._final = (self.global_step, ev)
        return self._final[1]

    def _refuse_non_finite(self, ev: Evaluation, grad: Tensor | None = None, final: bool = False) -> None:
        """A NaN or infinite loss (or gradient) ends the run with ``NonFiniteLoss``, one line naming the step and the
        item, before the update it would poison. Without it such a run went on to exit 0 with an ``initial_loss``
        NaN, a ``best_loss`` inf and images of nothing. The outputs of the steps before stay as they were written
        (results.jsonl and the best images: the best finite iteration). A collective under several processes, so
        every rank stops at once (one rank stopping alone would leave the others waiting in a gather)."""
        bad = ~torch.isfinite(ev.total.detach())
        if grad is not None:
            bad |= ~torch.isfinite(grad.detach().flatten(1)).all(dim=1)
        world = self.trainer.world_size if self._trainer is not None else 1
        anywhere = bool(bad.any()) if world == 1 else self.trainer.strategy.reduce_boolean_decision(bool(bad.any()),
                                                                                                     all=False)
        if not anywhere:
            return
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            item = self.local_items[j]
            what = "loss" if not torch.isfinite(ev.total[j]) else "gradient"
            value = float(ev.total[j]) if what == "loss" else "not finite"
            who = f"item {item.index} ({self.item_names[item.index]}): its {what} is {value}"
        else:
            who = "an item of another process has a loss or gradient that is not finite"
        if final:
            raise NonFiniteLoss(f"after the last step ({self.global_step}) {who}; results.jsonl and the best images "
                                f"hold the last finite iteration: lower grad_scale or clip_grad_val, or stop earlier")
        if self.global_step == 0 and not self._restored:
            raise NonFiniteLoss(f"before any update, {who}: the model or a guidance term computes NaN/inf on these "
                                f"images (check the model's weights and the guidance settings); nothing was optimised")
        raise NonFiniteLoss(f"step {self.global_step}: {who}; stopped before updating (results.jsonl and the best "
                            f"images hold the iterations before it): lower grad_scale or clip_grad_val, or check the "
                            f"guidance terms")

    # -- logging -----------------------------------------------------------------------------------
    def gather_items(self, values: Tensor) -> Tensor:
        """A per-local-item vector -> the vector over ALL items (in item order), on every rank."""
        world = self.trainer.world_size if self._trainer is not None else 1
        values = values.detach().float()
        if world == 1:
            return values.cpu()
        padded = torch.full((math.ceil(len(self.items) / world),), float("nan"), device=values.device)
        padded[: len(values)] = values
        return unshard(self.all_gather(padded).reshape(world, -1).cpu(), len(self.items))

    @functools.cached_property
    def item_names(self) -> list[str]:
        """Each item's name in TensorBoard, ``prompt | seed N`` (``console.item_labels``), in item order."""
        from .console import item_labels

        return item_labels(self.items)

    def gathered_metrics(self, ev: Evaluation, grad: Tensor | None = None) -> dict[str, Tensor]:
        """Each per-item metric of ``ev`` over ALL items (gathered from every rank; a collective): ``loss``,
        ``loss_<guidance>``, ``latent_norm``, ``metric_<name>`` (the held-out metrics) and, given the gradient,
        ``grad_norm``."""
        per_item = {"loss": ev.total, "latent_norm": self.latents.detach()[:, 0].flatten(1).norm(dim=1),
                    # with a regulariser: the reward terms' weighted sum, which chooses the best iteration (ReNO's)
                    **({"reward_loss": ev.reward} if ev.reward is not ev.total else {}),
                    **{f"loss_{k}": v for k, v in ev.terms.items()},
                    **{f"metric_{k}": v for k, v in ev.metrics.items()}}
        if grad is not None:  # a search without gradients (best-of-N) has none
            per_item["grad_norm"] = grad.flatten(1).norm(dim=1)
        return {k: self.gather_items(v) for k, v in per_item.items()}

    def metric_logs(self, gathered: dict[str, Tensor]) -> dict[str, float]:
        """What a step logs of ``gathered_metrics``: ``train/<metric>`` (mean over items), ``items/<metric>/<name>``
        (each item under its ``item_names`` entry, so a tag means the same item in every run) and
        ``train/best_loss``, the mean over items of each item's loss at its best iteration so far (``item_best_loss``,
        all items, updated here; it restarts with a resumed process). The best iteration is the one of the lowest
        reward loss (``item_best_reward``; ``Evaluation.reward``, regularisers excluded, as ReNO), so without a
        regulariser ``train/best_loss`` is each item's lowest loss. A held-out metric's mean is ``metrics/<name>``."""
        loss = gathered["loss"]
        reward = gathered.get("reward_loss", loss)
        best, best_reward = getattr(self, "item_best_loss", None), getattr(self, "item_best_reward", None)
        if best is None or best.shape != loss.shape:
            self.item_best_loss, self.item_best_reward = loss.clone(), reward.clone()
        else:
            if best_reward is None or best_reward.shape != loss.shape:
                best_reward = best  # restored from a checkpoint that kept the loss only
            better = reward < best_reward  # strict: the first of equal iterations is kept, as results.jsonl and ReNO
            self.item_best_loss = torch.where(better, loss, best)
            self.item_best_reward = torch.where(better, reward, best_reward)
        logs = {self.mean_tag(k): float(v.mean()) for k, v in gathered.items()}
        logs["train/best_loss"] = float(self.item_best_loss.mean())
        names = self.item_names
        logs.update({f"items/{k}/{names[i]}": float(v[i]) for k, v in gathered.items() for i in range(len(names))})
        return logs

    @staticmethod
    def mean_tag(metric: str) -> str:
        """The tag of a metric's mean over items: ``train/<metric>``; a held-out metric's ``metrics/<name>``."""
        return f"metrics/{metric[len('metric_'):]}" if metric.startswith("metric_") else f"train/{metric}"

    def _write_tensorboard_layout(self, metrics: list[str]) -> None:
        """Once per TensorBoard run, on rank 0: a custom-scalars layout (TensorBoard's CUSTOM SCALARS tab) with one
        chart per metric in which every item is its own line, named ``items/<metric>/<prompt | seed>``, beside
        the run-level mean ``train/<metric>`` (and, for the loss, ``train/best_loss``). The Scalars tab gives one
        card per tag; only a Multiline chart draws several tags as lines of one chart. The charts are regexes
        over tags, the same in every run, so TensorBoard merges the layouts of the runs it shows."""
        if self._trainer is None or self.global_rank != 0:
            return
        import re

        written = self.__dict__.setdefault("_tensorboard_layouts", [])
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if not hasattr(exp, "add_custom_scalars") or any(exp is w for w in written):
                continue
            charts = {}
            for m in metrics:
                tags = [f"^items/{re.escape(m)}/", f"^{re.escape(self.mean_tag(m))}$"]
                if m == "loss":
                    tags.append("^train/best_loss$")
                charts[m] = ["Multiline", tags]
            exp.add_custom_scalars({"DOODL: every item (prompt | seed) and the mean (train/...)": charts})
            written.append(exp)

    def _log_step(self, ev: Evaluation, grad: Tensor | None) -> None:
        """Log one step (see ``metric_logs``) plus ``train/active_items`` and, with ``reversible``, the drift.
        ``grad`` None: a search without gradients (best-of-N), no ``grad_norm``."""
        gathered = self.gathered_metrics(ev, grad)
        logs = self.metric_logs(gathered)
        logs["train/active_items"] = float(self.gather_items(self.active.float()).sum())
        if "reversible_drift" in ev.info:
            logs["train/reversible_drift"] = float(ev.info["reversible_drift"])
        self._write_tensorboard_layout(list(gathered))
        self.log("loss", logs["train/loss"], prog_bar=True, logger=False, batch_size=len(self.items))
        self.log_dict(logs, batch_size=len(self.items))
