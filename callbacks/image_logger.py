"""Images of every item to TensorBoard and PNG, and a contact sheet of the whole trajectory."""
from __future__ import annotations

import math
import os

import torch
from lightning.pytorch import Callback
from PIL import Image, ImageDraw, ImageFont

from doodl_lightning.console import guidance_title, item_labels
from doodl_lightning.io import check_writable, link_or_copy, save_png, to_pil

from ._dist import gather_objects, output_dir

GUTTER = 6                 # pixels between the cells of a grid or sheet
INK, FAINT, BEST = (0, 0, 0), (90, 90, 90), (0, 120, 0)


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (the fixed 11-px bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: float, fnt) -> str:
    """``text`` cut with '…' so it fits in ``width`` pixels."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap_text(draw: ImageDraw.ImageDraw, text: str, width: float, fnt, max_lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines of ``width`` pixels (the last one cut)."""
    lines, words = [], text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=fnt) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # what did not fit goes, cut, on the last line
        lines[-1] = fit_text(draw, f"{lines[-1]} {' '.join(words)}", width - 1, fnt) if lines else ""
    return [fit_text(draw, line, width, fnt) for line in lines]


def upscale_factor(size: tuple[int, int], min_side: int) -> int:
    """The integer factor that brings the smaller side of ``size`` to at least ``min_side`` (1: already there).
    Integer and nearest-neighbour: every latent pixel stays a sharp block, nothing is invented."""
    return max(1, math.ceil(min_side / max(1, min(size))))


def upscaled(img: Image.Image, min_side: int) -> Image.Image:
    k = upscale_factor(img.size, min_side)
    return img if k == 1 else img.resize((img.width * k, img.height * k), Image.NEAREST)


def captioned(img: Image.Image, lines: list[str], fnt, line_height: int) -> Image.Image:
    """``img`` with ``lines`` of text in a white strip below it."""
    out = Image.new("RGB", (img.width, img.height + line_height * len(lines) + 4), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((2, img.height + 2 + k * line_height), fit_text(draw, line, img.width - 4, fnt), fill=INK, font=fnt)
    return out


def grid(cells: list[Image.Image], ncol: int, gutter: int = GUTTER) -> Image.Image:
    """Same-size cells in rows of ``ncol``, ``gutter`` pixels apart (light grey, so white images keep an edge)."""
    w, h = cells[0].size
    nrow = math.ceil(len(cells) / ncol)
    out = Image.new("RGB", (ncol * w + (ncol + 1) * gutter, nrow * h + (nrow + 1) * gutter), (225, 225, 225))
    for k, cell in enumerate(cells):
        out.paste(cell, (gutter + (k % ncol) * (w + gutter), gutter + (k // ncol) * (h + gutter)))
    return out


def pil_to_chw(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W), what ``SummaryWriter.add_image`` takes without rescaling."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


class ImageLogger(Callback):
    """Every ``every_n_steps`` steps (and at the end):

    - one PNG per item at the model's native size (``images/item007/step0010.png``) and, when that is smaller
      than ``min_side`` pixels, a nearest-neighbour upscaled view (``images/item007/upscaled/step0010.png``);
    - TensorBoard: ``images/all_items``, a grid of every item captioned with prompt | seed and its loss, and
      one image series per item (``images/<prompt> | seed <seed>``) so TensorBoard's step slider runs through
      one item's trajectory; small images upscaled to at least ``min_side`` pixels;
    - at the end, ``contact_sheet.png``: the guidance target in the title, one row per item (prompt | seed at
      the left), one column per logged step (labelled; the last is the final evaluation), each cell with its
      loss, the row's best in green: its lowest loss or, with a regulariser, its lowest reward loss, the rule
      ``results.jsonl``'s best follows (and under it one line per held-out metric, ``value name``, when the run has
      any).

    ``thumbnail``: the contact sheet's cell side (default: the native size, upscaled to ``min_side``).
    ``per_item``: log the per-item TensorBoard series (off for very many items: one series each).
    """

    def __init__(self, every_n_steps: int = 10, dirpath: str | None = None, thumbnail: int | None = None,
                 min_side: int = 128, per_item: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {min_side}")
        self.every_n_steps, self.dirpath, self.thumbnail = every_n_steps, dirpath, thumbnail
        self.min_side, self.per_item = min_side, per_item
        self.logged_steps: list[int] = []
        self.losses: dict[int, dict[int, float]] = {}   # step -> item index -> loss (rank 0; the sheet's cells)
        # step -> item index -> reward loss, only when a regulariser makes it differ from the loss (rank 0): the
        # green cell goes by it, as the best iteration does (``Evaluation.reward``)
        self.rewards: dict[int, dict[int, float]] = {}
        self.metrics: dict[int, dict[int, dict[str, float]]] = {}  # step -> item index -> held-out metrics (rank 0)
        self.final_step: int | None = None
        self.resumed_from: str | None = None  # the run directory of the checkpoint this run resumed

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.dir = check_writable(output_dir(trainer, self.dirpath))

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run writes a new folder: rank 0, which alone keeps the logged steps (the output directory is
        # shared), brings the images of the steps logged before the resume here (hard links), so the folder is
        # self-contained and its contact sheet shows the whole run
        if self.resumed_from is None or os.path.realpath(self.resumed_from) == os.path.realpath(self.dir):
            return
        for it in pl_module.items:
            for step in self.logged_steps:
                for view in ("", "upscaled"):
                    src, dst = self._path(it.index, step, view, self.resumed_from), self._path(it.index, step, view)
                    if os.path.isfile(src) and not os.path.exists(dst):
                        link_or_copy(src, dst)

    def _path(self, index: int, step: int, view: str = "", root: str | None = None) -> str:
        return os.path.join(root or self.dir, "images", f"item{index:03d}", view, f"step{step:04d}.png")

    @staticmethod
    def metric_lines(metrics: dict[str, float] | None) -> list[str]:
        """Held-out metrics, one ``0.1234 name`` line each (value first: a cut keeps it)."""
        return [f"{v:.4f} {k}" for k, v in (metrics or {}).items()]

    def _log(self, trainer, pl_module, images: torch.Tensor, losses: torch.Tensor, step: int,
             metrics: dict[str, torch.Tensor] | None = None, rewards: torch.Tensor | None = None) -> None:
        for j, item in enumerate(pl_module.local_items):
            native = to_pil(images[j])
            save_png(self._path(item.index, step), native)
            if upscale_factor(native.size, self.min_side) > 1:  # 32 px is unreadable in an image viewer
                save_png(self._path(item.index, step, "upscaled"), upscaled(native, self.min_side))
        metrics = metrics or {}
        parts = gather_objects([(it.index, images[j].cpu(), float(losses[j]), {k: float(v[j]) for k, v in metrics.items()},
                                 None if rewards is None else float(rewards[j]))
                                for j, it in enumerate(pl_module.local_items)])
        if trainer.global_rank != 0:
            return
        if step not in self.logged_steps:
            self.logged_steps.append(step)
        ordered = sorted((p for part in parts for p in part), key=lambda p: p[0])
        self.losses[step] = {index: loss for index, _, loss, _, _ in ordered}
        if metrics:
            self.metrics[step] = {index: values for index, _, _, values, _ in ordered}
        if rewards is not None:
            self.rewards[step] = {index: reward for index, _, _, _, reward in ordered}
        experiments = [exp for exp in (getattr(lg, "experiment", None) for lg in trainer.loggers)
                       if hasattr(exp, "add_image")]
        if not experiments:
            return
        labels = dict(zip((it.index for it in pl_module.items), item_labels(pl_module.items)))
        fnt = font(12)
        cells = [captioned(upscaled(to_pil(img), self.min_side),
                           [labels[index], f"loss {loss:.4f} · step {step}"] + self.metric_lines(values),
                           fnt, 14)
                 for index, img, loss, values, _ in ordered]
        all_items = grid(cells, ncol=min(8, len(cells)))
        for exp in experiments:
            exp.add_image("images/all_items", pil_to_chw(all_items), global_step=step)
            if self.per_item:
                for (index, _, _, _, _), cell in zip(ordered, cells):
                    exp.add_image(f"images/{labels[index]}", pil_to_chw(cell), global_step=step)
            if step == 0 or not getattr(self, "_captioned", False):
                # the full prompts (the images' captions are cut to the image width)
                captions = "\n".join(f"{it.index}: {it.prompt} | seed {it.seed}  " for it in pl_module.items)
                exp.add_text("images/captions", captions, global_step=step)
                self._captioned = True

    @staticmethod
    def _rewards(ev) -> torch.Tensor | None:
        """The evaluation's reward loss when a regulariser makes it differ from its total, else None."""
        reward = getattr(ev, "reward", None)
        return None if reward is None or reward is ev.total else reward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the images were made before this step's update
        if step % self.every_n_steps == 0:
            self._log(trainer, pl_module, pl_module.last.images, pl_module.last.total, step,
                      getattr(pl_module.last, "metrics", None), self._rewards(pl_module.last))

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.logged_steps and trainer.global_rank == 0 and trainer.global_step == 0:
            return
        final = pl_module.final_evaluation()
        self.final_step = trainer.global_step
        self._log(trainer, pl_module, final.images, final.total, trainer.global_step, getattr(final, "metrics", None),
                  self._rewards(final))
        if trainer.global_rank == 0:
            self.contact_sheet(pl_module.items, title=guidance_title(getattr(pl_module, "guidance", None)))

    def contact_sheet(self, items, title: str = "") -> str:
        """Rows = items, columns = logged steps (labelled), each cell with its loss; built from the PNGs on disk.
        ``title``: what the guidance pulls toward (``console.guidance_title``)."""
        # a resumed run logs into a new folder: the sheet shows the steps whose images are here
        steps = [s for s in sorted(self.logged_steps) if os.path.exists(self._path(items[0].index, s))]
        if not steps:
            return ""
        with Image.open(self._path(items[0].index, steps[0])) as first:
            w, h = first.size
        if self.thumbnail is not None:
            w, h = self.thumbnail, self.thumbnail * h // w
        else:
            k = upscale_factor((w, h), self.min_side)
            w, h = w * k, h * k
        fnt, small, big = font(12), font(11), font(14)
        g = GUTTER
        label_w, title_h, head_h, loss_h = 150, 24, 18, 16
        held_out_lines = max((len(v) for row in self.metrics.values() for v in row.values()), default=0)
        loss_h += 13 * held_out_lines  # one line per held-out metric under the loss: "value name"
        width = label_w + len(steps) * (w + g) + g
        cell_top = title_h + head_h
        row_h = h + loss_h + g
        sheet = Image.new("RGB", (width, cell_top + len(items) * row_h + g), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((g, 4), fit_text(draw, "DOODL" + (f" · {title}" if title else ""), width - 2 * g, big), fill=INK, font=big)
        for c, step in enumerate(steps):  # column labels: which optimisation step each column is
            x = label_w + g + c * (w + g)
            text = f"step {step}" + (" (final)" if step == self.final_step else "")
            draw.text((x, title_h), fit_text(draw, text, w, fnt), fill=INK, font=fnt)
        for r, item in enumerate(items):
            y = cell_top + r * row_h
            lines = wrap_text(draw, " ".join(str(item.prompt).split()), label_w - 2 * g, fnt, max(1, (h - 16) // 15))
            for k, line in enumerate(lines + [f"seed {item.seed}"]):
                draw.text((g, y + 2 + k * 15), line, fill=INK if k < len(lines) else FAINT, font=fnt)
            losses = {s: self.losses.get(s, {}).get(item.index) for s in steps}
            # the best cell: the lowest reward loss where a regulariser made it differ from the loss, else the loss
            ranked = {s: self.rewards.get(s, {}).get(item.index, losses[s]) for s in steps}
            known = [v for s, v in ranked.items() if v is not None and losses[s] is not None]
            best = min(known) if known else None
            for c, step in enumerate(steps):
                x = label_w + g + c * (w + g)
                path = self._path(item.index, step)
                if os.path.exists(path):
                    with Image.open(path) as img:
                        sheet.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
                else:
                    draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(200, 200, 200))
                loss = losses[step]
                if loss is not None:
                    draw.text((x, y + h + 1), f"{loss:.4f}", fill=BEST if ranked[step] == best else FAINT, font=small)
                    for k, line in enumerate(self.metric_lines(self.metrics.get(step, {}).get(item.index))):
                        draw.text((x, y + h + 14 + 13 * k), fit_text(draw, line, w, small), fill=FAINT, font=small)
        out = os.path.join(self.dir, "contact_sheet.png")
        save_png(out, sheet)
        return out

    def state_dict(self) -> dict:
        return {"logged_steps": self.logged_steps, "losses": self.losses, "metrics": self.metrics,
                "rewards": self.rewards, "dir": os.path.abspath(self.dir)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.logged_steps = list(state_dict["logged_steps"])
        self.resumed_from = state_dict.get("dir")  # checkpoints made before it was kept: the images stay there
        # checkpoints made before losses were kept have none: those cells go without a number
        self.losses = {int(s): {int(i): float(v) for i, v in row.items()} for s, row in state_dict.get("losses", {}).items()}
        self.metrics = {int(s): {int(i): {str(k): float(x) for k, x in v.items()} for i, v in row.items()}
                        for s, row in state_dict.get("metrics", {}).items()}
        self.rewards = {int(s): {int(i): float(v) for i, v in row.items()}
                        for s, row in state_dict.get("rewards", {}).items()}

