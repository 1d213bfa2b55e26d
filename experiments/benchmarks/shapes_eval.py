#!/usr/bin/env python
"""DOODL vs one-step guidance vs unguided sampling in the shapes world, measured by the independent evaluator.

    python experiments/benchmarks/shapes_eval.py --quick --out DIR     # <= 5 min on 2 CPU cores
    python experiments/benchmarks/shapes_eval.py --out DIR             # the full evaluation (<= 45 min, 2 cores)
    python experiments/benchmarks/shapes_eval.py --tiny --weights W --out DIR   # a schema test on random tiny models

Four experiments (issue 6), every method with the same number of sampler steps:

1. ``vocab``: vocabulary expansion. The diffusion model only ever read "polygon"; the shapes classifier
   (guide) asks for a triangle / square / pentagon / hexagon. Prompt "a <size> <colour> polygon".
   Evaluator: fine-class accuracy, and whether colour and size survive.
2. ``compositional``: shapes-CLIP text guidance toward two-object prompts ("a small red circle at the left
   and a small blue star at the right on a black background"). Evaluator: each half of the image (the
   other half filled with the image's border colour) must hold the named object (coarse shape + colour);
   the background is judged on the whole image.
3. ``aesthetic``: maximise the shapes aesthetic head. Evaluator: its quality score (0..10, an estimate of
   the procedural 5 sharpness + 5 contrast score), prompt attributes kept and pixel drift.
4. ``personalisation``: shapes-CLIP image guidance toward the mean embedding of 4 reference renders sharing
   a colour and a background; the prompt ("a <size> <shape>") names neither. Evaluator: agreement of the
   generations' colour and background with the references.

Methods: unguided (DDIM, and EDICT = DOODL-EDICT's starting point), one-step guidance (DDIM; the scale is
swept and the best by the evaluator's primary metric is reported -- an optimistic bound for the baseline),
DOODL-DDIM and DOODL-EDICT (the framework's ``DOODL`` LightningModule fitted by a ``lightning.Trainer``).
Every guided result is reported with the guide's own verdict and the evaluator's; the evaluator decides.
Compute: UNet evaluations per image counted with a forward hook on the UNet (checkpoint recomputations
included; "backward" = forwards recorded for a VJP), and wall-clock seconds per image (batched: the run's
time divided by its items). Statistics: mean and 95% percentile-bootstrap interval over seeds (each seed's
value is the mean over the experiment's prompts).

Outputs in ``--out``: ``results.json`` (every number), ``results.md`` (tables), ``<exp>_bars.png``,
``<exp>_grid.png`` (rows = methods, columns = seeds; green/red border = evaluator success/failure), and
``refs/`` (the personalisation references).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from doodl_lightning.guidance import AestheticGuidance, ClassifierGuidance, CLIPImageGuidance, CLIPTextGuidance  # noqa: E402
from doodl_lightning.baselines import guided_sampling  # noqa: E402
from doodl_lightning.console import quiet_lightning  # noqa: E402
from doodl_lightning.io import save_png  # noqa: E402
from doodl_lightning.module import DOODL  # noqa: E402
from doodl_lightning.shapes import ShapesWeights  # noqa: E402
from doodl_lightning.shapes import data as D  # noqa: E402

from common import machine_description  # noqa: E402
from eval_lib import UNetCounter, bootstrap_ci, draw_bars, draw_grid, per_seed_means  # noqa: E402

EXPERIMENTS = ("vocab", "compositional", "aesthetic", "personalisation")

# What each experiment measures (written into results.md)
VOCAB_DESCRIPTION = """\
Prompt 'a <size> <colour> polygon'; the guide (shapes classifier) asks for one of the 4 polygon
classes the diffusion model never read (triangle, square, pentagon, hexagon), one target per prompt."""
COMPOSITIONAL_DESCRIPTION = """\
Prompt = guidance text: two small objects (coarse shape + colour) on either side of a left/right or
top/bottom relation, and a background. Evaluator per half-image (other half filled with the border's
median colour); guide's verdict: shapes-CLIP ranks the prompt above its colour-, shape- and side-
swapped variants (chance 25%)."""
AESTHETIC_DESCRIPTION = """\
Prompt 'a <colour> <shape>' (no quality words: unguided generations vary in sharpness and contrast).
Evaluator: its quality head (an estimate of the procedural score 5 sharpness + 5 contrast, 10 =
pristine); drift: prompt attributes kept, and mean |pixel change| (0..1 scale) from the same seed's
unguided image of the same sampler."""
PERSONALISATION_DESCRIPTION = """\
{refs} reference renders per set share a colour and a background (shape, size, position vary); the
prompt 'a <size> <shape>' names neither. Evaluator: the generation's colour and background agree
with the set's (chance about 1/18); guide's verdict: the generation's shapes-CLIP embedding is
nearest to its own set's target among all sets."""

# Sizes per mode. Everything that defines the test sets (prompts, targets, seeds, references) is fixed here
# and in the build_* functions below, before any result is seen; nothing is chosen by looking at results
# except the one-step scale (swept; the best by the evaluator is reported, in favour of the baseline).
MODES = {
    "full": dict(steps=20, iters=15, seeds=8, other_seeds=6, vocab_prompts_per_class=1, prompts=4, refs_per_set=4,
                 scales=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0], step=0.1, step_sweep=[0.3, 0.03],
                 step_sweep_samplers=["ddim", "edict"]),
    "quick": dict(steps=10, iters=6, seeds=2, other_seeds=2, vocab_prompts_per_class=1, prompts=2, refs_per_set=4,
                  scales=[1.0, 10.0, 100.0], step=0.1, step_sweep=[], step_sweep_samplers=[]),
    "tiny": dict(steps=2, iters=1, seeds=2, other_seeds=2, vocab_prompts_per_class=1, prompts=1, refs_per_set=2,
                 scales=[1.0], step=0.1, step_sweep=[0.3], step_sweep_samplers=["ddim"]),
}
CFG_SCALE = 7.5  # classifier-free guidance of every sampler (SD's default)
CLIP = 1e-3      # the gradient clip the DOODL step is expressed against (the official clip_grad_val; --clip):
                 # a DOODL run of step s uses clip_grad_val = s and grad_scale = 2 s / CLIP, which is
                 # s/CLIP x clip(dS, CLIP): ``step`` bounds each element's move per iteration (before momentum)
# the full run starts no DOODL step-sweep run after this many minutes (keeps it within 45 min on 2 cores)
FULL_SWEEP_DEADLINE_MINUTES = 26.0
SEED_BASE = {"vocab": 10_000, "compositional": 20_000, "aesthetic": 30_000, "personalisation": 40_000}

log = print


# ------------------------------------------------------------------------------------------------ context
def metric_list(labels: dict[str, str], judges: dict[str, str] | None = None, not_rates: tuple = ()) -> list[dict]:
    """The reported measures, in table order: key, label, who judges it (``evaluator`` unless ``judges`` says
    ``guide`` or ``pixels``), and whether it is a rate (shown in %)."""
    judges = judges or {}
    return [{"name": k, "label": v, "judge": judges.get(k, "evaluator"), "percent": k not in not_rates}
            for k, v in labels.items()]


@dataclass
class Experiment:
    name: str
    title: str
    description: str
    prompts: list[str]
    seeds: list[int]
    guidance: torch.nn.Module
    verdict: Callable  # (images, items) -> (metrics {name: [per item]}, ok [per item], text [per item])
    metrics: list[dict]  # {"name", "label", "judge": "evaluator"|"guide", "percent": bool}
    primary: str
    guide_metric: str
    ymax: float
    extra: dict = field(default_factory=dict)
    spec: Callable | None = None  # (prompt, seed) -> ([(fine shape, colour, size, position) per object], background)
    runs: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def items(self) -> list[tuple[str, int]]:  # prompt-major, as doodl_lightning.data.make_items
        return [(p, s) for p in self.prompts for s in self.seeds]


# ------------------------------------------------------------------------------------------------ experiments
def _on(guide: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images on the guide's device (the guide follows the DOODL module to its device)."""
    p = next(guide.parameters(), None)
    return images if p is None else images.to(p.device)


def coarse_of(fine_index: int) -> str:
    return D.COARSE_SHAPES[D.FINE_TO_COARSE[int(fine_index)]]


def fine_of(coarse: str, rng: random.Random) -> int:
    """A fine shape class of a coarse name (a polygon: one of the four at random)."""
    return {"circle": 0, "star": 5}.get(coarse) if coarse != "polygon" else rng.choice([1, 2, 3, 4])


def render_specs(specs: list, seed: int) -> torch.Tensor:
    """Procedural renders (pristine: no blur, full contrast) of exactly the given objects and backgrounds,
    with the data module's jitter of centre, radius, rotation and colours (drawn from ``seed``)."""
    n = len(specs)
    a = D.sample_attributes(seed, n, p_degraded=0.0)
    for i, (objs, bg) in enumerate(specs):
        a.n_objects[i] = len(objs)
        for k, (sh, co, si, po) in enumerate(objs):
            a.shape[i, k], a.colour[i, k], a.size[i, k], a.position[i, k] = sh, co, si, po
        a.background[i] = bg
    g = torch.Generator().manual_seed(seed + 1)
    grid = torch.tensor(D.GRID)
    a.center = torch.stack([grid[a.position % 3], grid[a.position // 3]], dim=-1) + (torch.rand(n, 2, 2, generator=g) * 2 - 1)
    factor = torch.tensor([D.SHAPE_GEOMETRY[x][2] for x in D.SHAPES])[a.shape]
    a.radius = torch.tensor(D.SIZE_RADIUS)[a.size] * factor * (1 + 0.08 * (torch.rand(n, 2, generator=g) * 2 - 1))
    a.colour_rgb = (D.COLOUR_RGB[a.colour] + 0.05 * (torch.rand(n, 2, 3, generator=g) * 2 - 1)).clamp(0, 1)
    a.background_rgb = (D.BACKGROUND_RGB[a.background] + 0.03 * (torch.rand(n, 3, generator=g) * 2 - 1)).clamp(0, 1)
    return D.render(a)


def seeds_of(ctx, name: str) -> list[int]:
    """The experiment's seeds: its own range, as many as the mode gives it (vocab: ``seeds``, others: ``other_seeds``)."""
    return [SEED_BASE[name] + i for i in range(ctx.mode["seeds" if name == "vocab" else "other_seeds"])]


def _rng(prompt: str, seed: int) -> random.Random:
    return random.Random(f"{prompt}|{seed}")


def build_vocab(ctx) -> Experiment:
    rng = random.Random(1)
    targets, want = {}, {}
    for cls in (1, 2, 3, 4):  # triangle, square, pentagon, hexagon: "polygon" to the diffusion model
        for _ in range(ctx.mode["vocab_prompts_per_class"]):
            while True:
                size, colour = rng.choice(D.SIZES), rng.choice(D.COLOURS)
                prompt = f"a {size} {colour} polygon"
                if prompt not in targets:
                    break
            targets[prompt] = cls
            want[prompt] = {"size": D.SIZES.index(size), "colour": D.COLOURS.index(colour)}
    guide = ClassifierGuidance(target=targets, num_cuts=0, **ctx.weights.classifier_kwargs())  # a class per prompt

    def verdict(images, items):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            g = guide.logits(_on(guide, images)).mean(1).argmax(-1).cpu()
        m = {k: [] for k in ("evaluator_target", "colour_kept", "size_kept", "target_and_colour", "polygon_kept",
                             "guide_target")}
        ok, text = [], []
        for i, (p, _) in enumerate(items):
            t = targets[p]
            hit = int(ev["shape"][i]) == t
            col = int(ev["colour"][i]) == want[p]["colour"]
            m["evaluator_target"].append(float(hit))
            m["colour_kept"].append(float(col))
            m["size_kept"].append(float(int(ev["size"][i]) == want[p]["size"]))
            m["target_and_colour"].append(float(hit and col))
            m["polygon_kept"].append(float(coarse_of(ev["shape"][i]) == "polygon"))
            m["guide_target"].append(float(int(g[i]) == t))
            ok.append(hit)
            text.append(f"{D.SHAPES[int(ev['shape'][i])]} ({D.SHAPES[t][:4]})")
        return m, ok, text

    metrics = metric_list(dict(evaluator_target="target class (evaluator)",
                          guide_target="target class (guide: classifier)", colour_kept="colour kept",
                          size_kept="size kept", target_and_colour="target and colour",
                          polygon_kept="still a polygon"), judges={"guide_target": "guide"})
    def spec(prompt, seed):
        r = _rng(prompt, seed)
        return [(targets[prompt], want[prompt]["colour"], want[prompt]["size"], r.randrange(9))], r.randrange(3)

    return Experiment(
        "vocab", "Vocabulary expansion (classifier guidance)", VOCAB_DESCRIPTION,
        list(targets), seeds_of(ctx, "vocab"), guide, verdict, metrics,
        "evaluator_target", "guide_target", 100.0,
        extra={"targets": {p: D.SHAPES[t] for p, t in targets.items()}}, spec=spec)


def _swap_captions(spec) -> list[str]:
    (s1, c1), (s2, c2) = spec["objects"]
    p1, p2 = spec["positions"]
    bg = spec["background"]

    def cap(a, b, pa, pb):
        return f"a small {a[1]} {a[0]} at the {pa} and a small {b[1]} {b[0]} at the {pb} on a {bg} background"

    return [cap((s1, c1), (s2, c2), p1, p2),   # the prompt
            cap((s1, c2), (s2, c1), p1, p2),   # colours swapped
            cap((s2, c1), (s1, c2), p1, p2),   # shapes swapped
            cap((s1, c1), (s2, c2), p2, p1)]   # sides swapped (the relation)


def region_views(images: torch.Tensor, axis: list[str], first: bool) -> torch.Tensor:
    """Keep one half of each image (left/top if ``first``), fill the other with the median border colour."""
    x = images.clone()
    n, _, h, w = x.shape
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
    bg = border.median(dim=-1).values  # (N, 3)
    for i in range(n):
        if axis[i] == "h":
            sl = (slice(None), slice(None), slice(w // 2, None)) if first else (slice(None), slice(None), slice(0, w // 2))
        else:
            sl = (slice(None), slice(h // 2, None), slice(None)) if first else (slice(None), slice(0, h // 2), slice(None))
        x[i][sl] = bg[i].view(3, 1, 1)
    return x


def build_compositional(ctx) -> Experiment:
    rng = random.Random(2)
    specs = {}
    while len(specs) < ctx.mode["prompts"]:
        axis = rng.choice(["h", "v"])
        positions = ("left", "right") if axis == "h" else ("top", "bottom")
        s1, s2 = rng.sample(D.COARSE_SHAPES, 2)
        c1, c2 = rng.sample(D.COLOURS, 2)
        bg = rng.choice(D.BACKGROUNDS)
        spec = {"axis": axis, "positions": positions, "objects": [(s1, c1), (s2, c2)], "background": bg}
        specs[_swap_captions(spec)[0]] = spec
    guide = CLIPTextGuidance(num_cuts=0, **ctx.weights.clip_kwargs())

    def verdict(images, items):
        specs_i = [specs[p] for p, _ in items]
        axis = [s["axis"] for s in specs_i]
        ev_full = ctx.evaluator(images)
        ev = [ctx.evaluator(region_views(images, axis, first=k == 0)) for k in range(2)]
        with torch.no_grad():
            img = guide.encoder(_on(guide, images))[:, 0]  # (N, D) whole image (num_cuts=0)
            prefer = []
            for i, s in enumerate(specs_i):
                txt = guide.encode_text(_swap_captions(s))
                prefer.append(float(int((txt.to(img.device) @ img[i]).argmax()) == 0))
        m = {k: [] for k in ("object_acc", "shape_acc", "colour_acc", "background_acc", "all_correct", "guide_prefers_prompt")}
        ok, text = [], []
        for i, s in enumerate(specs_i):
            objs = []
            for k, (shape, colour) in enumerate(s["objects"]):
                sh = coarse_of(ev[k]["shape"][i]) == shape
                co = D.COLOURS[int(ev[k]["colour"][i])] == colour
                objs.append((sh, co))
            bg = D.BACKGROUNDS[int(ev_full["background"][i])] == s["background"]
            m["object_acc"].append(sum(float(a and b) for a, b in objs) / 2)
            m["shape_acc"].append(sum(float(a) for a, _ in objs) / 2)
            m["colour_acc"].append(sum(float(b) for _, b in objs) / 2)
            m["background_acc"].append(float(bg))
            m["all_correct"].append(float(all(a and b for a, b in objs) and bg))
            m["guide_prefers_prompt"].append(prefer[i])
            n_ok = sum(a and b for a, b in objs)
            ok.append(n_ok == 2)
            text.append(f"{n_ok}/2 objects{' bg' if bg else ''}")
        return m, ok, text

    metrics = metric_list(dict(object_acc="objects right: shape+colour in its half (evaluator)",
                          guide_prefers_prompt="guide (CLIP) prefers prompt over swaps", shape_acc="shape",
                          colour_acc="colour", background_acc="background", all_correct="everything right"),
                          judges={"guide_prefers_prompt": "guide"})
    def spec(prompt, seed):
        r, sp = _rng(prompt, seed), specs[prompt]
        objs = [(fine_of(shape, r), D.COLOURS.index(colour), 0, D.POSITIONS.index(pos))
                for (shape, colour), pos in zip(sp["objects"], sp["positions"])]
        return objs, D.BACKGROUNDS.index(sp["background"])

    return Experiment(
        "compositional", "CLIP-text guidance on two-object prompts", COMPOSITIONAL_DESCRIPTION,
        list(specs), seeds_of(ctx, "compositional"), guide, verdict, metrics,
        "object_acc", "guide_prefers_prompt", 100.0, extra={"specs": specs}, spec=spec)


def build_aesthetic(ctx) -> Experiment:
    want: dict[str, tuple[str, str]] = {}  # prompt -> (colour, coarse shape) it names
    rng = random.Random(3)
    while len(want) < ctx.mode["prompts"]:
        colour, coarse = rng.choice(D.COLOURS), rng.choice(D.COARSE_SHAPES)
        want[D.with_article(f"{colour} {coarse}")] = (colour, coarse)
    guide = AestheticGuidance(head=ctx.weights.aesthetic_head, num_cuts=0, **ctx.weights.clip_kwargs())
    exp_ref: dict = {}

    def verdict(images, items, reference=None):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            score = guide.score(_on(guide, images)).cpu()
        m = {k: [] for k in ("evaluator_quality", "guide_score", "prompt_kept", "pixel_drift")}
        ok, text = [], []
        for i, (p, _) in enumerate(items):
            colour, coarse = want[p]
            kept = D.COLOURS[int(ev["colour"][i])] == colour and coarse_of(ev["shape"][i]) == coarse
            m["evaluator_quality"].append(float(ev["quality"][i]))
            m["guide_score"].append(float(score[i]))
            m["prompt_kept"].append(float(kept))
            ok.append(None if kept else False)
            text.append(f"q {float(ev['quality'][i]):.1f} / head {float(score[i]):.1f}")
        if reference is not None:
            m["pixel_drift"] = ((images - reference).abs().mean((1, 2, 3)) / 2).tolist()
        else:
            m.pop("pixel_drift")
        return m, ok, text

    metrics = metric_list(dict(evaluator_quality="quality (evaluator, 0-10)",
                          guide_score="aesthetic head score (guide)", prompt_kept="prompt kept (shape+colour)",
                          pixel_drift="pixel drift vs unguided (same sampler)"), judges={"guide_score": "guide",
                          "pixel_drift": "pixels"}, not_rates=("evaluator_quality", "guide_score", "pixel_drift"))
    def spec(prompt, seed):
        r = _rng(prompt, seed)
        colour, coarse = want[prompt]
        return [(fine_of(coarse, r), D.COLOURS.index(colour), r.randrange(3), r.randrange(9))], r.randrange(3)

    return Experiment(
        "aesthetic", "Aesthetic-style guidance (shapes aesthetic head, maximised)", AESTHETIC_DESCRIPTION,
        list(want), seeds_of(ctx, "aesthetic"), guide, verdict, metrics,
        "evaluator_quality", "guide_score", 10.0, extra={"reference": exp_ref}, spec=spec)


def build_personalisation(ctx) -> Experiment:
    rng = random.Random(4)
    pool = D.sample_attributes(4_444_000, 4000, p_degraded=0.0)
    sets, want = {}, {}
    used_pairs = set()
    ref_dir = ctx.out / "refs"
    ref_dir.mkdir(parents=True, exist_ok=True)
    while len(sets) < ctx.mode["prompts"]:
        colour, bg = rng.choice(D.COLOURS), rng.choice(D.BACKGROUNDS)
        size, coarse = rng.choice(D.SIZES), rng.choice(D.COARSE_SHAPES)
        prompt = f"a {size} {coarse}"
        if (colour, bg) in used_pairs or prompt in sets:
            continue
        used_pairs.add((colour, bg))
        sel = ((pool.colour[:, 0] == D.COLOURS.index(colour)) & (pool.background == D.BACKGROUNDS.index(bg))
               & (pool.n_objects == 1)).nonzero().flatten()[: ctx.mode["refs_per_set"]]
        sub = D.Attributes(**{k: v[sel] for k, v in pool.__dict__.items()})
        imgs = D.render(sub)
        paths = []
        for j, im in enumerate(imgs):
            path = ref_dir / f"set{len(sets)}_{colour}_{bg}_{j}.png"
            save_png(path, im)
            paths.append(str(path))
        sets[prompt] = paths
        want[prompt] = (colour, bg, coarse)
    guide = CLIPImageGuidance(references=sets, num_cuts=0, **ctx.weights.clip_kwargs())  # a reference set per prompt

    def verdict(images, items):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            nearest = (guide.embed_images(_on(guide, images)) @ guide.targets.float().t()).argmax(-1).cpu()
        m = {k: [] for k in ("agreement", "colour_match", "background_match", "prompt_shape_kept", "guide_nearest_set")}
        ok, text = [], []
        for i, (p, _) in enumerate(items):
            colour, bg, coarse = want[p]
            c = D.COLOURS[int(ev["colour"][i])] == colour
            b = D.BACKGROUNDS[int(ev["background"][i])] == bg
            m["agreement"].append(float(c and b))
            m["colour_match"].append(float(c))
            m["background_match"].append(float(b))
            m["prompt_shape_kept"].append(float(coarse_of(ev["shape"][i]) == coarse))
            m["guide_nearest_set"].append(float(int(nearest[i]) == guide.index[p]))
            ok.append(c and b)
            text.append(f"{D.COLOURS[int(ev['colour'][i])]}/{D.BACKGROUNDS[int(ev['background'][i])]}")
        return m, ok, text

    metrics = metric_list(dict(agreement="colour and background agree (evaluator)",
                          guide_nearest_set="guide (CLIP): nearest reference set is its own", colour_match="colour",
                          background_match="background", prompt_shape_kept="prompt shape kept"),
                          judges={"guide_nearest_set": "guide"})
    def spec(prompt, seed):
        r = _rng(prompt, seed)
        colour, bg, coarse = want[prompt]
        size = D.SIZES.index(prompt.split()[1])
        return [(fine_of(coarse, r), D.COLOURS.index(colour), size, r.randrange(9))], D.BACKGROUNDS.index(bg)

    return Experiment(
        "personalisation", "CLIP-image personalisation", PERSONALISATION_DESCRIPTION.format(refs=ctx.mode["refs_per_set"]),
        list(sets), seeds_of(ctx, "personalisation"), guide, verdict, metrics,
        "agreement", "guide_nearest_set", 100.0,
        extra={"sets": {p: {"colour": w[0], "background": w[1], "references": [str(Path(x).relative_to(ctx.out)) for x in sets[p]]}
                        for p, w in want.items()}}, spec=spec)


BUILDERS = {"vocab": build_vocab, "compositional": build_compositional, "aesthetic": build_aesthetic,
            "personalisation": build_personalisation}


# ------------------------------------------------------------------------------------------------ methods
class Ctx:
    def __init__(self, args, mode: dict, out: Path):
        self.args, self.mode, self.out = args, mode, out
        self.weights = ShapesWeights(Path(args.weights))
        self.device = torch.device(args.device)
        self.evaluator = self.weights.evaluator(self.device)
        self.backbone = self.weights.backbone()  # loaded once, given to every DOODL module
        self.counter = UNetCounter(self.backbone.unet)


def make_module(ctx: Ctx, exp: Experiment, sampler: str, **kw):
    m = DOODL(model=ctx.backbone, prompts=exp.prompts, seeds=exp.seeds, guidance=[exp.guidance], sampler=sampler,
              backprop=ctx.args.backprop, steps=ctx.mode["steps"], guidance_scale=CFG_SCALE, mix_weight=0.93,
              momentum=0.9, perturb_grad_scale=1e-4, timestep_grid="official", **kw)
    return m


def _trainer(iters: int, callbacks, device: torch.device):
    import lightning

    return lightning.Trainer(max_steps=iters, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                             num_sanity_val_steps=0)


class LossTrace(Callback):
    """Records the mean guide loss of every optimisation step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(round(float(pl_module.last.total.mean()), 5))


def run_method(ctx: Ctx, exp: Experiment, key: str, label: str, method: str, sampler: str, **params) -> dict:
    t0 = time.time()
    ctx.counter.reset()
    extra = {}
    if method == "render":
        t0 = time.time()
        images = render_specs([exp.spec(p, s) for p, s in exp.items], SEED_BASE[exp.name] + 999)
        ev = None
    elif method == "unguided":
        m = make_module(ctx, exp, sampler)
        ctx.counter.reset()
        t0 = time.time()
        ev = m.prepare(ctx.device).final_evaluation()
    elif method == "one_step":
        # the official one-step baseline (latent_traversal off): grad_scale = the guidance scale
        m = make_module(ctx, exp, sampler)
        ctx.counter.reset()
        t0 = time.time()
        ev = guided_sampling(m.prepare(ctx.device), grad_scale=params["scale"], estimate="one_step")
    else:
        m = make_module(ctx, exp, sampler, grad_scale=params["grad_scale"], clip_grad_val=params["clip_grad_val"])
        ctx.counter.reset()
        t0 = time.time()
        trace = LossTrace()
        _trainer(params["iters"], [trace], ctx.device).fit(m)
        ev = m.final_evaluation()
        grad = m.latents.grad
        extra["loss_trace"] = trace.losses
        extra["final_loss"] = round(float(ev.total.mean()), 5)
        if grad is not None:
            moved = 0.5 * params["grad_scale"] * grad.abs()
            extra["last_grad_fraction_at_clip"] = round(float((moved >= params["clip_grad_val"]).float().mean()), 4)
            extra["last_grad_abs_median"] = float(grad.abs().median())
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    n = len(exp.items)
    if ev is not None:
        images = ev.images.detach().float().cpu()
    if method not in ("doodl", "render"):
        extra["final_loss"] = round(float(ev.total.mean()), 5)
    if method == "render":
        compute = {"unet_forward_per_image": 0.0, "unet_backward_per_image": 0.0, "batched_unet_calls": 0}
    else:
        compute = ctx.counter.per_image(n, 2 if CFG_SCALE not in (0.0, 1.0) else 1)
    compute.update({"seconds_total": round(seconds, 2), "seconds_per_image": round(seconds / n, 3)})
    ref = None
    if exp.name == "aesthetic":
        ref = exp.images.get(f"unguided_{sampler}")
        metrics, ok, text = exp.verdict(images, exp.items, reference=ref if ref is not None else images)
    else:
        metrics, ok, text = exp.verdict(images, exp.items)
    seeds = [s for _, s in exp.items]
    summary = {k: bootstrap_ci(per_seed_means(v, seeds)) for k, v in metrics.items()}
    rec = {"key": key, "label": label, "method": method, "sampler": sampler, "params": params, "compute": compute,
           "metrics": summary, "per_item": {k: [round(x, 4) for x in v] for k, v in metrics.items()}, **extra}
    exp.runs[key] = rec
    exp.images[key] = images
    exp.extra.setdefault("_ok", {})[key] = ok
    exp.extra.setdefault("_text", {})[key] = text
    pm = summary[exp.primary]
    log(f"[{exp.name}] {label:32s} {exp.primary}={pm['mean']:.3f} [{pm['ci95'][0]:.3f}, {pm['ci95'][1]:.3f}]  "
        f"guide {exp.guide_metric}={summary[exp.guide_metric]['mean']:.3f}  "
        f"unet fwd/img {compute['unet_forward_per_image']} (bwd {compute['unet_backward_per_image']})  "
        f"{seconds:.1f} s", flush=True)
    return rec


def _doodl(ctx: Ctx, exp: Experiment, sampler: str, step: float) -> None:
    clip = ctx.args.clip
    run_method(ctx, exp, f"doodl_{sampler}_step{step:g}", f"DOODL-{sampler.upper()} (step {step:g})", "doodl",
               sampler, step=step, grad_scale=2 * step / clip, clip_grad_val=step, iters=ctx.mode["iters"])


def run_experiment(ctx: Ctx, exp: Experiment) -> None:
    """Unguided (DDIM, EDICT), the one-step scale sweep, DOODL-DDIM and DOODL-EDICT at the default step."""
    mode = ctx.mode
    t0 = time.time()
    run_method(ctx, exp, "render", "procedural render of the prompt", "render", "none")
    samplers = ctx.args.samplers
    for sampler in samplers:
        run_method(ctx, exp, f"unguided_{sampler}", f"unguided ({sampler.upper()})", "unguided", sampler)
    for s in mode["scales"]:
        run_method(ctx, exp, f"one_step_s{s:g}", f"one-step (scale {s:g})", "one_step", "ddim", scale=s)
    for sampler in samplers:
        _doodl(ctx, exp, sampler, mode["step"])
    # the best one-step scale by the evaluator's primary metric (ties: the smaller scale)
    one = [k for k in exp.runs if k.startswith("one_step_")]
    best = max(one, key=lambda k: (exp.runs[k]["metrics"][exp.primary]["mean"], -exp.runs[k]["params"]["scale"]))
    exp.extra["one_step_best"] = best
    step = mode["step"]
    exp.extra["headline"] = (["render"] + [f"unguided_{s}" for s in samplers] + [best]
                             + [f"doodl_{s}_step{step:g}" for s in samplers])
    exp.extra["seconds"] = round(time.time() - t0, 1)


def run_step_sweep(ctx: Ctx, exp: Experiment, deadline: float | None) -> list[str]:
    """Vocabulary expansion only: DOODL at other step sizes (run last; skipped past ``deadline``)."""
    skipped = []
    t0 = time.time()
    for step in ctx.mode["step_sweep"]:
        for sampler in ctx.mode["step_sweep_samplers"]:
            if deadline is not None and time.time() > deadline:
                skipped.append(f"{sampler} step {step:g}")
                log(f"[{exp.name}] deadline passed: skipping DOODL-{sampler.upper()} step {step:g}", flush=True)
                continue
            _doodl(ctx, exp, sampler, step)
    exp.extra["seconds"] = round(exp.extra["seconds"] + time.time() - t0, 1)
    return skipped


# ------------------------------------------------------------------------------------------------ reporting
def fmt(metric: dict, desc: dict) -> str:
    k = 100.0 if desc["percent"] else 1.0
    nd = 0 if desc["percent"] else 2
    lo, hi = metric["ci95"]
    unit = "%" if desc["percent"] else ""
    return f"{metric['mean'] * k:.{nd}f}{unit} [{lo * k:.{nd}f}, {hi * k:.{nd}f}]"


def method_setting(rec: dict, mode: dict) -> str:
    if rec["method"] == "render":
        return "no model: the data renderer"
    if rec["method"] == "unguided":
        return f"{mode['steps']} steps"
    if rec["method"] == "one_step":
        return f"grad_scale {rec['params']['scale']:g}"
    p = rec["params"]
    return f"{p['iters']} it, step {p['step']:g} (grad_scale {p['grad_scale']:g}, clip_grad_val {p['clip_grad_val']:g})"


def table(exp: Experiment, keys: list[str], mode: dict, best: str | None) -> list[str]:
    descs = exp.metrics
    head = ["method", "setting"] + [d["label"] for d in descs] + ["UNet evals/img (of which backprop'd)", "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        r = exp.runs[k]
        label = r["label"].split(" (")[0] if r["method"] != "unguided" else r["label"]
        if k == best:
            label += " (best scale by evaluator)"
        cells = [label, method_setting(r, mode)] + [fmt(r["metrics"][d["name"]], d) if d["name"] in r["metrics"] else "-"
                                                    for d in descs]
        c = r["compute"]
        cells += [f"{c['unet_forward_per_image']:g} ({c['unet_backward_per_image']:g})", f"{c['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_table(exps: list[Experiment]) -> list[str]:
    """One row per experiment and judge: the primary metric of every headline method."""
    first = exps[0]
    cols = [("one-step (best scale)" if k == first.extra["one_step_best"] else
             "procedural render (reference)" if k == "render" else first.runs[k]["label"].split(" (step")[0])
            for k in first.extra["headline"]]
    lines = ["## Summary", "", "| experiment | measure | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for exp in exps:
        for name in (exp.primary, exp.guide_metric):
            d = next(x for x in exp.metrics if x["name"] == name)
            cells = [fmt(exp.runs[k]["metrics"][name], d) for k in exp.extra["headline"]]
            lines.append(f"| {exp.name} | {d['label']} | " + " | ".join(cells) + " |")
        c = [exp.runs[k]["compute"] for k in exp.extra["headline"]]
        lines.append(f"| {exp.name} | compute: UNet evals/img; s/img | " + " | ".join(
            f"{x['unet_forward_per_image']:g}; {x['seconds_per_image']:.2f} s" for x in c) + " |")
    best = {e.name: e.runs[e.extra["one_step_best"]]["params"]["scale"] for e in exps}
    lines += ["", "One-step: the best scale of the sweep by the evaluator's primary metric (optimistic for the baseline): "
              + ", ".join(f"{k} {v:g}" for k, v in best.items()) + "."]
    return lines


def targets_check(exp: Experiment, mode: dict) -> dict:
    if exp.name != "vocab":
        return {}
    step = mode["step"]
    one = exp.runs[exp.extra["one_step_best"]]["metrics"]
    out = {}
    for sampler in [s for s in ("edict", "ddim") if f"doodl_{s}_step{step:g}" in exp.runs]:
        ung = exp.runs.get("unguided_ddim", exp.runs[f"unguided_{sampler}"])["metrics"]
        d = exp.runs[f"doodl_{sampler}_step{step:g}"]["metrics"]
        gain = 100 * (d["evaluator_target"]["mean"] - one["evaluator_target"]["mean"])
        out[f"DOODL-{sampler.upper()}"] = {
            "evaluator_accuracy_pct": round(100 * d["evaluator_target"]["mean"], 1),
            "one_step_best_accuracy_pct": round(100 * one["evaluator_target"]["mean"], 1),
            "unguided_accuracy_pct": round(100 * ung["evaluator_target"]["mean"], 1),
            "gain_over_one_step_points": round(gain, 1),
            "colour_kept_pct": round(100 * d["colour_kept"]["mean"], 1),
            "beats_one_step_by_20_points": gain >= 20,
            "colour_kept_at_least_95": 100 * d["colour_kept"]["mean"] >= 95,
            "doodl_beats_unguided": d["evaluator_target"]["mean"] > ung["evaluator_target"]["mean"],
            "one_step_beats_unguided": one["evaluator_target"]["mean"] > ung["evaluator_target"]["mean"],
        }
        out[f"DOODL-{sampler.upper()}"]["met"] = all(v for k, v in out[f"DOODL-{sampler.upper()}"].items()
                                                     if isinstance(v, bool))
    return out


def write_outputs(ctx: Ctx, exps: list[Experiment], meta: dict) -> dict:
    out, mode = ctx.out, ctx.mode
    res = {"meta": meta, "config": {**mode, "cfg_scale": CFG_SCALE, "clip": ctx.args.clip, "momentum": 0.9,
                                     "perturb_grad_scale": 1e-4, "timestep_grid": "official", "tied_latents": True,
                                     "mix_weight": 0.93, "backprop": ctx.args.backprop, "renormalize_latents": True,
                                     "num_cuts": 0, "one_step_sampler": "ddim", "one_step": "official (latent_traversal off)"},
           "experiments": {}}
    md = [f"# DOODL in the shapes world ({meta['mode']} run)", "",
          f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; {meta['date']}; total {meta['total_seconds']:.0f} s.  ",
          f"Every method: {mode['steps']} sampler steps, CFG {CFG_SCALE}; DOODL {mode['iters']} iterations of the framework's "
          f"official update (momentum 0.9, clip_grad_val = step and grad_scale = 2 step / {ctx.args.clip:g}, so that `step` bounds each "
          f"element's move per iteration before momentum; perturb_grad_scale 1e-4, tied latents, renormalised latents, official grid, backprop `{ctx.args.backprop}`); "
          "the official one-step baseline (unconditional x0 estimate) on DDIM, its grad_scale swept. Mean [95% bootstrap interval over "
          "seeds: " + ", ".join(f"{e.name} {len(e.seeds)}" for e in exps) + "]. UNet evaluations per image counted by a forward hook (a CFG pair = 1); "
          "seconds per image = the run's wall clock / its images (batched).", ""]
    md += summary_table(exps) + [""]
    for exp in exps:
        best = exp.extra["one_step_best"]
        e = {"title": exp.title, "description": exp.description, "prompts": exp.prompts, "seeds": exp.seeds,
             "primary_metric": exp.primary, "guide_metric": exp.guide_metric, "metrics": exp.metrics,
             "headline": exp.extra["headline"], "one_step_best": best,
             "one_step_best_note": "scale chosen by the evaluator's primary metric over the sweep (optimistic for the baseline)",
             "seconds": exp.extra["seconds"], "runs": exp.runs}
        for k in ("targets", "specs", "sets"):
            if k in exp.extra:
                e[k] = exp.extra[k]
        tc = targets_check(exp, mode)
        if tc:
            e["targets_check"] = tc
        res["experiments"][exp.name] = e
        md += [f"## {exp.title}", "", exp.description, ""]
        md += table(exp, exp.extra["headline"], mode, best)
        sweep = [k for k in exp.runs if k not in exp.extra["headline"]]
        if sweep:
            md += ["", "Sweeps (one-step scale; DOODL step):", ""] + table(exp, sweep, mode, None)
        if tc:
            md += ["", "Targets (evaluator): " + "; ".join(
                f"{k}: {v['evaluator_accuracy_pct']}% vs one-step best {v['one_step_best_accuracy_pct']}% "
                f"(gain {v['gain_over_one_step_points']:+.1f} points, target +20), colour kept {v['colour_kept_pct']}% "
                f"(target 95%), unguided {v['unguided_accuracy_pct']}% -> {'MET' if v['met'] else 'MISSED'}"
                for k, v in tc.items())]
        md += ["", f"![{exp.name} bars]({exp.name}_bars.png) ![{exp.name} grid]({exp.name}_grid.png)", ""]
        # figures
        gdesc = next(d for d in exp.metrics if d["name"] == exp.primary)
        hdesc = next(d for d in exp.metrics if d["name"] == exp.guide_metric)
        k = 100.0 if gdesc["percent"] else 1.0
        groups = []
        for key in exp.extra["headline"] + [x for x in exp.runs if x.startswith("doodl_") and x not in exp.extra["headline"]]:
            r = exp.runs[key]
            vals = {}
            for sname, d in (("evaluator: " + gdesc["label"], gdesc), ("guide: " + hdesc["label"], hdesc)):
                mm = r["metrics"][d["name"]]
                vals[sname] = (mm["mean"] * k, mm["ci95"][0] * k, mm["ci95"][1] * k)
            lab = r["label"] + (" best" if key == best else "")
            groups.append({"label": lab, "values": vals})
        draw_bars(groups, ["evaluator: " + gdesc["label"], "guide: " + hdesc["label"]], out / f"{exp.name}_bars.png",
                  f"{exp.title}: mean, 95% bootstrap CI over seeds", exp.ymax)
        rows = []
        ncol = min(len(exp.seeds), 8)
        P, S = len(exp.prompts), len(exp.seeds)
        cols = [(j % P) * S + j for j in range(ncol)]
        for key in exp.extra["headline"] + [x for x in exp.runs if x.startswith("doodl_") and x not in exp.extra["headline"]]:
            r = exp.runs[key]
            rows.append({"label": r["label"] + (" best" if key == best else ""),
                         "images": exp.images[key][cols],
                         "ok": [exp.extra["_ok"][key][c] for c in cols], "text": [exp.extra["_text"][key][c] for c in cols]})
        draw_grid(rows, [f"P{(j % P) + 1} seed {exp.seeds[j]}" for j in range(ncol)], out / f"{exp.name}_grid.png",
                  title=f"{exp.title} (border: green = evaluator success, red = failure)\n"
                  + "\n".join(f"P{i + 1}: {p}" + (f" -> {exp.extra['targets'][p]}" if "targets" in exp.extra else "")
                               for i, p in enumerate(exp.prompts)))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes (<= 5 min on 2 CPU cores)")
    g.add_argument("--tiny", action="store_true", help="minimal sizes for a schema test (use with --weights of random tiny models)")
    ap.add_argument("--weights", type=Path, default=None, help="shapes-world weights directory (default: the package's)")
    ap.add_argument("--experiments", nargs="*", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    ap.add_argument("--seeds", type=int, default=None, help="seeds per prompt (overrides the mode)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (overrides the mode)")
    ap.add_argument("--iters", type=int, default=None, help="DOODL iterations (overrides the mode)")
    ap.add_argument("--scales", type=float, nargs="+", default=None, help="one-step scales (overrides the mode)")
    ap.add_argument("--step-sweep", type=float, nargs="*", default=None,
                    help="extra DOODL steps for vocabulary expansion, DDIM then EDICT each (overrides the mode)")
    ap.add_argument("--clip", type=float, default=CLIP, help="DOODL element-wise gradient clip (lr = step / clip)")
    ap.add_argument("--backprop", default="checkpoint", choices=["checkpoint", "autograd", "reversible"])
    ap.add_argument("--samplers", nargs="+", default=["ddim", "edict"], choices=["ddim", "edict"],
                    help="samplers of the unguided and DOODL runs (one-step guidance always runs on DDIM)")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="skip the remaining vocabulary DOODL step sweep once this much time has passed")
    ap.add_argument("--device", default="cpu", help="cpu (the reference machine) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    a = ap.parse_args(argv)
    if a.weights is None:
        from doodl_lightning.shapes import weights_dir

        a.weights = weights_dir()
    mode_name = "tiny" if a.tiny else "quick" if a.quick else "full"
    mode = dict(MODES[mode_name])
    for k in ("seeds", "steps", "iters"):
        if getattr(a, k) is not None:
            mode[k] = getattr(a, k)
            if k == "seeds":
                mode["other_seeds"] = a.seeds
    if a.scales is not None:
        mode["scales"] = a.scales
    if a.step_sweep is not None:
        mode["step_sweep"] = a.step_sweep
        mode["step_sweep_samplers"] = ["ddim", "edict"]
    if any(getattr(a, k) is not None for k in ("seeds", "steps", "iters", "scales", "step_sweep")):
        mode_name = f"{mode_name} sizes with overrides"
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*random weights.*")  # the --tiny world's models
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load0 = os.getloadavg()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    torch.manual_seed(0)
    ctx = Ctx(a, mode, a.out)
    exps = []
    if a.deadline_minutes is None and mode_name == "full":
        a.deadline_minutes = FULL_SWEEP_DEADLINE_MINUTES
    deadline = None if a.deadline_minutes is None else t0 + 60 * a.deadline_minutes
    skipped: list[str] = []

    def write():
        meta = {"mode": mode_name,
                "command": "python experiments/benchmarks/shapes_eval.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine_description(ctx.device), "load_average_at_start": [round(x, 2) for x in load0],
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_commit": commit,
                "weights": str(a.weights), "total_seconds": round(time.time() - t0, 1),
                "complete": len(exps) == len(a.experiments) and done[0], "skipped_past_deadline": skipped}
        write_outputs(ctx, exps, meta)

    done = [False]
    for name in a.experiments:
        exp = BUILDERS[name](ctx)
        log(f"== {name}: {len(exp.prompts)} prompts x {len(exp.seeds)} seeds", flush=True)
        run_experiment(ctx, exp)
        exps.append(exp)
        write()  # results so far, rewritten after every experiment
    for exp in exps:
        if exp.name == "vocab" and mode["step_sweep"]:
            skipped += run_step_sweep(ctx, exp, deadline)
    done[0] = True
    write()
    log(f"wrote {a.out}/results.json, results.md and figures in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
