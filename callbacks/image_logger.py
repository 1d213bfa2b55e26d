"""Images of every item to TensorBoard and PNG, and a contact sheet of the whole trajectory."""
from __future__ import annotations

import os

import torch
import torchvision
from lightning.pytorch import Callback
from PIL import Image, ImageDraw

from doodl_lightning.io import check_writable, save_png, to_pil

from ._dist import gather_objects, output_dir


class ImageLogger(Callback):
    """Every ``every_n_steps`` steps (and at the end): a TensorBoard grid of all items, one PNG per
    item (``images/item007/step0010.png``) and, at the end, ``contact_sheet.png``: rows = items
    (captioned prompt | seed), columns = logged steps, so the optimisation is visible at a glance.
    """

    def __init__(self, every_n_steps: int = 10, dirpath: str | None = None, thumbnail: int | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.dirpath, self.thumbnail = every_n_steps, dirpath, thumbnail
        self.logged_steps: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.dir = check_writable(output_dir(trainer, self.dirpath))

    def _path(self, index: int, step: int) -> str:
        return os.path.join(self.dir, "images", f"item{index:03d}", f"step{step:04d}.png")

    def _log(self, trainer, pl_module, images: torch.Tensor, step: int) -> None:
        for j, item in enumerate(pl_module.local_items):
            save_png(self._path(item.index, step), images[j])
        parts = gather_objects([(it.index, images[j].cpu()) for j, it in enumerate(pl_module.local_items)])
        if trainer.global_rank != 0:
            return
        if step not in self.logged_steps:
            self.logged_steps.append(step)
        ordered = [img for _, img in sorted((p for part in parts for p in part), key=lambda p: p[0])]
        grid = torchvision.utils.make_grid(torch.stack(ordered).clamp(-1, 1) * 0.5 + 0.5, nrow=min(8, len(ordered)))
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("images/all_items", grid, global_step=step)
                if step == 0 or not hasattr(self, "_captioned"):
                    captions = "\n".join(f"{i}: {it.prompt} | seed {it.seed}  " for i, it in enumerate(pl_module.items))
                    exp.add_text("images/captions", captions, global_step=step)
                    self._captioned = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        if step % self.every_n_steps == 0:
            self._log(trainer, pl_module, pl_module.last.images, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.logged_steps and trainer.global_rank == 0 and trainer.global_step == 0:
            return
        self._log(trainer, pl_module, pl_module.final_evaluation().images, trainer.global_step)
        if trainer.global_rank == 0:
            self.contact_sheet(pl_module.items)

    def contact_sheet(self, items) -> str:
        """rows = items, columns = logged steps; built from the PNGs on disk."""
        # a resumed run logs into a new folder: the sheet shows the steps whose images are here
        steps = [s for s in sorted(self.logged_steps) if os.path.exists(self._path(items[0].index, s))]
        if not steps:
            return ""
        w, h = Image.open(self._path(items[0].index, steps[0])).size
        if self.thumbnail is not None:
            w = h = self.thumbnail
        elif w < 96:  # tiny worlds: upscale so the sheet is legible
            w, h = 96, 96 * h // w
        cap = 14
        sheet = Image.new("RGB", (w * len(steps), (h + cap) * len(items)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, item in enumerate(items):
            y = r * (h + cap)
            draw.text((2, y + 1), f"{item.prompt} | seed {item.seed}", fill="black")
            for c, step in enumerate(steps):
                path = self._path(item.index, step)
                if os.path.exists(path):
                    sheet.paste(Image.open(path).convert("RGB").resize((w, h), Image.NEAREST), (c * w, y + cap))
        out = os.path.join(self.dir, "contact_sheet.png")
        save_png(out, sheet)
        return out

    def state_dict(self) -> dict:
        return {"logged_steps": self.logged_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.logged_steps = list(state_dict["logged_steps"])
