"""Best-of-N search: the practitioner's baseline for noise optimisation, over the same items, guidance and outputs."""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_counts, check_fresh_noise
from .data import Item, initial_noise, step_generator
from .selection import SelectionSearch


def candidate_noise(item: Item, k: int, shape: tuple[int, ...]) -> Tensor:
    """x_T of candidate ``k`` of an item: candidate 0 is the item's own seed noise (so best-of-1 is the unguided
    sample DOODL starts from); the others come from (seed, k) alone, so any rank, batch or resume draws them."""
    if k == 0:
        return initial_noise(item, shape)
    return torch.randn(shape, generator=step_generator(item, k, stream=3), dtype=torch.float32)


class BestOfN(SelectionSearch):
    """Sample ``candidates`` initial noises per item, run the chain on each without gradient, keep the one with
    the lowest guidance loss (of the reward terms: a regulariser is left out, ``Evaluation.reward``). One training
    step = one candidate for every item, so ``results.jsonl`` (best loss, best step = the winning candidate), the
    images, TensorBoard and early stopping work as for DOODL.

    YAML: ``model: {class_path: doodl_lightning.best_of_n.BestOfN, init_args: {candidates: 16, ...}}`` with
    ``NoiseSearch``'s keys for items, model, sampler, steps and guidance (no update keys: nothing is optimised). The run ends
    after ``candidates`` steps (``trainer.max_steps`` must allow them). Every candidate is scored with the
    same cutouts (generator stream of step 0), so candidates are compared on one measure.
    Compute per item: ``candidates`` chains (steps UNet evaluations each, none back-propagated) and
    ``candidates`` guidance evaluations, plus the final evaluation of the kept noise.
    """

    def __init__(self, candidates: int = 16, **kwargs):
        check_counts(candidates=candidates)
        check_fresh_noise(kwargs, "best-of-N")
        super().__init__(**kwargs)
        self.candidates = self.rounds = candidates

    def candidate(self, k: int) -> Tensor:
        """Candidate ``k``'s latent pairs (N, P, C, h, w) of the local items, on the module's device."""
        z = torch.stack([candidate_noise(it, k, self.latent_shape) for it in self.local_items])
        return z.unsqueeze(1).repeat(1, self.chain.start.pair_size, 1, 1, 1).to(self.latents)

    def training_step(self, batch, batch_idx):
        z = self.candidate(self.global_step)
        with torch.no_grad():
            ev = self.evaluate_items(backward=False, latents=z)
        self.keep_better(ev.reward, z)
        self.finish_step(ev)
        return None
