"""``ShapesModule``: the training-loop plumbing every shapes-world LightningModule shares. Their typed
``__init__`` arguments are the YAML keys of ``experiments/shapes/*.yaml``. Data are rendered on the module's
device inside ``training_step`` from a per-batch seed (see ``data.SeedDataset``), so there is no data loading
cost. Every module exports its weights when training ends (``export_dir``; see ``export``)."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from . import data as D

__all__ = ["ShapesModule"]


class ShapesModule(L.LightningModule):
    """Common training loop plumbing: seed-per-batch data, a progress-based warmup + cosine learning rate
    (progress = the larger of step / max_steps and elapsed / max_time, so a time-limited run still anneals),
    timing and export at the end of training."""

    data_what = "procedural shapes (doodl_lightning.shapes.data), rendered fresh every step"

    def __init__(self, lr: float = 1e-3, batch_size: int = 64, data_seed: int = 0, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.05, weight_decay: float = 0.0, export_dir: Optional[str] = None):
        super().__init__()
        self._t0: float | None = None

    # -- data --------------------------------------------------------------------------------------------
    def train_dataloader(self):
        return DataLoader(D.SeedDataset(10**9, self.hparams.data_seed), batch_size=None, shuffle=False)

    # -- optimisation -------------------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _progress(self) -> float:
        t = self.trainer
        p = 0.0
        if t.max_steps and t.max_steps > 0:
            p = self.global_step / t.max_steps
        max_time = None
        for cb in t.callbacks:
            if type(cb).__name__ == "Timer" and getattr(cb, "_duration", None):
                max_time = cb._duration
        if max_time and self._t0 is not None:
            p = max(p, (time.time() - self._t0) / max_time)
        return min(max(p, 0.0), 1.0)

    def on_train_batch_start(self, batch, batch_idx):
        h = self.hparams
        warm = min(1.0, (self.global_step + 1) / max(1, h.warmup_steps))
        cos = h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self._progress()))
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] = h.lr * warm * cos
        self.log("train/lr", h.lr * warm * cos, prog_bar=False)

    def on_train_start(self):
        self._t0 = time.time()

    def on_train_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            info = {
                "data": self.data_what,
                "command": " ".join(["python -m doodl_lightning.shapes.train"] + sys.argv[1:])
                if "shapes.train" not in " ".join(sys.argv[:1]) else " ".join(sys.argv),
                "steps": self.global_step,
                "batch size": self.hparams.batch_size,
                "wall time": f"{time.time() - (self._t0 or time.time()):.0f} s",
                "device": torch.cuda.get_device_name() if self.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            }
            out = Path(self.hparams.export_dir)
            out.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                self.export(out, info)

    def export(self, out: Path, info: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, seed, n=None, caption=None, **kw):
        n = n or self.hparams.batch_size
        return D.make_batch(int(seed), n, self.device, caption=caption, **kw)
