"""Search then refine: best-of-K to find a good basin, then DOODL from the winner."""
from __future__ import annotations

import torch

from .best_of_n import candidate_noise
from .checks import check_counts, check_fresh_noise
from .module import DOODL


class SearchThenRefine(DOODL):
    """Best-of-K, then DOODL from the winning noise: selection finds an image the guide likes among natural
    samples (which the evaluator tends to agree with), and gradient steps then improve it locally (which alone
    tend to fool the guide from a poor start). A hybrid in the spirit of ReNO's best-of-N initialisation.

    Steps 0 .. ``candidates`` - 1 evaluate best-of-N's candidates (``best_of_n.candidate_noise``; candidate 0 is
    the item's seed noise) without gradient and keep the lowest reward loss; from step ``candidates`` on, every
    step is a DOODL update (DOODL's keys: ``update_rule``, ``grad_scale``, ...) from the kept noise, renormalised to
    that noise's norm. ``trainer.max_steps`` = K + the DOODL iterations. Compute per item: K chains without
    gradient, then per DOODL iteration one chain with its back-propagation, as DOODL.
    """

    def __init__(self, candidates: int = 8, **kwargs):
        check_counts(candidates=candidates)
        check_fresh_noise(kwargs, "search then refine")
        super().__init__(**kwargs)

    def setup(self, stage: str) -> None:
        fresh = not self.local_items
        super().setup(stage)
        if fresh:  # the kept candidate's reward loss (checkpointed: a resume mid-search keeps its best)
            self.register_buffer("best_loss", torch.full((len(self.local_items),), float("inf"), dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        k = self.global_step
        if k >= self.hparams.candidates:
            return super().training_step(batch, batch_idx)  # refine: a DOODL update
        z = torch.stack([candidate_noise(it, k, self.latent_shape) for it in self.local_items])
        z = z.unsqueeze(1).repeat(1, self.chain.start.pair_size, 1, 1, 1).to(self.latents)
        with torch.no_grad():
            ev = self.evaluate_items(backward=False, latents=z, step=0)  # one set of cutouts for every candidate
            self.refuse_non_finite(ev)
            loss = ev.reward.detach().to(self.best_loss)
            better = self.active & (loss < self.best_loss)
            self.latents[better] = z[better]
            self.best_loss[better] = loss[better]
            # DOODL renormalises to the norm of the noise it starts from: the winner's
            self.initial_norm[better] = z[better][:, 0].double().flatten(1).norm(dim=1).to(self.initial_norm)
        # no update: stepping without a gradient only advances the step counter (the renormalisation that follows
        # rescales each kept noise to its own norm)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.stepped = self.active.clone()
        opt.step()
        self.last = ev
        self.log_step(ev, None)
        return None
