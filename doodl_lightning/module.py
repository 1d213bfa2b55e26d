"""DOODL: the LightningModule that optimises the initial noise of each item end to end through the whole chain."""
from __future__ import annotations

from .optim import (DOODLOptimizer, PerItemAdam, PerItemSGD, check_alternative_update, check_update, masked_step)
from .data import step_generator
from .lightning_compat import attached_trainer
from .precision import amp_unscale_cancelled
from .search import NoiseSearch, NonFiniteLoss, default_model  # noqa: F401 - their public home is search.py

__all__ = ["DOODL", "NonFiniteLoss"]


class DOODL(NoiseSearch):
    """End-to-end optimisation of diffusion latents (DOODL, Wallace et al. 2023, arXiv 2303.13703).

    The defaults and option names are the official method's (salesforce/DOODL ``doodl.py``, ``gen()``). The items,
    model, chain and guidance keys are ``NoiseSearch``'s; DOODL adds the update:
        grad_scale, clip_grad_val, use_momentum, momentum, use_nesterov, perturb_grad_scale, tied_latents,
            optimize_first_edict_image_only, renormalize_latents: the official update (``DOODLOptimizer``);
            renormalisation is the callback ``callbacks.RenormalizeLatents``, which ``cli.py`` adds.
        update_rule: ``official`` (the above), or ``adam`` / ``sgd`` (torch's, on d loss / d latents, with ``lr``,
            per-item ``max_grad_norm`` clipping; sgd uses ``momentum`` and ``use_nesterov``): the variants a
            fair comparison tunes on validation.
    One training step: evaluate every item through the chain with the gradient, refuse a NaN, step the optimiser
    (items that early stopping stopped keep their latents), log. The official non-optimising baselines
    (``latent_traversal=False``) are ``baselines.guided_sampling``.
    """

    updates_latents = True

    def __init__(
        self,
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
        **kwargs,
    ):
        check_update(grad_scale, clip_grad_val, momentum, perturb_grad_scale)  # before any model loads
        check_alternative_update(update_rule, lr, max_grad_norm)
        super().__init__(**kwargs)

    def on_train_start(self) -> None:
        trainer = attached_trainer(self)
        if self.renormalizes and not any(getattr(cb, "renormalizes_latents", False) for cb in trainer.callbacks):
            raise ValueError("renormalize_latents is on but the trainer has no RenormalizeLatents callback (cli.py adds "
                             "it): add callbacks.RenormalizeLatents() to the Trainer's callbacks, or set "
                             "model.renormalize_latents: false")

    def configure_optimizers(self):
        return self.update_of(self.latents, lambda r, k: step_generator(self.local_items[r], k, stream=2))

    def update_of(self, latents, noise_generator):
        """The configured update of ``latents`` (rows of pairs); ``noise_generator(row, k)``: the official
        perturbation's generator of a row at update k (from a seed and k alone, so resumes and ranks repeat it)."""
        hp = self.hparams
        if hp.update_rule == "adam":
            return PerItemAdam([latents], lr=hp.lr, max_grad_norm=hp.max_grad_norm, tied_latents=hp.tied_latents)
        if hp.update_rule == "sgd":
            return PerItemSGD([latents], lr=hp.lr, momentum=hp.momentum, nesterov=hp.use_nesterov,
                              max_grad_norm=hp.max_grad_norm, tied_latents=hp.tied_latents)
        opt = DOODLOptimizer([latents], grad_scale=hp.grad_scale, clip_grad_val=hp.clip_grad_val,
                             use_momentum=hp.use_momentum, momentum=hp.momentum, use_nesterov=hp.use_nesterov,
                             perturb_grad_scale=hp.perturb_grad_scale, tied_latents=hp.tied_latents)
        opt.noise_generator = noise_generator
        return opt

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        ev = self.evaluate_items(backward=True)
        grad = self.latents.grad
        self.refuse_non_finite(ev, grad)  # before the update: the latents stay the last ones with a finite loss
        self.stepped = self.active.clone()  # the rows this update changes (and RenormalizeLatents rescales)
        with amp_unscale_cancelled(grad, getattr(self.trainer.precision_plugin, "scaler", None)):
            masked_step(opt, self.latents, self.stepped)
        self.last = ev
        self.log_step(ev, grad)
        return None
