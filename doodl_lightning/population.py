"""Population DOODL: several noises per item optimised side by side, the worst restarted near the best."""
from __future__ import annotations

import torch
from torch import nn

from .best_of_n import candidate_noise
from .checks import check_counts, check_fresh_noise
from .data import step_generator
from .module import DOODL
from .objective import Evaluation, concat_evaluations, reward_loss
from .optim import masked_step
from .precision import amp_unscale_cancelled
from .zero_order import check_radius, neighbour


class PopulationDOODL(DOODL):
    """DOODL on ``members`` noises per item at once (member 0 is the item's seed noise, member m best-of-N's
    candidate m, ``best_of_n.candidate_noise``), each with its own DOODL update; every ``exchange_every`` updates
    the member of each item with the highest reward loss is replaced by a neighbour of the best one
    (``zero_order.neighbour`` at ``radius``: a point near the best, still standard noise) and its momentum reset.

    Why: one DOODL trajectory stays in the basin it starts in, and the gradient steps there can fool the guide; a
    population starts in several basins (selection, as best-of-N), spends gradient steps on all of them, and moves
    effort from the worst basin to the neighbourhood of the best (the evolutionary "replace the worst" scheme of
    population-based training, Jaderberg et al. 2017, with DOODL as the inner optimiser).

    Each step evaluates every member (one chain with its back-propagation each) and shows, per item, its best
    member's image of that step (``latents``, the evaluation logged and written): the final evaluation re-samples
    the best member of the last step. Compute per item and step: ``members`` x DOODL's.
    """

    def __init__(self, members: int = 4, exchange_every: int = 2, radius: float = 0.5, **kwargs):
        check_counts(members=members, exchange_every=exchange_every)
        check_radius(radius)
        check_fresh_noise(kwargs, "population DOODL")
        super().__init__(**kwargs)

    def setup(self, stage: str) -> None:
        fresh = not self.local_items
        super().setup(stage)
        if not fresh:
            return
        m, pair = self.hparams.members, self.chain.start.pair_size
        z = torch.stack([candidate_noise(it, j, self.latent_shape) for it in self.local_items for j in range(m)])
        self.population = nn.Parameter(z.unsqueeze(1).repeat(1, pair, 1, 1, 1))  # (N M, P, C, h, w), item-major
        self.register_buffer("population_norm", z.double().flatten(1).norm(dim=1))

    def rows(self, idx: list[int]) -> tuple[list[int], list[int]]:
        """(the population rows of local items ``idx``, the item index of each row)."""
        m = self.hparams.members
        return [i * m + j for i in idx for j in range(m)], [i for i in idx for _ in range(m)]

    def renormalization(self):
        return self.population, self.population_norm, self.stepped.repeat_interleave(self.hparams.members)

    def configure_optimizers(self):
        m = self.hparams.members
        # member j of item r: its own perturbation stream (j = 0 draws what DOODL's item r draws)
        return self.update_of(self.population,
                              lambda row, k: step_generator(self.local_items[row // m], k * m + row % m, stream=2))

    def evaluate_population(self, step: int) -> tuple[Evaluation, Evaluation]:
        """Every member, with the gradient into ``population``: (the members' evaluation (N M rows), each item's
        best member's, with its held-out metrics)."""
        outs, best = [], []
        m = self.hparams.members
        for idx in self.chain.chunks():
            pos, items = self.rows(idx)
            ev = self.chain.evaluate(self.population[pos], items, self.loss_fn(items, step), True)
            ev.reward = reward_loss(self.guidance, ev.total, ev.terms)
            pick = ev.reward.view(len(idx), m).argmin(1) + torch.arange(len(idx), device=ev.reward.device) * m
            b = Evaluation(ev.total[pick], {k: v[pick] for k, v in ev.terms.items()}, ev.images[pick], ev.info,
                           reward=ev.reward[pick])
            b.metrics = self.metric_values(idx, b.images)
            b.info["rows"] = [pos[int(p)] for p in pick]
            outs.append(ev)
            best.append(b)
        members = concat_evaluations(outs)
        members.reward = torch.cat([o.reward for o in outs])
        shown = concat_evaluations(best)
        shown.info["rows"] = [r for b in best for r in b.info["rows"]]
        return members, shown

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        k, m = self.global_step, self.hparams.members
        members, shown = self.evaluate_population(k)
        grad = self.population.grad
        n = len(self.local_items)
        # a NaN in any member stops the run, named by its item
        self.refuse_non_finite(Evaluation(members.total.view(n, m).sum(1), {}, shown.images),
                               grad.reshape(n, -1))
        with torch.no_grad():  # what this step shows: each item's best member, before the update
            self.latents.copy_(self.population.detach()[shown.info["rows"]])
        self.stepped = self.active.clone()
        with amp_unscale_cancelled(grad, getattr(self.trainer.precision_plugin, "scaler", None)):
            masked_step(opt, self.population, self.stepped.repeat_interleave(m))
        if m > 1 and (k + 1) % self.hparams.exchange_every == 0:
            self.exchange(opt, members.reward.detach().view(n, m), k)
        self.member_losses = members.reward.detach().view(n, m)  # (items, members) of this step, before the update
        self.last = shown
        self.log_step(shown, None)
        return None

    @torch.no_grad()
    def exchange(self, opt, reward, k: int) -> None:
        """Each active item's worst member (by this step's reward loss) restarts near its best one (after the
        update); the restarted member's optimiser state (momentum, Adam's moments) is cleared."""
        m = self.hparams.members
        state = opt.state.get(self.population, {})
        for j, it in enumerate(self.local_items):
            if not bool(self.active[j]):
                continue
            worst, best = int(reward[j].argmax()), int(reward[j].argmin())
            if worst == best:
                continue
            d = torch.randn(self.latent_shape, generator=step_generator(it, k, stream=7)).to(self.population)
            z = neighbour(self.population[j * m + best, 0], d, self.hparams.radius)
            self.population[j * m + worst] = z.unsqueeze(0).expand_as(self.population[j * m + worst])
            self.population_norm[j * m + worst] = z.double().flatten().norm()
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(self.population):
                    v[j * m + worst] = 0
