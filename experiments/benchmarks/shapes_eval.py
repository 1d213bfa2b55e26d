#!/usr/bin/env python
"""Does DOODL beat the cheaper alternatives at equal compute? The shapes world's held-out comparison (issue 14).

    python experiments/benchmarks/shapes_eval.py --quick --out DIR        # <= 5 min on 2 CPU cores
    python experiments/benchmarks/shapes_eval.py --out DIR --jobs 2       # the full protocol as parallel parts, merged
    python experiments/benchmarks/shapes_eval.py --out DIR                # the same in one process
    python experiments/benchmarks/shapes_eval.py --out DIR --experiments vocab --stage val     # in parts ...
    python experiments/benchmarks/shapes_eval.py --out DIR --experiments vocab --stage test --methods one_step
    python experiments/benchmarks/shapes_eval.py --out DIR --stage report                      # ... merged
    python experiments/benchmarks/shapes_eval.py --tiny --weights W --out DIR   # schema test, random tiny models

Four experiments, each on a VALIDATION split (its own seeds, and other prompts or other targets) and a TEST
split. Every knob of every method -- CFG, the one-step grad_scale, DOODL's update rule (official / Adam /
SGD-Nesterov with per-item gradient-norm clipping), step size and iteration count, best-of-N's CFG -- is
chosen on validation and written to ``<exp>/val.json`` before any test item is sampled; the test run reads
it. DOODL's configurations are compared at ``Plan.iters``; the chosen one's curve runs on to ``iters_max``
and the iteration count is its best point. Methods on test: unguided (best-of-1), the official one-step
baseline, best-of-N (N = 1 .. n_max, read from one search: N = 4, 16 and N at DOODL's UNet evaluations and
at DOODL's seconds), DOODL-DDIM, and on a test subset DOODL-EDICT at the same steps, DOODL-DDIM with
cutouts and DOODL-EDICT at the paper's 50 steps.

1. ``vocab``: vocabulary expansion. The diffusion model only read "polygon"; the shapes classifier (guide)
   asks for a triangle / square / pentagon / hexagon. Evaluator: fine class, colour and size kept.
2. ``compositional``: shapes-CLIP text guidance toward two-object prompts; evaluator per image half.
3. ``aesthetic``: maximise the shapes aesthetic head; evaluator: its quality estimate, prompt kept.
4. ``personalisation``: shapes-CLIP image guidance toward 4 reference renders sharing colour and background.

Statistics over test items: mean and 95% bootstrap interval per method; for DOODL - one-step and DOODL -
best-of-N the paired bootstrap interval of the difference and an exact sign test. Outputs in ``--out``:
``results.json``, ``results.md``, ``<exp>_compute.png`` (evaluator against UNet evaluations per image),
``<exp>_examples.png``, ``<exp>/val.json`` (the frozen choices and every validation run), ``<exp>/test/``
(one JSON per method: the parts that ``--stage report`` merges).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from doodl_lightning.console import quiet_lightning  # noqa: E402
from doodl_lightning.guidance import AestheticGuidance, ClassifierGuidance, CLIPImageGuidance, CLIPTextGuidance  # noqa: E402
from doodl_lightning.io import save_png  # noqa: E402
from doodl_lightning.shapes import ShapesWeights  # noqa: E402
from doodl_lightning.shapes import data as D  # noqa: E402

from common import git_state, machine_description  # noqa: E402
from compare import (BUDGET_BEGIN, BUDGET_END, TEST_METHODS, Plan, Runner, Task, readme_budget_table,  # noqa: E402
                     readme_table, run_test, save_json, save_test, summarise, task_info, update_readme, validate,
                     write_report)

EXPERIMENTS = ("vocab", "compositional", "aesthetic", "personalisation")
DESCRIPTIONS = {
    "vocab": "Prompt 'a <size> <colour> polygon'; the guide (shapes classifier) asks for one of the 4 polygon classes "
             "the diffusion model never read (triangle, square, pentagon, hexagon). Evaluator: the independent shapes "
             "evaluator's fine class; colour and size kept.",
    "compositional": "Prompt = guidance text: two small objects (coarse shape + colour) on either side of a left/right "
                     "or top/bottom relation, and a background. Evaluator per half-image (other half filled with the "
                     "border's median colour); guide's verdict: shapes-CLIP ranks the prompt above its colour-, shape- "
                     "and side-swapped variants (chance 25%).",
    "aesthetic": "Prompt 'a <colour> <shape>' (no quality words). Guide: the shapes aesthetic head, maximised. "
                 "Evaluator: its quality estimate (0-10, of the procedural 5 sharpness + 5 contrast score); prompt kept.",
    "personalisation": "Reference renders per set share a colour and a background; the prompt 'a <size> <shape>' names "
                       "neither. Evaluator: colour and background agree with the set's (chance about 1/18); guide's "
                       "verdict: the nearest reference set by shapes-CLIP is its own.",
}
# the rates' figures run 0-100%; the aesthetic quality is drawn on its data's range (the evaluator's regression
# head passes its nominal 10 on guided images, and the methods differ by tenths)
YMAX = {"vocab": 100.0, "compositional": 100.0, "personalisation": 100.0}

# sizes: (prompts, seeds) of the test and validation splits, and the sweep plan
MODES = {
    # the subset variants (EDICT, cutouts, EDICT at the paper's steps) run where there is a target to explain
    "full": dict(vocab=((16, 16), (8, 4)), other=((8, 12), (4, 6)), aesthetic=((12, 8), (6, 4)),
                 variants=("vocab", "aesthetic"), plan=Plan()),
    "quick": dict(vocab=((4, 2), (4, 1)), other=((2, 2), (2, 1)), aesthetic=((2, 2), (2, 1)), variants=("vocab",),
                  search=("vocab",),
                  plan=Plan(steps=5, cfgs=(2.5,), scales=(0.3, 3.0), doodl_steps=(0.1,), iters=3, iters_max=5,
                            n_max=8, val_n_max=None, paper_steps=10, num_cuts=2, extras_items=4, paper_items=2,
                            val_extras_items=2, fk_particles=2, zo_radii=(0.5,),
                            refine_candidates=(2,), population_members=(2,), eot_samples=(2,), margin_stops=(0.5,),
                            budgets=(2, 8),
                            fk_lmbdas=(10.0,))),
    "tiny": dict(vocab=((2, 2), (2, 1)), other=((1, 2), (1, 1)), aesthetic=((1, 2), (1, 1)),
                 plan=Plan(steps=2, cfgs=(2.5,), scales=(1.0, 10.0, 100.0), doodl_steps=(0.1,), adam_lrs=(0.03,),
                           sgd_lrs=(1.0,), iters=2, iters_max=3, n_max=4, val_n_max=None, paper_steps=4, num_cuts=2,
                           extras_items=2, paper_items=2, val_extras_items=1, fk_lmbdas=(10.0,), fk_particles=2,
                           zo_radii=(0.5,), refine_candidates=(2,), population_members=(2,), eot_samples=(2,),
                           margin_stops=(0.5,), budgets=(2, 4))),
}
# the test parts a parallel run (--jobs) schedules per experiment, heaviest first
TEST_PARTS = (("doodl_ddim",), ("best_of_n", "one_step"), ("doodl_edict_paper_steps",), ("doodl_edict", "doodl_ddim_cutouts"),
              ("fk_steering", "zero_order"), ("search_refine",), ("population_doodl", "doodl_eot"), ("doodl_margin",))
VARIANTS = ("doodl_edict", "doodl_ddim_cutouts", "doodl_edict_paper_steps")
SEED_BASE = {"vocab": 10_000, "compositional": 20_000, "aesthetic": 30_000, "personalisation": 40_000}
VAL_SEED_OFFSET = 5_000  # validation seeds: SEED_BASE + 5000 + i; test seeds: SEED_BASE + i
# DOODL + margin stop's thresholds in each guide's loss units (the plan's 0.1 / 0.5 are the classifier's -log p*):
# between the validation's unguided loss and where validated DOODL's items end after 32 iterations (their median
# and lower quartile: aesthetic -10.7 / -11.4, CLIP text 0.74 / 0.67, CLIP image 0.83 / 0.57), so that within the
# searches' 8 iterations some items stop and some do not. Aesthetic: score >= 10 / 10.5 (unguided ~9); CLIP: the
# spherical distance 2 asin(|a - b| / 2)^2: 0.75 / 0.85 is cosine 0.34 / 0.26, 0.6 / 0.9 is cosine 0.46 / 0.23.
AESTHETIC_MARGIN_STOPS = (-10.0, -10.5)
CLIP_TEXT_MARGIN_STOPS = (0.75, 0.85)
CLIP_IMAGE_MARGIN_STOPS = (0.6, 0.9)

log = print


# ------------------------------------------------------------------------------------------------ helpers
def metric_list(labels: dict[str, str], judges: dict[str, str] | None = None, not_rates: tuple = ()) -> list[dict]:
    """The reported measures: key, label, who judges it (``evaluator`` unless ``judges`` says ``guide`` or
    ``pixels``), and whether it is a rate (shown in %)."""
    judges = judges or {}
    return [{"name": k, "label": v, "judge": judges.get(k, "evaluator"), "percent": k not in not_rates}
            for k, v in labels.items()]


def _on(guide: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    p = next(guide.parameters(), None)
    return images if p is None else images.to(p.device)


def coarse_of(fine_index: int) -> str:
    return D.COARSE_SHAPES[D.FINE_TO_COARSE[int(fine_index)]]


def seeds_of(name: str, split: str, n: int) -> list[int]:
    """The split's seeds: its own range per experiment, validation and test disjoint."""
    base = SEED_BASE[name] + (VAL_SEED_OFFSET if split == "val" else 0)
    return [base + i for i in range(n)]


class Ctx:
    def __init__(self, args, mode: dict):
        self.args, self.mode = args, mode
        self.weights = ShapesWeights(Path(args.weights))
        self.device = torch.device(args.device)
        self.evaluator = self.weights.evaluator(self.device)

    def size(self, name: str, split: str) -> tuple[int, int]:
        test, val = self.mode.get(name, self.mode["other"])
        return test if split == "test" else val


# ------------------------------------------------------------------------------------------------ experiments
def build_vocab(ctx: Ctx, split: str) -> Task:
    """Test: prompts over all sizes and colours, 4 per hidden class. Validation: (prompt, target) pairs that
    are not test pairs (the prompt space has only 18 strings, so a validation prompt may be a test prompt
    with another target class) on other seeds."""
    combos = [(s, c) for s in D.SIZES for c in D.COLOURS]
    random.Random(1).shuffle(combos)
    n_test, n_val = ctx.mode["vocab"][0][0], ctx.mode["vocab"][1][0]
    test = {f"a {s} {c} polygon": 1 + i % 4 for i, (s, c) in enumerate(combos[:n_test])}
    if split == "test":
        targets = test
    else:
        rest = combos[n_test:] + combos[:n_test]
        targets = {}
        for i, (s, c) in enumerate(rest[:n_val]):
            p = f"a {s} {c} polygon"
            cls = 1 + i % 4
            if test.get(p) == cls:
                cls = 1 + (cls % 4)
            targets[p] = cls
    want = {p: {"size": D.SIZES.index(p.split()[1]), "colour": D.COLOURS.index(p.split()[2])} for p in targets}

    def guidance(num_cuts: int):
        return ClassifierGuidance(target=targets, num_cuts=num_cuts, **ctx.weights.classifier_kwargs())

    judge = guidance(0)

    def verdict(images, items, reference=None):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            g = judge.logits(_on(judge, images)).mean(1).argmax(-1).cpu()
        m = {k: [] for k in ("evaluator_target", "guide_target", "colour_kept", "size_kept", "target_and_colour",
                             "polygon_kept")}
        ok, text = [], []
        for i, (p, _) in enumerate(items):
            t = targets[p]
            hit = int(ev["shape"][i]) == t
            col = int(ev["colour"][i]) == want[p]["colour"]
            m["evaluator_target"].append(float(hit))
            m["guide_target"].append(float(int(g[i]) == t))
            m["colour_kept"].append(float(col))
            m["size_kept"].append(float(int(ev["size"][i]) == want[p]["size"]))
            m["target_and_colour"].append(float(hit and col))
            m["polygon_kept"].append(float(coarse_of(ev["shape"][i]) == "polygon"))
            ok.append(hit)
            text.append(f"{D.SHAPES[int(ev['shape'][i])]} ({D.SHAPES[t][:4]})")
        return m, ok, text

    metrics = metric_list(dict(evaluator_target="target class (evaluator)", guide_target="target class (guide)",
                               colour_kept="colour kept", size_kept="size kept", target_and_colour="target and colour",
                               polygon_kept="still a polygon"), judges={"guide_target": "guide"})
    return Task("vocab", split, list(targets), seeds_of("vocab", split, ctx.size("vocab", split)[1]), guidance,
                verdict, "evaluator_target", "guide_target", metrics,
                info={"targets": {p: D.SHAPES[t] for p, t in targets.items()}})


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


def _split_prompts(generate, n_test: int, n_val: int, split: str) -> list:
    """Distinct prompts from one seeded generator: the first ``n_test`` are the test's, the next ``n_val``
    the validation's (so the two never share a prompt)."""
    seen, out = set(), []
    while len(out) < n_test + n_val:
        key, value = generate()
        if key not in seen:
            seen.add(key)
            out.append((key, value))
    return out[:n_test] if split == "test" else out[n_test:]


def build_compositional(ctx: Ctx, split: str) -> Task:
    rng = random.Random(2)

    def generate():
        axis = rng.choice(["h", "v"])
        positions = ("left", "right") if axis == "h" else ("top", "bottom")
        s1, s2 = rng.sample(D.COARSE_SHAPES, 2)
        c1, c2 = rng.sample(D.COLOURS, 2)
        spec = {"axis": axis, "positions": positions, "objects": [(s1, c1), (s2, c2)], "background": rng.choice(D.BACKGROUNDS)}
        return _swap_captions(spec)[0], spec

    (n_test, _), (n_val, _) = ctx.mode["other"]
    specs = dict(_split_prompts(generate, n_test, n_val, split))

    def guidance(num_cuts: int):
        return CLIPTextGuidance(num_cuts=num_cuts, **ctx.weights.clip_kwargs())

    judge = guidance(0)

    def verdict(images, items, reference=None):
        specs_i = [specs[p] for p, _ in items]
        axis = [s["axis"] for s in specs_i]
        ev_full = ctx.evaluator(images)
        ev = [ctx.evaluator(region_views(images, axis, first=k == 0)) for k in range(2)]
        with torch.no_grad():
            img = judge.encoder(_on(judge, images))[:, 0]
            prefer = [float(int((judge.encode_text(_swap_captions(s)).to(img.device) @ img[i]).argmax()) == 0)
                      for i, s in enumerate(specs_i)]
        m = {k: [] for k in ("object_acc", "guide_prefers_prompt", "shape_acc", "colour_acc", "background_acc", "all_correct")}
        ok, text = [], []
        for i, s in enumerate(specs_i):
            objs = [(coarse_of(ev[k]["shape"][i]) == shape, D.COLOURS[int(ev[k]["colour"][i])] == colour)
                    for k, (shape, colour) in enumerate(s["objects"])]
            bg = D.BACKGROUNDS[int(ev_full["background"][i])] == s["background"]
            m["object_acc"].append(sum(float(a and b) for a, b in objs) / 2)
            m["guide_prefers_prompt"].append(prefer[i])
            m["shape_acc"].append(sum(float(a) for a, _ in objs) / 2)
            m["colour_acc"].append(sum(float(b) for _, b in objs) / 2)
            m["background_acc"].append(float(bg))
            m["all_correct"].append(float(all(a and b for a, b in objs) and bg))
            n_ok = sum(a and b for a, b in objs)
            ok.append(n_ok == 2)
            text.append(f"{n_ok}/2 objects{' bg' if bg else ''}")
        return m, ok, text

    metrics = metric_list(dict(object_acc="objects right (evaluator)", guide_prefers_prompt="guide prefers prompt over swaps",
                               shape_acc="shape", colour_acc="colour", background_acc="background",
                               all_correct="everything right"), judges={"guide_prefers_prompt": "guide"})
    return Task("compositional", split, list(specs), seeds_of("compositional", split, ctx.size("compositional", split)[1]),
                guidance, verdict, "object_acc", "guide_prefers_prompt", metrics, binary=True,
                info={"specs": specs}, grids={"margin_stops": CLIP_TEXT_MARGIN_STOPS})


def build_aesthetic(ctx: Ctx, split: str) -> Task:
    rng = random.Random(3)

    def generate():
        colour, coarse = rng.choice(D.COLOURS), rng.choice(D.COARSE_SHAPES)
        return D.with_article(f"{colour} {coarse}"), (colour, coarse)

    (n_test, _), (n_val, _) = ctx.mode["aesthetic"]
    want = dict(_split_prompts(generate, n_test, n_val, split))

    def guidance(num_cuts: int):
        # no [1, 10] clip of the score (the official one, for LAION heads scoring ~4-7): this head's unguided images
        # already score ~9 and guided ones pass 10, where the clipped loss is flat (a deliberate difference; the
        # clamp to [-1, 1] and the pooled cutouts stay official)
        return AestheticGuidance(head=ctx.weights.aesthetic_head, num_cuts=num_cuts, score_clip=None,
                                 **ctx.weights.clip_kwargs())

    judge = guidance(0)

    def verdict(images, items, reference=None):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            score = judge.score(_on(judge, images)).cpu()
        m = {k: [] for k in ("evaluator_quality", "guide_score", "prompt_kept")}
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
        return m, ok, text

    metrics = metric_list(dict(evaluator_quality="quality (evaluator, 0-10)", guide_score="aesthetic head score (guide)",
                               prompt_kept="prompt kept (shape+colour)", pixel_drift="pixel drift vs unguided"),
                          judges={"guide_score": "guide", "pixel_drift": "pixels"},
                          not_rates=("evaluator_quality", "guide_score", "pixel_drift"))
    return Task("aesthetic", split, list(want), seeds_of("aesthetic", split, ctx.size("aesthetic", split)[1]), guidance,
                verdict, "evaluator_quality", "guide_score", metrics, binary=False,
                info={"prompt_attributes": {p: list(v) for p, v in want.items()}},
                grids={"margin_stops": AESTHETIC_MARGIN_STOPS})


def build_personalisation(ctx: Ctx, split: str) -> Task:
    rng = random.Random(4)
    pool = D.sample_attributes(4_444_000, 4000, p_degraded=0.0)

    def generate():
        colour, bg = rng.choice(D.COLOURS), rng.choice(D.BACKGROUNDS)
        size, coarse = rng.choice(D.SIZES), rng.choice(D.COARSE_SHAPES)
        return (colour, bg), (f"a {size} {coarse}", coarse)

    (n_test, _), (n_val, _) = ctx.mode["other"]
    chosen = _split_prompts(generate, n_test, n_val, split)
    ref_dir = ctx.args.out / "personalisation" / f"refs_{split}"
    ref_dir.mkdir(parents=True, exist_ok=True)
    sets, want = {}, {}
    for k, ((colour, bg), (prompt, coarse)) in enumerate(chosen):
        while prompt in sets:  # one reference set per prompt string within a split
            prompt = prompt.replace("a ", "a very ", 1)
        sel = ((pool.colour[:, 0] == D.COLOURS.index(colour)) & (pool.background == D.BACKGROUNDS.index(bg))
               & (pool.n_objects == 1)).nonzero().flatten()[:4]
        sub = D.Attributes(**{a: v[sel] for a, v in pool.__dict__.items()})
        paths = []
        for j, im in enumerate(D.render(sub)):
            path = ref_dir / f"set{k}_{colour}_{bg}_{j}.png"
            save_png(path, im)
            paths.append(str(path))
        sets[prompt], want[prompt] = paths, (colour, bg, coarse)

    def guidance(num_cuts: int):
        return CLIPImageGuidance(references=sets, num_cuts=num_cuts, **ctx.weights.clip_kwargs())

    judge = guidance(0)

    def verdict(images, items, reference=None):
        ev = ctx.evaluator(images)
        with torch.no_grad():
            nearest = (judge.embed_images(_on(judge, images)) @ judge.targets.float().t()).argmax(-1).cpu()
        m = {k: [] for k in ("agreement", "guide_nearest_set", "colour_match", "background_match", "prompt_shape_kept")}
        ok, text = [], []
        for i, (p, _) in enumerate(items):
            colour, bg, coarse = want[p]
            c = D.COLOURS[int(ev["colour"][i])] == colour
            b = D.BACKGROUNDS[int(ev["background"][i])] == bg
            m["agreement"].append(float(c and b))
            m["guide_nearest_set"].append(float(int(nearest[i]) == judge.index[p]))
            m["colour_match"].append(float(c))
            m["background_match"].append(float(b))
            m["prompt_shape_kept"].append(float(coarse_of(ev["shape"][i]) == coarse))
            ok.append(c and b)
            text.append(f"{D.COLOURS[int(ev['colour'][i])]}/{D.BACKGROUNDS[int(ev['background'][i])]}")
        return m, ok, text

    metrics = metric_list(dict(agreement="colour and background agree (evaluator)",
                               guide_nearest_set="guide: nearest reference set is its own", colour_match="colour",
                               background_match="background", prompt_shape_kept="prompt shape kept"),
                          judges={"guide_nearest_set": "guide"})
    return Task("personalisation", split, list(sets), seeds_of("personalisation", split, ctx.size("personalisation", split)[1]),
                guidance, verdict, "agreement", "guide_nearest_set", metrics,
                info={"sets": {p: {"colour": w[0], "background": w[1]} for p, w in want.items()}},
                grids={"margin_stops": CLIP_IMAGE_MARGIN_STOPS})


BUILDERS = {"vocab": build_vocab, "compositional": build_compositional, "aesthetic": build_aesthetic,
            "personalisation": build_personalisation}


# ------------------------------------------------------------------------------------------------ targets
def targets(summary: dict) -> dict:
    """Issue 14's targets, on the test split (evaluator's measure)."""
    name, rows, pairs = summary["name"], {r["key"]: r for r in summary["rows"]}, summary["paired"]
    d = rows["doodl_ddim"]
    n_s = summary["n_equal_compute"]["seconds"]
    bon_key = f"best_of_{n_s}"
    if name == "vocab":
        gain_one = 100 * (d["primary"]["mean"] - rows["one_step"]["primary"]["mean"])
        gain_bon = 100 * (d["primary"]["mean"] - rows[bon_key]["primary"]["mean"])
        colour = 100 * d["other"].get("colour_kept", float("nan"))
        lows = {k: 100 * pairs[k]["ci95"][0] for k in (f"doodl_ddim - one_step", f"doodl_ddim - {bon_key}")}
        return {"vocab": {"met": gain_one >= 20 and gain_bon >= 10 and colour >= 95 and all(v > 0 for v in lows.values()),
                          "detail": f"DOODL-DDIM - one-step {gain_one:+.1f} points (target +20), - best-of-{n_s} "
                                    f"(DOODL's seconds) {gain_bon:+.1f} (target +10), colour kept {colour:.0f}% (target "
                                    f"95%), paired interval lower ends " + ", ".join(f"{v:+.1f}" for v in lows.values())}}
    if name == "aesthetic":
        lows = {k: pairs[k]["ci95"][0] for k in (f"doodl_ddim - one_step", f"doodl_ddim - {bon_key}")}
        kept = 100 * d["other"].get("prompt_kept", float("nan"))
        return {"aesthetic": {"met": all(v > 0 for v in lows.values()) and kept >= 80,
                              "detail": "paired interval lower ends " + ", ".join(f"{k} {v:+.2f}" for k, v in lows.items())
                                        + f", prompt kept {kept:.0f}% (target 80%)"}}
    return {}


# ------------------------------------------------------------------------------------------------ parallel parts
def run_parts(a, argv: list[str], variants: tuple) -> dict:
    """Run the protocol as separate processes (``a.jobs`` at a time, threads split between them): each
    experiment's validation, then its test parts as soon as its choices are frozen. Returns the run's record
    (every part's command, log, seconds and exit status); raises SystemExit if a part failed."""
    import subprocess

    threads = max(1, (a.threads or os.cpu_count() or 1) // a.jobs)
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(a.out), "--device", a.device,
            "--threads", str(threads), "--no-report"]
    base += ["--quick"] if a.quick else ["--tiny"] if a.tiny else []
    base += ["--weights", str(a.weights)] + (["--extras-items", str(a.extras_items)] if a.extras_items else [])
    base += ["--no-variants"] if a.no_variants else []
    jobs = []
    if a.stage in ("val", "all"):
        jobs += [{"name": f"{e}_val", "after": None, "args": ["--experiments", e, "--stage", "val"]} for e in a.experiments]
    if a.stage in ("test", "all"):
        for e in a.experiments:
            for part in TEST_PARTS:
                methods = [m for m in part if m in a.methods
                           and (m not in VARIANTS or (e in variants and not a.no_variants))]
                if methods:
                    jobs.append({"name": f"{e}_test_{'+'.join(methods)}", "args": ["--experiments", e, "--stage", "test",
                                 "--methods", *methods], "after": f"{e}_val" if a.stage == "all" else None})
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    t0, running, done, pending = time.time(), {}, {}, list(jobs)
    log(f"{len(jobs)} parts, {a.jobs} at a time, {threads} torch thread(s) each; logs in {a.out / 'logs'}", flush=True)
    while pending or running:
        ready = [j for j in pending if j["after"] is None or done.get(j["after"], {}).get("rc") == 0]
        blocked = [j for j in pending if j["after"] in done and done[j["after"]]["rc"] != 0]
        for j in blocked:  # its validation failed: nothing to test with
            pending.remove(j)
            done[j["name"]] = {"rc": None, "skipped": f"{j['after']} failed"}
        while ready and len(running) < a.jobs:
            j = ready.pop(0)
            pending.remove(j)
            path = a.out / "logs" / f"{j['name']}.log"
            fh = open(path, "w")
            proc = subprocess.Popen(base + j["args"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            running[j["name"]] = (proc, fh, time.time(), j)
            log(f"  start  {j['name']:48s} [{time.time() - t0:6.0f} s]", flush=True)
        time.sleep(1.0)
        for name, (proc, fh, t, j) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del running[name]
            done[name] = {"rc": proc.returncode, "seconds": round(time.time() - t, 1),
                          "command": " ".join(["python experiments/benchmarks/shapes_eval.py", *base[2:], *j["args"]]),
                          "log": str(Path("logs") / f"{name}.log")}
            log(f"  {'done ' if proc.returncode == 0 else 'FAILED'} {name:48s} [{time.time() - t0:6.0f} s] "
                f"{done[name]['seconds']:.0f} s", flush=True)
            if proc.returncode != 0:
                log((a.out / "logs" / f"{name}.log").read_text()[-3000:], flush=True)
    record = {"jobs": a.jobs, "threads_per_job": threads, "wall_seconds": round(time.time() - t0, 1), "parts": done}
    failed = [n for n, d in done.items() if d["rc"] != 0]
    if failed:
        save_json(a.out / "run_failed.json", record)
        raise SystemExit(f"error: parts failed: {', '.join(failed)} (their logs are in {a.out / 'logs'})")
    return record


# ------------------------------------------------------------------------------------------------ main
def validate_search_only(runner, ctx, name: str, exp_dir: Path, plan: Plan, a, meta) -> None:
    """``--stage val-search``: validate the search methods (``--methods`` among them) on an experiment whose val.json
    already holds the other methods' frozen choices (DOODL's update and CFG, best-of-N's CFG, which they take), at
    ``--search-chains`` chains per image, and add their choices and runs to it (rewritten atomically)."""
    from search_methods import METHODS, validate_search

    path = exp_dir / "val.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: --stage val-search adds to a finished validation; run --stage val")
    v = json.loads(path.read_text())
    chains = a.search_chains or plan.n_max
    if not 1 <= chains <= plan.n_max:
        raise SystemExit(f"error: --search-chains must be in [1, {plan.n_max}] (best-of-N's largest N), got {chains}")
    p = Plan(**{**plan.__dict__, "n_max": chains, "budgets": tuple(b for b in plan.budgets if b <= chains)})
    methods = [m for m in a.methods if m in METHODS]
    task = BUILDERS[name](ctx, "val")
    log(f"== {name} validation of {', '.join(methods)} at {chains} chains per image: {len(task.prompts)} prompts x "
        f"{len(task.seeds)} seeds", flush=True)
    t = time.time()
    more, runs = validate_search(runner, task, p, v["choices"], log, methods)
    # a method validated again replaces its earlier runs (another grid may have other run names)
    v["runs"] = {k: r for k, r in v["runs"].items() if k.split(" ")[0] not in methods}
    v["choices"].update(more)
    v["runs"].update(runs)
    v.setdefault("search_reruns", []).append({**meta(), "methods": methods, "chains": chains,
                                              "budgets": list(p.budgets), "seconds": round(time.time() - t, 1)})
    save_json(path, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes (<= 5 min on 2 CPU cores)")
    g.add_argument("--tiny", action="store_true", help="minimal sizes for a schema test (with --weights of tiny models)")
    ap.add_argument("--weights", type=Path, default=None, help="shapes-world weights directory (default: the package's)")
    ap.add_argument("--experiments", nargs="*", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    ap.add_argument("--stage", default="all", choices=["val", "val-search", "test", "report", "all"],
                    help="val: choose and freeze the knobs; test: run methods with the frozen choices; report: merge")
    ap.add_argument("--methods", nargs="*", default=list(TEST_METHODS), choices=TEST_METHODS, help="test methods to run")
    ap.add_argument("--search-chains", type=int, default=None,
                    help="val-search: the search methods' largest budget in chains per image (default the plan's n_max; "
                         "the budget table's budgets above it are left out for them)")
    ap.add_argument("--extras-items", type=int, default=None, help="test items of the subset methods (EDICT, cutouts)")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip DOODL-EDICT, cutouts and EDICT at the paper's steps (validation and test)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="rewrite this file's generated comparison table (between its markers) from the results")
    ap.add_argument("--device", default="cpu", help="cpu (the reference machine) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; split over --jobs)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the parts (each experiment's validation, then its test methods) as this many separate "
                         "processes at a time, then merge (2 on a 2-core CPU: one torch thread each)")
    ap.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a part of a --jobs run
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.stage == "val-search" and a.jobs > 1:
        ap.error("--stage val-search runs in one process (it rewrites each val.json): drop --jobs")
    if a.weights is None:
        from doodl_lightning.shapes import weights_dir

        a.weights = weights_dir()
    mode_name = "tiny" if a.tiny else "quick" if a.quick else "full"
    mode = dict(MODES[mode_name])
    plan = mode["plan"]
    if a.extras_items is not None:
        plan = Plan(**{**plan.__dict__, "extras_items": a.extras_items})
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*random weights.*")  # the --tiny world's models
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    commit, dirty = git_state()
    ctx = Ctx(a, mode)
    command = "python experiments/benchmarks/shapes_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def meta() -> dict:
        return {"mode": mode_name, "command": command, "machine": machine_description(ctx.device),
                "load_average": [round(x, 2) for x in os.getloadavg()], "git_commit": commit, "uncommitted": dirty,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan": plan.__dict__}

    runner = None
    if a.jobs > 1 and a.stage != "report":
        record = run_parts(a, argv, mode.get("variants", EXPERIMENTS))
        save_json(a.out / "run.json", {**record, "command": command, "machine": machine_description(ctx.device),
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "git_commit": commit, "uncommitted": dirty})
        a.stage = "report"
    if a.stage != "report":
        runner = Runner(ctx.weights.backbone(), ctx.device, plan.steps)
    for name in a.experiments:
        exp_dir = a.out / name
        if a.stage in ("val", "all"):
            task = BUILDERS[name](ctx, "val")
            log(f"== {name} validation: {len(task.prompts)} prompts x {len(task.seeds)} seeds", flush=True)
            t = time.time()
            # the subset variants (EDICT, cutouts, EDICT at the paper's steps): where the mode and --no-variants allow
            # the search methods: where the mode runs them (--quick: vocabulary only, to stay within its minutes)
            p = Plan(**{**plan.__dict__, "search": plan.search and name in mode.get("search", EXPERIMENTS)})
            v = validate(runner, task, p, extras=not a.no_variants and name in mode.get("variants", EXPERIMENTS))
            save_json(exp_dir / "val.json", {"task": task_info(task), "meta": {**meta(), "seconds": round(time.time() - t, 1)}, **v})
        if a.stage == "val-search":  # the search methods added to an existing validation (its choices kept)
            validate_search_only(runner, ctx, name, exp_dir, plan, a, meta)
        if a.stage in ("test", "all"):
            if not (exp_dir / "val.json").is_file():
                raise SystemExit(f"error: {exp_dir / 'val.json'} is missing: run --stage val first (the test run uses "
                                 "only choices frozen on validation)")
            choices = json.loads((exp_dir / "val.json").read_text())["choices"]
            task = BUILDERS[name](ctx, "test")
            for method in a.methods:
                if method not in choices:
                    continue
                t = time.time()
                rec = run_test(runner, task, plan, choices, method)
                save_test(a.out, task, method, rec, {**meta(), "seconds": round(time.time() - t, 1)})
                log(f"  [{name}/test] {method:28s} {task.primary}="
                    f"{sum(rec['metrics'][task.primary]) / len(rec['metrics'][task.primary]):.3f} "
                    f"({rec.get('items', len(task.items))} items, {time.time() - t:.0f} s)", flush=True)
    if a.no_report:
        return 0
    summaries = [summarise(a.out / n, targets) for n in EXPERIMENTS if (a.out / n / "val.json").is_file()]
    run = json.loads((a.out / "run.json").read_text()) if (a.out / "run.json").is_file() else None
    header = [f"# DOODL against one-step guidance and best-of-N in the shapes world ({mode_name} run)", "",
              f"Last command: `{command}`  ", f"Its machine: {machine_description(ctx.device)}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}.  ",
              "Every method samples with DDIM at the plan's steps through the framework (`DOODL`, `BestOfN`, "
              "`baselines.guided_sampling`); each part's own command, machine, load and seconds are in its JSON.", ""]
    if run is not None:
        header[-1:-1] = ["", f"Whole run: `{run['command']}` on {run['machine']}, {run['date']}: "
                         f"{run['wall_seconds'] / 60:.0f} min wall-clock as {len(run['parts'])} parts, {run['jobs']} at a "
                         f"time with {run['threads_per_job']} torch thread(s) each (`run.json`: every part's command and "
                         "seconds). Seconds per image below were measured with the parts sharing the cores."]
    write_report(a.out, summaries, header, DESCRIPTIONS, YMAX)
    if a.readme is not None:
        source = os.path.relpath(a.out / "results.md", a.readme.resolve().parent)
        update_readme(a.readme, readme_table(summaries, source))
        text = a.readme.read_text()
        if BUDGET_BEGIN in text and BUDGET_END in text:
            update_readme(a.readme, readme_budget_table(summaries, source), BUDGET_BEGIN, BUDGET_END)
    log(f"wrote {a.out}/results.md, results.json and figures in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
