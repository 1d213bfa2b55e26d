"""Helpers of the shapes-world evaluation (``shapes_eval.py``): UNet call counting, bootstrap intervals, and
PIL drawing (bar charts, example grids) -- no matplotlib needed. (Per-prompt guidance targets are in the core:
``ClassifierGuidance(target={prompt: class})``, ``CLIPImageGuidance(references={prompt: images})``.)"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from doodl_lightning.io import to_pil

__all__ = ["UNetCounter", "bootstrap_ci", "per_seed_means", "draw_grid", "draw_bars", "draw_curves"]


# ------------------------------------------------------------------------------------------------ compute
class UNetCounter:
    """Counts UNet forward calls with a forward hook: rows evaluated, with and without autograd recording
    (a forward recorded with grad is later back-propagated: a VJP). Checkpoint recomputations count too."""

    def __init__(self, unet: torch.nn.Module):
        self.handle = unet.register_forward_hook(self._hook)
        self.reset()

    def _hook(self, module, args, output):
        x = args[0] if args else None
        rows = int(x.shape[0]) if isinstance(x, Tensor) else 0
        if torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
            self.grad_calls += 1
            self.grad_rows += rows
        else:
            self.calls += 1
            self.rows += rows

    def reset(self):
        self.calls = self.rows = self.grad_calls = self.grad_rows = 0

    def per_image(self, n_items: int, cfg_rows: int) -> dict:
        """UNet evaluations per image: each eps of an item is one evaluation (``cfg_rows`` rows when the
        classifier-free-guidance pair is batched into one call)."""
        total = (self.rows + self.grad_rows) / cfg_rows / n_items
        grad = self.grad_rows / cfg_rows / n_items
        return {"unet_forward_per_image": round(total, 2), "unet_backward_per_image": round(grad, 2),
                "batched_unet_calls": self.calls + self.grad_calls}


# ------------------------------------------------------------------------------------------------ statistics
def per_seed_means(values: Sequence[float], seeds: Sequence[int]) -> list[float]:
    """Mean of the items' values for each seed (over the prompts that share it), in seed order."""
    groups: dict[int, list[float]] = {}
    for v, s in zip(values, seeds):
        groups.setdefault(int(s), []).append(float(v))
    return [sum(g) / len(g) for _, g in sorted(groups.items())]


def bootstrap_ci(per_seed: Sequence[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and percentile bootstrap interval of the mean over seeds (resampling seeds with replacement)."""
    x = torch.tensor(list(per_seed), dtype=torch.float64)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "ci95": [mean, mean], "n_seeds": n}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = x[idx].mean(1).sort().values
    lo = float(boots[int(math.floor((1 - level) / 2 * n_boot))])
    hi = float(boots[min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)])
    return {"mean": mean, "ci95": [lo, hi], "n_seeds": n}


# ------------------------------------------------------------------------------------------------ drawing
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(rows: list[dict], col_labels: list[str], path: str | Path, title: str = "", cell: int = 96) -> None:
    """Rows = methods, columns = seeds. ``rows``: [{"label": str, "images": Tensor (C, 3, H, W) in [-1, 1],
    "ok": list[bool | None] (border: green = the evaluator says success, red = failure), "text": list[str]}]."""
    from PIL import Image, ImageDraw

    ncol = max(len(col_labels), 1)
    left, pad, text_h = 170, 4, 14
    w = max(left + ncol * (cell + pad) + pad, 640)
    title_lines = [ln for part in title.split("\n") for ln in _wrap(part, max(40, w // 7))] if title else []
    top = 26 + 16 * len(title_lines)
    h = top + len(rows) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    f, fs = _font(12), _font(10)
    for k, line in enumerate(title_lines):
        d.text((pad, 4 + 16 * k), line, fill=(0, 0, 0), font=_font(12))
    for j, lab in enumerate(col_labels):
        d.text((left + j * (cell + pad) + 2, top - 16), lab, fill=(60, 60, 60), font=fs)
    for i, row in enumerate(rows):
        y = top + i * (cell + text_h + pad)
        for k, line in enumerate(_wrap(row["label"], 26)[:5]):
            d.text((pad, y + 4 + 14 * k), line, fill=(0, 0, 0), font=f)
        imgs = row["images"]
        for j in range(min(ncol, len(imgs))):
            x = left + j * (cell + pad)
            inner = cell - 6
            im = to_pil(imgs[j]).resize((inner, inner), Image.NEAREST)
            ok = row.get("ok", [None] * len(imgs))[j]
            colour = (200, 200, 200) if ok is None else ((30, 160, 60) if ok else (210, 40, 40))
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
            canvas.paste(im, (x + 3, y + 3))
            txt = row.get("text", [""] * len(imgs))[j]
            if txt:
                d.text((x + 2, y + cell + 1), txt, fill=(0, 0, 0), font=fs)
    canvas.save(str(path))


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for wd in words:
        if cur and len(cur) + 1 + len(wd) > width:
            lines.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}".strip()
    return lines + ([cur] if cur else [])


SERIES_COLOURS = [(52, 101, 164), (237, 145, 33), (115, 115, 115), (78, 154, 6)]


def draw_bars(groups: list[dict], series: list[str], path: str | Path, title: str, ymax: float, ylabel: str = "",
              width: int = 900, height: int = 420) -> None:
    """Grouped bar chart with 95% interval whiskers. ``groups``: [{"label": str, "values": {series: (mean, lo,
    hi) or None}}]; one bar per series per group, y from 0 to ``ymax``."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    f, fs = _font(12), _font(10)
    x0, y0, x1, y1 = 60, 40, width - 20, height - 90  # plot area
    d.text((10, 8), title, fill=(0, 0, 0), font=_font(14))
    d.line([x0, y0, x0, y1], fill=(0, 0, 0))
    d.line([x0, y1, x1, y1], fill=(0, 0, 0))
    for k in range(6):
        v = ymax * k / 5
        y = y1 - (y1 - y0) * k / 5
        d.line([x0 - 4, y, x1, y], fill=(225, 225, 225) if k else (0, 0, 0))
        d.text((8, y - 6), f"{v:g}", fill=(0, 0, 0), font=fs)
    if ylabel:
        d.text((x0 + 4, y0 - 16), ylabel, fill=(60, 60, 60), font=fs)
    n = max(len(groups), 1)
    gw = (x1 - x0) / n
    bw = gw * 0.8 / max(len(series), 1)

    def ypix(v):
        return y1 - (y1 - y0) * max(0.0, min(v, ymax)) / ymax

    for i, g in enumerate(groups):
        gx = x0 + i * gw + gw * 0.1
        for k, s in enumerate(series):
            val = g["values"].get(s)
            if val is None:
                continue
            mean, lo, hi = val
            bx = gx + k * bw
            d.rectangle([bx, ypix(mean), bx + bw - 2, y1], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
            cx = bx + bw / 2 - 1
            d.line([cx, ypix(lo), cx, ypix(hi)], fill=(0, 0, 0), width=1)
            d.line([cx - 3, ypix(lo), cx + 3, ypix(lo)], fill=(0, 0, 0))
            d.line([cx - 3, ypix(hi), cx + 3, ypix(hi)], fill=(0, 0, 0))
        for k, line in enumerate(_wrap(g["label"], max(8, int(gw / 6)))[:4]):
            d.text((x0 + i * gw + 4, y1 + 6 + 12 * k), line, fill=(0, 0, 0), font=fs)
    lx = x0
    for k, s in enumerate(series):
        d.rectangle([lx, height - 22, lx + 12, height - 10], fill=SERIES_COLOURS[k % len(SERIES_COLOURS)])
        d.text((lx + 16, height - 23), s, fill=(0, 0, 0), font=f)
        lx += 28 + 7 * len(s)
    im.save(str(path))


def choice(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def draw_curves(series: list[dict], path: str | Path, title: str, xlabel: str, ylabel: str, ymax: float | None,
                width: int = 900, height: int = 480) -> None:
    """Lines with 95% interval whiskers on a log-x axis, y from 0 to ``ymax`` (None: the data's range).
    ``series``: [{"label", "points": [(x, mean, lo, hi)], "marker": bool (a single point drawn as a big dot)}]."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    f, fs = _font(12), _font(10)
    x0, y0, x1, y1 = 60, 40, width - 200, height - 50
    xs = [p[0] for s in series for p in s["points"] if p[0] > 0]
    lo_x, hi_x = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    d.text((10, 8), title, fill=(0, 0, 0), font=_font(14))
    d.line([x0, y0, x0, y1], fill=(0, 0, 0))
    d.line([x0, y1, x1, y1], fill=(0, 0, 0))

    def px(x):
        return x0 + (x1 - x0) * (math.log10(x) - lo_x) / max(hi_x - lo_x, 1e-9)

    if ymax is None:
        ys = [v for s in series for p in s["points"] for v in p[1:]]
        ymin, ymax = min(ys), max(ys)
        ymin, ymax = (ymin - 1, ymax + 1) if ymax == ymin else (ymin - 0.05 * (ymax - ymin), ymax + 0.05 * (ymax - ymin))
    else:
        ymin = 0.0

    def py(v):
        return y1 - (y1 - y0) * (max(ymin, min(v, ymax)) - ymin) / (ymax - ymin)

    for k in range(6):
        v = ymin + (ymax - ymin) * k / 5
        d.line([x0 - 4, py(v), x1, py(v)], fill=(225, 225, 225) if k else (0, 0, 0))
        d.text((8, py(v) - 6), f"{v:.3g}", fill=(0, 0, 0), font=fs)
    for e in range(int(math.floor(lo_x)), int(math.ceil(hi_x)) + 1):
        for m in (1, 2, 5):
            x = m * 10 ** e
            if lo_x <= math.log10(x) <= hi_x:
                d.line([px(x), y1, px(x), y1 + 4], fill=(0, 0, 0))
                d.text((px(x) - 8, y1 + 6), f"{x:g}", fill=(0, 0, 0), font=fs)
    d.text(((x0 + x1) // 2 - 80, height - 22), xlabel, fill=(0, 0, 0), font=f)
    d.text((x0 + 4, y0 - 16), ylabel, fill=(60, 60, 60), font=fs)
    colours = SERIES_COLOURS + [(204, 0, 0), (117, 80, 123)]
    for k, s in enumerate(series):
        c = colours[k % len(colours)]
        pts = [(px(x), py(m), py(lo), py(hi)) for x, m, lo, hi in s["points"] if x > 0]
        if len(pts) > 1 and not s.get("marker"):
            d.line([(x, y) for x, y, _, _ in pts], fill=c, width=2)
        for x, y, lo, hi in pts:
            d.line([x, lo, x, hi], fill=c)
            r = 5 if s.get("marker") else 2
            d.ellipse([x - r, y - r, x + r, y + r], fill=c)
        ly = y0 + 18 * k
        d.rectangle([x1 + 12, ly, x1 + 24, ly + 12], fill=c)
        d.text((x1 + 30, ly), s["label"], fill=(0, 0, 0), font=f)
    im.save(str(path))
