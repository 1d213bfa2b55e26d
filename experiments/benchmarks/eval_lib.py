"""PIL drawing for the comparison reports (example grids, accuracy-against-compute curves) -- no matplotlib
needed. Statistics are ``compare.py``'s; UNet call counting is the core's ``doodl_lightning.compute``."""
from __future__ import annotations

import math
from pathlib import Path

from doodl_lightning.io import to_pil

__all__ = ["draw_grid", "draw_curves"]


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


def y_range(series: list[dict], ymax: float | None) -> tuple[float, float]:
    """The y axis of ``draw_curves``: 0 to ``ymax``, raised to the data's top if a value passes it (a fixed
    scale never clips a point silently); None: the data's range with a 5% margin."""
    ys = [v for s in series for p in s["points"] for v in p[1:]]
    if ymax is not None:
        return 0.0, max([ymax] + ys)
    lo, hi = min(ys), max(ys)
    return (lo - 1, hi + 1) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def draw_curves(series: list[dict], path: str | Path, title: str, xlabel: str, ylabel: str, ymax: float | None,
                width: int = 900, height: int = 480) -> None:
    """Lines with 95% interval whiskers on a log-x axis, y from 0 to ``ymax`` or the data's top if higher (None:
    the data's range).
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

    ymin, ymax = y_range(series, ymax)

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
    colours = SERIES_COLOURS + [(204, 0, 0), (117, 80, 123), (0, 150, 150), (160, 110, 0), (230, 90, 170)]
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
