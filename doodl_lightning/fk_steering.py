"""FK steering as a search method: particles resampled on the guide's rewards along a stochastic DDIM chain."""
from __future__ import annotations

import torch
from torch import Tensor

from .best_of_n import candidate_noise
from .checks import check_counts, check_fresh_noise
from .data import step_generator
from .objective import Evaluation, concat_evaluations, reward_loss
from .particles import FKResampler, check_fk, fk_sample, resampling_steps
from .selection import SelectionSearch


class FKSteering(SelectionSearch):
    """Feynman-Kac steering (Singhal et al. 2025, arXiv 2501.06848; reference code zacharyhorvitz/Fk-Diffusion-Steering):
    ``particles`` particles per item run a DDIM chain with stochasticity ``eta``; after the steps of
    ``particles.resampling_steps(steps, resample_every, resample_start, resample_end)`` each particle's predicted
    clean image is scored by the guidance (reward = minus the reward loss) and the particles of an item are
    resampled with the ``potential`` of those rewards at temperature ``lmbda`` (``particles.FKResampler``). At the
    end every final particle's image is scored and the best is the run's result. Gradient-free: any guide steers it.

    One training step = one FK run for every item (run r starts from best-of-N's candidates r k ... r k + k - 1,
    ``best_of_n.candidate_noise``: run 0's particle 0 is the item's own seed noise); with ``runs`` > 1 each item keeps
    the best result over the runs, as best-of-N keeps its best candidate. The kept result is the final latent
    (``kept``, checkpointed: the chain is stochastic, so x_T alone does not give the image back); ``latents`` holds
    its ancestor's x_T. Defaults are the reference's text-to-image launcher's (eta 1, ``diff``, lambda 10, resampling
    every 5 steps from step 5); lambda is on the scale of the guide's loss and is a knob to choose on validation.

    Compute per item and run: ``particles`` x ``steps`` UNet evaluations (none back-propagated); ``particles``
    guidance evaluations (and VAE decodes) at each resampling step and once at the end.
    """

    def __init__(self, particles: int = 4, potential: str = "diff", lmbda: float = 10.0, eta: float = 1.0,
                 resample_every: int = 5, resample_start: int = 5, resample_end: int | None = None,
                 adaptive_resampling: bool = False, runs: int = 1, **kwargs):
        check_fk(particles, potential, lmbda, eta, resample_every)
        check_counts(runs=runs)
        check_fresh_noise(kwargs, "FK steering")
        if kwargs.get("sampler") not in (None, "ddim"):
            raise ValueError(f"FK steering runs a stochastic DDIM chain (eta): set model.sampler: ddim, not "
                             f"{kwargs['sampler']!r}")
        kwargs["sampler"] = "ddim"
        super().__init__(**kwargs)  # (written so: jsonargparse reads the keys of ``**kwargs`` from this call)
        if self.chain.start.pair_size != 1:
            raise ValueError("FK steering needs a one-latent DDIM chain")
        self.rounds = runs
        self.at = resampling_steps(len(self.chain.schedule), resample_every, resample_start, resample_end)

    @property
    def rounds_key(self) -> str:
        return "model.runs"

    def setup(self, stage: str) -> None:
        fresh = not self.local_items
        super().setup(stage)
        if fresh:  # the kept result's final latent
            self.register_buffer("kept", torch.zeros(len(self.local_items), *self.latent_shape))

    def reward(self, rows: list[int]):
        """x̂0 latents (one per row, rows = local item indices) -> rewards (higher is better): minus the reward
        loss of their decoded images, with one set of cutouts per item for the whole run."""
        loss_fn = self.loss_fn(rows, 0)

        def fn(x0: Tensor) -> Tensor:
            total, terms = loss_fn(self.backbone.decode(x0))
            return -reward_loss(self.guidance, total, terms)

        return fn

    def score(self, latents: Tensor, rows: list[int]) -> Evaluation:
        """Decode final latents (one per row) and evaluate the guidance and held-out metrics of their images."""
        images = self.backbone.decode(latents)
        total, terms = self.loss_fn(rows, 0)(images)
        ev = Evaluation(total.detach(), {k: v.detach() for k, v in terms.items()}, images.detach())
        ev.reward = reward_loss(self.guidance, ev.total, ev.terms)
        ev.metrics = self.metric_values(rows, ev.images)
        return ev

    @torch.no_grad()
    def run(self, r: int, idx: list[int]) -> tuple[Evaluation, Tensor, Tensor]:
        """FK run ``r`` of the local items ``idx``: (evaluation of each item's best final particle, its final
        latent, its ancestor's x_T)."""
        hp, k, items = self.hparams, self.hparams.particles, [self.local_items[i] for i in idx]
        rows = [i for i in idx for _ in range(k)]
        x_T = torch.stack([candidate_noise(it, r * k + j, self.latent_shape) for it in items for j in range(k)])
        x_T = x_T.to(self.latents)
        noise_gens = [step_generator(it, r, stream=5) for it in items]  # the chain's noise, per item and run

        def noise(i: int) -> Tensor:
            return torch.cat([torch.randn(k, *self.latent_shape, generator=g) for g in noise_gens]).to(x_T)

        resampler = FKResampler(len(idx), k, hp.potential, hp.lmbda, len(self.chain.schedule), hp.adaptive_resampling)
        final, ancestor = fk_sample(self.chain.denoiser(rows, device=x_T.device), x_T, self.chain.schedule,
                                    self.reward(rows), resampler, self.at, hp.eta, noise,
                                    [step_generator(it, r, stream=6) for it in items])
        ev = self.score(final, rows)
        best = ev.reward.view(len(idx), k).argmin(dim=1).cpu()  # the best final particle of each item
        pick = torch.arange(len(idx)) * k + best
        chosen = Evaluation(ev.total[pick], {n: v[pick] for n, v in ev.terms.items()}, ev.images[pick],
                            metrics={n: v[pick] for n, v in ev.metrics.items()}, reward=ev.reward[pick])
        start = x_T.view(len(idx), k, *x_T.shape[1:])[torch.arange(len(idx)), ancestor[torch.arange(len(idx)), best]]
        return chosen, final[pick], start

    def training_step(self, batch, batch_idx):
        r = self.global_step
        outs, finals, starts = [], [], []
        for idx in self.chain.chunks():
            ev, final, start = self.run(r, idx)
            outs.append(ev)
            finals.append(final)
            starts.append(start)
        ev = concat_evaluations(outs)
        self.refuse_non_finite(ev)
        better = self.keep_better(ev.reward, torch.cat(starts).unsqueeze(1))
        self.kept[better] = torch.cat(finals)[better].to(self.kept)
        self.finish_step(ev)
        return None

    def final_evaluation(self) -> Evaluation:
        """The kept results (each item's best final latent over the runs), decoded and scored; cached per step."""
        if self._final is None or self._final[0] != self.global_step:
            with torch.no_grad():
                ev = concat_evaluations([self.score(self.kept[idx], idx) for idx in self.chain.chunks()])
            self.refuse_non_finite(ev, final=True)
            self._final = (self.global_step, ev)
        return self._final[1]
