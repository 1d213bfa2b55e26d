"""The noise search: a LightningModule whose only trainable parameters are the initial latents of a batch of items.

``NoiseSearch`` holds what every search method shares (the items and their sharding, the frozen model and its
``Chain``, the guidance and held-out metrics, the evaluation of every item, the checkpoint's resume record and the
per-item logging); a method (``module.DOODL``, ``best_of_n.BestOfN``) adds its own settings, optimiser and
``training_step``.
"""
from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch import LightningModule
from torch import nn

from .backbone import Backbone
from .chain import Chain, ChainConfig
from .data import Item, make_items, shard, step_generator
from .families import resolve_backbone
from .families.ip_adapter import check_ip_adapter
from .guidance.base import Guidance
from .item_logs import ItemLogging
from .lightning_compat import attached_trainer
from .objective import Evaluation, check_guidance, concat_evaluations, held_out_metrics, reward_loss, weighted_guidance
from .precision import frozen_dtype, keep_optimised_dtypes
from .resume import mismatch, trajectory


class NonFiniteLoss(ValueError):
    """A loss or gradient turned NaN / infinite: the run stops (``NoiseSearch.refuse_non_finite``); ``cli.py`` prints
    the one line and exits 2, as for bad input (a ValueError, since the cause is almost always a setting or a model)."""


def default_model() -> str:
    """The shipped shapes-world model directory (the README's CPU default)."""
    from .shapes import ShapesWeights  # the one thing the core takes from the shapes world

    return str(ShapesWeights().sd)


class NoiseSearch(ItemLogging, LightningModule):
    """The items, model, chain, guidance, evaluation, resume record and logging every search method shares.

    The YAML keys under ``model:`` (the README's table says more):
        model: a ``Backbone`` object or the shortcut, a hub id / diffusers directory / single file (+ model_config,
            local_files_only, vae_checkpointing); null = the shipped shapes world.
        prompts x seeds, or prompt_file: the items. guidance: modules whose weighted sum is the loss. metrics:
            held-out guidance modules measured on each step's images and logged (``metrics/<name>``), never optimised.
        sampler, backprop, steps, timestep_grid, mix_weight, guidance_scale, negative_prompt, micro_batch,
            drift_tolerance, cuda_graphs, opt_t, source_image: the chain (``chain.ChainConfig``'s attribute docstrings).
        resolution (a square) or height and width: the image size. controlnet, control_images, controlnet_scale:
            a ControlNet and its conditioning image (one for all items, or one per prompt); a list of ControlNets:
            one image and one scale per net (or per net and prompt), the residuals summed.
        ip_adapter, ip_adapter_image, ip_adapter_scale: an IP-Adapter weights file (its image_encoder/ beside it),
            the reference image every item is conditioned on, and the adapter's scale (``families.ip_adapter``).
    """

    updates_latents = False  # a method that steps the latents with an optimiser (DOODL) says True

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
        controlnet: str | list[str] | None = None,
        control_images: list[str] | None = None,
        controlnet_scale: float | list[float] = 1.0,
        micro_batch: int | None = None,
        opt_t: int | None = None,
        source_image: str | None = None,
        drift_tolerance: float = 1e-3,
        vae_checkpointing: bool = False,
        cuda_graphs: bool = False,
        local_files_only: bool | None = None,
        ip_adapter: str | None = None,
        ip_adapter_image: str | None = None,
        ip_adapter_scale: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["guidance", "metrics", "model"])
        self.hparams["model"] = model if isinstance(model, str) or model is None else type(model).__name__
        self.automatic_optimization = False
        if resolution is not None and (height is not None or width is not None):
            raise ValueError("give resolution (a square) or height and width, not both")
        config = self.chain_config()  # every chain setting checked here, once, before any model loads
        check_guidance(guidance, metrics, self.updates_latents and config.renormalize)
        self.items: list[Item] = make_items(prompts, seeds if seeds is not None else [0], prompt_file)
        self.guidance = nn.ModuleList(guidance)
        self.metrics = nn.ModuleList(metrics or [])  # held out: measured on the images, never optimised
        ip = ip_adapter is not None or ip_adapter_image is not None
        if ip:  # checked before any model loads
            if not isinstance(model or "", str):
                raise ValueError("ip_adapter and ip_adapter_image go with model: <path or id>; for a Backbone object set "
                                 "them in its own init_args")
            if cuda_graphs:
                raise ValueError("cuda_graphs replays a UNet called with text only; an IP-Adapter adds image "
                                 "embeddings: drop cuda_graphs")
            check_ip_adapter(ip_adapter, ip_adapter_image, ip_adapter_scale)
        self.backbone = resolve_backbone(model or default_model(), model_config, local_files_only, vae_checkpointing,
                                         controlnet)
        if ip:  # onto the pipeline the shortcut loaded
            if not hasattr(self.backbone, "load_ip_adapter"):
                raise ValueError(f"ip_adapter is for the UNet families (SD-1.x/2.x, SDXL); this is a {self.backbone.family} "
                                 "model: drop ip_adapter and ip_adapter_image")
            self.backbone.load_ip_adapter(ip_adapter, ip_adapter_image, ip_adapter_scale)
        self.chain = Chain(config, self.backbone, self.items, (height or resolution, width or resolution),
                           control_images)
        self.hparams.sampler = self.chain.name  # the model's own when null: recorded in hparams and checkpoints
        self.latent_shape, self.image_size = self.chain.latent_shape, self.chain.image_size
        self.local_items: list[Item] = []        # this rank's items, set in setup
        self._final: tuple[int, Evaluation] | None = None
        self.restored = False                    # resumed from a checkpoint: the start is already applied
        self.last: Evaluation | None = None      # the latest step's evaluation of this rank's items
        self.stepped = None                      # which local items the latest step changed

    def chain_config(self) -> ChainConfig:
        """The ``ChainConfig`` of this module's settings (``hparams``; DOODL's ``optimize_first_edict_image_only``
        is the chain's ``first_image_only``)."""
        hp = self.hparams
        known = {f.name for f in dataclasses.fields(ChainConfig)}
        return ChainConfig(**{k: v for k, v in hp.items() if k in known},
                           first_image_only=hp.get("optimize_first_edict_image_only", False))

    @property
    def renormalizes(self) -> bool:
        """Whether the latents are rescaled to the norm of x_T after every update (``callbacks.RenormalizeLatents``)."""
        return self.updates_latents and self.chain.start.renormalize

    def renormalization(self):
        """(latents, the norm each row is rescaled to, the rows stepped) that ``callbacks.RenormalizeLatents`` rescales
        after an update: the latents themselves (a population method optimises other rows)."""
        return self.latents, self.initial_norm, self.stepped

    def _apply(self, fn, recurse=True):  # the latents keep float32 under half precisions
        keep_optimised_dtypes(self, lambda: super(NoiseSearch, self)._apply(fn, recurse))
        return self

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.local_items:
            return
        trainer = attached_trainer(self)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.items) < world:
            raise ValueError(f"{len(self.items)} items cannot feed {world} processes: give at least one item per process")
        self.local_items = shard(self.items, rank, world)
        pair, norm = self.chain.start.noise(self.local_items, self.latent_shape)
        self.latents = nn.Parameter(pair)  # (N, P, C, h, w): the pair (x_T, y_T) of each item
        self.register_buffer("initial_norm", norm)  # the renormalisation target (official orig_norm)
        self.register_buffer("active", torch.ones(len(pair), dtype=torch.bool))
        if trainer is not None:
            self.backbone.to(frozen_dtype(trainer.precision))

    def prepare(self, device: torch.device | str | None = None) -> "NoiseSearch":
        """Without a Trainer (evaluation, baselines): set up this process's items, move, encode the prompts."""
        self.setup("fit")
        if device is not None:
            self.to(device)
        self.on_fit_start()
        return self

    def on_fit_start(self) -> None:
        self.chain.bind(self.local_items)
        if not self.restored:
            self.latents.data = self.chain.initial(self.latents.detach())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resume must continue the checkpoint's trajectory: any difference in what defines it (items,
        # sampler, update, guidance, weights, precision, processes) is an error, never silently mixed in.
        # Checkpoints older than the trajectory record only get the item check below.
        if "doodl_trajectory" in checkpoint:
            trainer = attached_trainer(self)
            path = trainer.ckpt_path if trainer is not None else None
            problem = mismatch(checkpoint["doodl_trajectory"], trajectory(self),
                               f"checkpoint {path}" if path else "the checkpoint")
            if problem:
                raise ValueError(problem)
        mine = [it.to_dict() for it in self.local_items]
        if checkpoint.get("doodl_items", mine) != mine:
            raise ValueError("this checkpoint was made for different items (prompts, seeds or number of processes); "
                             "resume with the same config and trainer.devices")
        self.restored = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["doodl_items"] = [it.to_dict() for it in self.local_items]
        checkpoint["doodl_trajectory"] = trajectory(self)

    def train_dataloader(self):  # one batch per optimisation step: the items live in the module
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- evaluation --------------------------------------------------------------------------------
    def loss_fn(self, idx: list[int], stream_step: int):
        """The weighted guidance loss of items ``idx``; cutouts drawn from (seed, ``stream_step``) generators."""
        items = [self.local_items[i] for i in idx]
        return weighted_guidance(self.guidance, [it.prompt for it in items],
                                 [step_generator(it, stream_step, stream=1) for it in items])

    def metric_values(self, idx: list[int], images) -> dict:
        """The held-out ``metrics`` of items ``idx`` on their (detached) images, under no_grad: never optimised.
        Their cutouts come from (seed, stream 4) generators fixed over the run, so a metric measures every step alike."""
        if not len(self.metrics):
            return {}
        items = [self.local_items[i] for i in idx]
        return held_out_metrics(self.metrics, images, [it.prompt for it in items],
                                [step_generator(it, 0, stream=4) for it in items])

    def evaluate_items(self, backward: bool, latents=None, step: int | None = None) -> Evaluation:
        """Evaluate every local item (in micro-batches) from ``latents`` (default: the parameter); with
        ``backward`` fill ``latents.grad``. The held-out metrics are measured on each item's image after the
        backward (``metric_values``). ``step``: whose cutouts the guidance draws (default the trainer's
        ``global_step``; outside a Trainer, e.g. a benchmark's iteration k, give k)."""
        latents = self.latents if latents is None else latents
        step = self.global_step if step is None else step
        outs = []
        for idx in self.chain.chunks():
            outs.append(self.chain.evaluate(latents[idx], idx, self.loss_fn(idx, step), backward))
            outs[-1].metrics = self.metric_values(idx, outs[-1].images)
        ev = concat_evaluations(outs)
        ev.reward = reward_loss(self.guidance, ev.total, ev.terms)  # what the best iteration goes by
        return ev

    def final_evaluation(self) -> Evaluation:
        """Evaluate the final latents once (no gradient); cached until the next step."""
        if self._final is None or self._final[0] != self.global_step:
            with torch.no_grad():
                ev = self.evaluate_items(backward=False)
            self.refuse_non_finite(ev, final=True)
            self._final = (self.global_step, ev)
        return self._final[1]

    def refuse_non_finite(self, ev: Evaluation, grad=None, final: bool = False) -> None:
        """A NaN or infinite loss (or gradient) ends the run with ``NonFiniteLoss``, one line naming the step and the
        item, before the update it would poison. Without it such a run went on to exit 0 with an ``initial_loss``
        NaN, a ``best_loss`` inf and images of nothing. The outputs of the steps before stay as they were written
        (results.jsonl and the best images: the best finite iteration). A collective under several processes, so
        every rank stops at once (one rank stopping alone would leave the others waiting in a gather)."""
        bad = ~torch.isfinite(ev.total.detach())
        if grad is not None:
            bad |= ~torch.isfinite(grad.detach().flatten(1)).all(dim=1)
        trainer = attached_trainer(self)
        anywhere = bool(bad.any()) if trainer is None or trainer.world_size == 1 else \
            trainer.strategy.reduce_boolean_decision(bool(bad.any()), all=False)
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
        if self.global_step == 0 and not self.restored:
            raise NonFiniteLoss(f"before any update, {who}: the model or a guidance term computes NaN/inf on these "
                                f"images (check the model's weights and the guidance settings); nothing was optimised")
        raise NonFiniteLoss(f"step {self.global_step}: {who}; stopped before updating (results.jsonl and the best "
                            f"images hold the iterations before it): lower grad_scale or clip_grad_val, or check the "
                            f"guidance terms")
