"""Latent renormalisation after every optimiser step (the official DOODL ``renormalize_latents``)."""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from doodl_lightning.optim import renormalize_latents


class RenormalizeLatents(Callback):
    """Rescale each stepped item's latents to the norm of its x_T after every optimiser step, whatever the optimiser.

    Gaussian noise of dimension d lives near the sphere of radius sqrt(d); off it the diffusion model stops making
    images, so the official update puts the latents back on it after each step, after the perturbation and the
    pair's tying (both inside ``DOODLOptimizer.step``). Here a step post-hook of the module's optimiser (torch's
    ``Optimizer.register_step_post_hook``) does it at exactly that point, for the official update and for
    ``adam`` / ``sgd`` alike; the rows are the module's ``stepped`` items (those early stopping stopped stay
    bit-identical). Acts on modules whose ``renormalizes`` is true (DOODL with ``renormalize_latents`` on, the
    default for seed noise); ``cli.py`` adds it to every fit, and DOODL refuses a fit that needs it without it."""

    renormalizes_latents = True  # what the module looks for (it never imports callbacks/)

    def __init__(self):
        self._handles = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._remove()
        if not getattr(pl_module, "renormalizes", False):
            return
        self._handles = [self.attach(pl_module, optimizer) for optimizer in trainer.optimizers]

    @classmethod
    def attach(cls, pl_module, optimizer):
        """Renormalise ``pl_module``'s stepped latents after every ``optimizer.step()`` (outside a Trainer too, e.g. a
        benchmark stepping the optimiser itself); the hook's handle (``.remove()`` detaches it)."""
        return optimizer.register_step_post_hook(lambda *_: cls.renormalize(pl_module))

    @staticmethod
    def renormalize(pl_module) -> None:
        """Rescale the module's stepped rows to their items' norms of x_T (``optim.renormalize_latents``)."""
        renormalize_latents(*pl_module.renormalization())

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove()
