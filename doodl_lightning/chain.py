"""The chain: one frozen text-to-image model run from each item's initial noise to its image, and the gradient of
a loss on that image with respect to the noise. Plain torch (no Lightning): the LightningModules, the baselines,
the held-out protocol and the benchmarks all run this one object, and nothing else picks a sampler or builds a
schedule.

``ChainConfig`` holds how the chain runs (each setting checked once, in ``__post_init__``); ``Chain`` is built
once from it and a backbone, and owns the schedule, where the chain starts (``ChainStart``: seeds, an inverted
source image, or an ``opt_t`` prefix), the denoiser of each item (its prompt, classifier-free guidance, ControlNet,
LCM's per-step noise), sampling through the registered sampler, and one evaluation (chain -> decode -> losses ->
gradient into the initial latents, ``objective.evaluate``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .backbone import Backbone
from .checks import check_finite
from .conditioning import Conditioning
from .data import Item, load_control_image, step_generator
from .families.controlnet import controlnet_count
from .objective import Evaluation, LossFn, evaluate
from .sampling import (Sampler, Schedule, check_guidance_scale, check_mix_weight, check_sampler, check_steps,
                       get_sampler)
from .start import ChainStart


@dataclass
class ChainConfig:
    """How the chain runs and how its gradient is computed: the ``model:`` keys of the same names."""

    sampler: str | None = None
    """A registered sampler (``sampling.SAMPLERS``: ddim, edict, lcm, flow, flow_edict); null: the model's own
    (``Backbone.default_sampler``)."""
    backprop: str = "checkpoint"
    """The chain's gradient: autograd (reference), checkpoint (exact, one latent per step), reversible (invertible
    samplers: nothing kept per step)."""
    steps: int = 50
    """Sampling steps of the whole chain."""
    timestep_grid: str | None = None
    """The time grid (``sampling.GRIDS``); null: the model's own."""
    mix_weight: float = 0.93
    """EDICT's mixing weight p (the paper's 0.93)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1 = conditional only, 0 = unconditional only)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    controlnet_scale: float | list[float] = 1.0
    """The scale of a ControlNet's residuals (several ControlNets: one scale per net, or one for all)."""
    micro_batch: int | None = None
    """Items per chain evaluation (null: all of a process's items at once)."""
    opt_t: int | None = None
    """Optimise only the last ``opt_t`` steps (the first ones run once, without gradient)."""
    source_image: str | None = None
    """Edit this image: the chain starts from its exact (EDICT) inversion."""
    tied_latents: bool = True
    """EDICT's pair starts tied (x_T = y_T) after an ``opt_t`` prefix, and the update keeps it tied."""
    renormalize_latents: bool | None = None
    """Rescale the latents to the norm of x_T after each update (null: on for seed noise, off for an edit)."""
    first_image_only: bool = False
    """Score only x_0's image of the EDICT pair (the official ``optimize_first_edict_image_only``)."""
    drift_tolerance: float = 1e-3
    """The ``reversible`` gradient's largest relative drift of the rebuilt x_T before it falls back to checkpoint."""
    cuda_graphs: bool = False
    """Replay the UNet as CUDA graphs (GPU, UNet models only)."""

    @property
    def renormalize(self) -> bool:
        """Whether an update renormalises: ``renormalize_latents``, or by default on for seed noise, off for an edit."""
        return (self.source_image is None) if self.renormalize_latents is None else self.renormalize_latents

    def __post_init__(self):
        if self.sampler is not None:
            check_sampler(self.sampler, self.backprop, first_image_only=self.first_image_only)
        check_steps(self.steps, self.timestep_grid)
        check_mix_weight(self.mix_weight)
        check_guidance_scale(self.guidance_scale)
        scales = self.controlnet_scale if isinstance(self.controlnet_scale, (list, tuple)) else [self.controlnet_scale]
        check_finite(**{f"controlnet_scale[{i}]" if len(scales) > 1 else "controlnet_scale": s for i, s in enumerate(scales)},
                     drift_tolerance=self.drift_tolerance)
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or null, got {self.micro_batch}")
        ChainStart.check(self.steps, self.sampler, self.opt_t, self.source_image, self.renormalize_latents)


class Chain:
    """The chain of one run over ``items`` (all of them; ``bind`` gives a process its own), built once.

    ``size``: (height, width) in pixels, or None for the model's default; ``control_images``: a ControlNet's
    conditioning image for all items, or one per prompt in prompt order."""

    def __init__(self, config: ChainConfig, backbone: Backbone, items: list[Item],
                 size: tuple[int | None, int | None] = (None, None), control_images: list[str] | None = None):
        self.config, self.backbone, self.all_items = config, backbone, items
        name = config.sampler
        if name is None:  # the model's own: resolved once, checked as ChainConfig checks a named one
            name = backbone.default_sampler
            check_sampler(name, config.backprop, first_image_only=config.first_image_only)
            ChainStart.check_editable(name, config.source_image)
        self.sampler: Sampler = get_sampler(name)
        backbone.check_sampler(name, config.timestep_grid)  # e.g. ddim on a flow model (SD3 / FLUX): one line, now
        if config.cuda_graphs and not getattr(backbone, "supports_cuda_graphs", True):
            raise ValueError("cuda_graphs replays a UNet; this model is a flow transformer (SD3 / FLUX): drop cuda_graphs")
        if self.sampler.renoises and config.opt_t is not None:
            raise ValueError(f"opt_t needs a DDIM-like sampler (ddim or edict); the {name} sampler re-noises between "
                             "steps: drop opt_t or set sampler: ddim")
        self.start = ChainStart(config.steps, name, config.mix_weight, config.opt_t, config.source_image,
                                config.tied_latents, config.renormalize_latents)
        self.latent_shape = backbone.latent_shape(*size)
        f = backbone.vae_scale_factor
        self.image_size = (self.latent_shape[1] * f, self.latent_shape[2] * f)
        self.prompts = list(dict.fromkeys(it.prompt for it in items))
        self.control_images = self._load_control_images(control_images)
        self.items: list[Item] = []  # this process's items (``bind``)
        self.cond = self.uncond = None  # the bound items' prompt embeddings and the negative prompt's
        self._graphed = None  # the UNet's CUDA graphs (cuda_graphs)

    @property
    def name(self) -> str:
        """The sampler's registered name."""
        return self.sampler.name

    def _load_control_images(self, paths: list[str] | None) -> Tensor | None:
        """The ControlNet's conditioning image of each prompt (P, 3, H, W) in [0, 1], or None; K ControlNets:
        (P, K, 3, H, W), from K paths (one per net, for every prompt) or K per prompt (prompt by prompt)."""
        nets, scales = controlnet_count(self.backbone.controlnet), self.config.controlnet_scale
        if nets and isinstance(scales, (list, tuple)) and len(scales) != nets:
            raise ValueError(f"{len(scales)} controlnet_scale values for {nets} ControlNet{'s' if nets > 1 else ''}: "
                             "give one scale per ControlNet, or one number for all")
        if nets > 1:
            return self._load_several_control_images(paths, nets)
        if paths is None:
            if self.backbone.controlnet is not None:
                raise ValueError("the model has a ControlNet but no control_images were given: add model.control_images: "
                                 "[path] (one for all items, or one per prompt)")
            return None
        if self.backbone.controlnet is None:
            raise ValueError("control_images given but the model has no ControlNet: add model.controlnet: <dir or hub id>")
        if len(paths) not in (1, len(self.prompts)):
            raise ValueError(f"{len(paths)} control_images for {len(self.prompts)} prompts: give one image, or one per "
                             "prompt (in prompt order)")
        h, w = self.image_size
        images = torch.cat([load_control_image(p, (w, h)) for p in paths])
        return images.expand(len(self.prompts), -1, -1, -1) if len(paths) == 1 else images

    def _load_several_control_images(self, paths: list[str] | None, nets: int) -> Tensor:
        """Several ControlNets' images (P, K, 3, H, W): one per net (in the nets' order), or one per net per prompt."""
        p = len(self.prompts)
        if paths is None or len(paths) not in (nets, nets * p):
            got = 0 if paths is None else len(paths)
            raise ValueError(f"{got} control_images for {nets} ControlNets: give one image per ControlNet (in the "
                             f"controlnet list's order){f', or {nets * p}: one per ControlNet for each of the {p} prompts' if p > 1 else ''}")
        h, w = self.image_size
        images = torch.cat([load_control_image(q, (w, h)) for q in paths]).view(-1, nets, 3, h, w)
        return images.expand(p, -1, -1, -1, -1) if len(paths) == nets else images

    # -- this process's items ----------------------------------------------------------------------
    def bind(self, items: list[Item]) -> None:
        """Encode the prompts of this process's ``items``: one prompt at a time, so an item's embedding does not
        depend on which items share its process."""
        size = self.image_size
        self.items = list(items)
        self.cond = Conditioning.cat([self.backbone.encode_prompts([it.prompt], size) for it in self.items])
        self.uncond = self.backbone.encode_negative(self.config.negative_prompt, size)

    @property
    def bound(self) -> bool:
        return self.cond is not None

    def chunks(self) -> list[list[int]]:
        """The bound items in micro-batches (lists of indices)."""
        n, m = len(self.items), self.config.micro_batch or len(self.items)
        return [list(range(i, min(i + m, n))) for i in range(0, n, m)]

    # -- the schedule ------------------------------------------------------------------------------
    @functools.cached_property
    def full_schedule(self) -> Schedule:
        """The whole chain of ``steps`` steps on ``timestep_grid`` (built once: the chain reads it per step)."""
        return self.backbone.schedule(self.config.steps, self.config.timestep_grid, self.image_size)

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The chain that is optimised: all ``steps``, or the last ``opt_t`` of them."""
        return self.start.optimised(self.full_schedule)

    # -- the model ---------------------------------------------------------------------------------
    def _device(self, device) -> torch.device:
        return torch.device(device) if device is not None else next(self.backbone.parameters()).device

    def control(self, idx: list[int], device=None) -> Tensor | None:
        """The ControlNet image of each bound item ``idx`` (its prompt's), or None without a ControlNet."""
        if self.control_images is None:
            return None
        rows = [self.prompts.index(self.items[i].prompt) for i in idx]
        return self.control_images[rows].to(self._device(device))

    def denoiser(self, idx: list[int], guidance_scale: float | None = None, device=None):
        """eps(x_t, t) (or the velocity) of the bound items ``idx`` (their prompts), with classifier-free guidance."""
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        device = self._device(device)
        eps = self.backbone.denoiser(self.cond[idx], self.uncond, scale, control_image=self.control(idx, device),
                                     control_scale=self.config.controlnet_scale)
        if self.config.cuda_graphs and device.type == "cuda":
            if self._graphed is None:
                from .cuda_graphs import GraphedUNet

                self._graphed = GraphedUNet(self.backbone.unet, auto_prepare=True)
            eps.unet = self._graphed
        return eps

    def noises(self, idx: list[int], device=None) -> list[Tensor] | None:
        """The noise a re-noising sampler (LCM, SANA-Sprint's sCM) adds after each step but the last, per item from
        (seed, step) alone: fixed across iterations, so the chain is a deterministic function of x_T (None for the
        other samplers)."""
        if not self.sampler.renoises:
            return None
        items = [self.items[i] for i in idx]
        return [torch.stack([torch.randn(self.latent_shape, generator=step_generator(it, k, stream=4)) for it in items])
                .to(self._device(device)) for k in range(len(self.schedule) - 1)]

    # -- running it --------------------------------------------------------------------------------
    def initial(self, pair: Tensor) -> Tensor:
        """The latent pairs (N, P, C, h, w) the optimisation starts from: the seeds' pairs after editing's
        inversion or opt_t's prefix (``ChainStart.prepare``)."""
        every = list(range(len(self.items)))
        return self.start.prepare(pair, self.denoiser(every, device=pair.device), self.full_schedule, self.backbone,
                                  self.items)

    def evaluate(self, pair: Tensor, idx: list[int], loss_fn: LossFn, backward: bool) -> Evaluation:
        """One evaluation of the bound items ``idx`` from their latent pairs (n, P, C, h, w): chain, decode, losses;
        with ``backward``, d(sum of losses)/d(pair) accumulated into the leaf's ``.grad``."""
        c = self.config
        return evaluate(self.denoiser(idx, device=pair.device), pair[:, 0], self.schedule, self.backbone.decode,
                        loss_fn, sampler=self.name, backprop=c.backprop, mix_weight=c.mix_weight,
                        y=pair[:, 1] if self.start.pair_size == 2 else None, drift_tolerance=c.drift_tolerance,
                        backward=backward, first_image_only=c.first_image_only,
                        noises=self.noises(idx, pair.device))

    @torch.no_grad()
    def sample(self, pair: Tensor, idx: list[int], eps=None) -> Tensor:
        """The final latent (x_0, the first of a pair) of the bound items ``idx``, without gradient; ``eps``
        replaces their denoiser (e.g. a guided one, ``baselines``)."""
        eps = self.denoiser(idx, device=pair.device) if eps is None else eps
        y = pair[:, 1] if self.start.pair_size == 2 else None
        return self.sampler.sample(eps, pair[:, 0], self.schedule, y=y, mix_weight=self.config.mix_weight,
                                   noises=self.noises(idx, pair.device))[0]
