"""What a run cost, in the units the comparisons use: UNet evaluations, guidance evaluations, seconds."""
from __future__ import annotations

import json
import os
import time

from lightning.pytorch import Callback

from doodl_lightning.compute import UNetCounter
from doodl_lightning.io import atomic_write_text

from ._dist import output_dir


class ComputeMeter(Callback):
    """Per image (item): UNet evaluations (a classifier-free-guidance pair = 1) and how many of them were
    recorded for back-propagation (checkpoint recomputations included), guidance-module evaluations, and
    wall-clock seconds of the fit. Logged as ``compute/*`` at every step and written to ``compute.json``
    at the end, so DOODL, best-of-N and any other search are compared on one measure (on every run: the
    trainer defaults of ``cli.py``). Counts are this process's, divided by its items (ranks do the same work).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.dir = output_dir(trainer, None)
        self.active = next(cb for cb in trainer.callbacks if isinstance(cb, ComputeMeter)) is self

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.unet = UNetCounter(pl_module.backbone.unet)
        self.guidance_rows = 0
        self.hooks = [g.register_forward_hook(self._count_guidance) for g in pl_module.guidance]
        self.t0 = time.perf_counter()

    def _count_guidance(self, module, args, output) -> None:
        self.guidance_rows += int(output.shape[0]) if hasattr(output, "shape") and output.dim() else 1

    def summary(self, pl_module) -> dict:
        n = max(len(pl_module.local_items), 1)
        cfg_rows = pl_module.backbone.rows_per_evaluation(pl_module.hparams.guidance_scale)  # 2: CFG batched
        c = self.unet.per_image(n, cfg_rows)
        return {"unet_evaluations_per_image": c["unet_forward_per_image"],
                "unet_backprop_per_image": c["unet_backward_per_image"],
                "guidance_evaluations_per_image": round(self.guidance_rows / n, 2),
                "seconds": round(time.perf_counter() - self.t0, 2), "items_per_process": n}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.active:
            s = self.summary(pl_module)
            pl_module.log_dict({f"compute/{k}": float(v) for k, v in s.items() if k != "items_per_process"},
                               batch_size=len(pl_module.items))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        for h in self.hooks:
            h.remove()
        self.unet.remove()
        if trainer.global_rank == 0 and trainer.global_step > 0:
            self.last = {**self.summary(pl_module), "steps": trainer.global_step}
            atomic_write_text(os.path.join(self.dir, "compute.json"), json.dumps(self.last, indent=1) + "\n")
