"""Measure the shapes world against the quality bars of issue 5 and write the numbers
(``quality.json`` + ``QUALITY.md`` in the weights directory, and each model card's "Measured quality").

    python -m doodl_lightning.shapes.quality                      # the full report (~25 min, 1 CPU thread)
    python -m doodl_lightning.shapes.quality --quick [--out DIR]  # a real but short measurement (~6 min)
    python -m doodl_lightning.shapes.quality --smoke --out DIR    # tiny sizes: a test of the script

Bars: VAE PSNR >= 32 dB on fresh renders; evaluator >= 99% per attribute on fresh renders; unguided
generations match their prompt (per the evaluator) >= 90% for shape and colour; shapes-CLIP zero-shot
>= 90%; classifier >= 98% on fresh renders and robust (noise / shift). All renders use seeds never used
in training. Every model comes from ``ShapesWeights`` (the one accessor of the weights) and every model
call goes through the framework:

- VAE round trips: ``Backbone.encode_images`` (posterior mean) then ``Backbone.decode``.
- Unguided generations: ``Backbone.denoiser`` (batched classifier-free guidance) and
  ``sampling.sample_ddim`` on ``Schedule.from_scheduler(scheduler, steps, "model")``, the model's own DDIM
  grid (50 steps: 981, 961, ..., 1, then abar_0 -- the grid diffusers' pipeline uses; checked to give the
  pipeline's images to 1e-5), from each seed's ``data.initial_noise``.
- Classifier, shapes-CLIP and aesthetic-head measurements: the guidance classes themselves
  (``ClassifierGuidance.logits``, ``CLIPTextGuidance.encode_text`` / ``embed_images``,
  ``AestheticGuidance.score``), whole images (``num_cuts=0``).

Guide vs evaluator: for every guidance model, the framework's ``DOODL`` LightningModule (one shared
``Backbone``) is fitted by a ``lightning.Trainer`` and the optimised images are judged by the guide and by
the independent evaluator: how often the guide believes it reached the target vs how often the evaluator
agrees. Settings (the update step chosen on held-out items, below):

- chain: ``sampler="ddim"``, ``backprop="checkpoint"`` (exact gradient, one latent kept per step),
  ``timestep_grid="model"`` (the grid of the unguided generations), 10 steps, CFG 7.5 (``--gap-cfg``: the
  scale these numbers were first reported at; sd-shapes' recommended 2.5 is ``ShapesWeights.guidance_scale``).
- update: the official DOODL update (``DOODLOptimizer``) at the step of the framework's own vocabulary-expansion
  benchmark (experiments/benchmarks/shapes_eval.py, step 0.1; results in
  experiments/benchmarks/results/shapes/README.md): ``clip_grad_val`` 0.1 and ``grad_scale`` 200 (most elements
  clip, so each moves <= 0.1 per iteration before momentum), momentum 0.9, ``perturb_grad_scale`` 1e-4, latents
  renormalised to the norm of x_T after each step; 15 iterations. Why not experiments/quickstart.yaml's 100 / 0.03
  (a CLIP-text task at CFG 2.5): on 8 held-out items of this task (seeds ``EVAL_SEED + 300 + i``, never in the
  report), classifier guidance, the evaluator read the target on 6 of 8 after the 0.1 step and 3 of 8 after 0.03
  (the guide: 7 vs 6 of 8). One setting for all three guides, as before.
- guidance on whole images (``num_cuts=0``): cross-entropy of the classifier toward the target class;
  spherical distance of shapes-CLIP's embedding to "a <colour> <target shape>"; minus the aesthetic head.
- items: the prompts "a <colour> polygon" (colours drawn by ``random.Random(0)``), target i % 4 + 1
  (triangle, square, pentagon, hexagon), seeds ``EVAL_SEED + 100 + i``. A ``DOODL`` module pairs every prompt
  with every seed, and a guidance's target is fixed per prompt, so the items are fitted in groups sharing
  prompt and target (one module each, all on the one backbone); an item's result does not depend on its group
  (up to float rounding: noise, perturbation and renormalisation are per item).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..console import quiet_lightning
from ..io import atomic_write_text
from . import ShapesWeights
from .quality_gaps import measure_guidance_gaps
from .quality_measures import (Models, measure_aesthetic, measure_classifier, measure_clip, measure_evaluator,
                               measure_generation, measure_vae)
from .quality_report import bar_verdicts, report_markdown, update_cards

__all__ = ["SIZES", "main"]

SIZES = {  # --quick and --smoke; the defaults are the argparse defaults
    "quick": dict(n=512, n_gen=24, steps=50, gap_items=4, gap_iters=15, gap_steps=10),
    "smoke": dict(n=16, n_gen=4, steps=2, gap_items=2, gap_iters=1, gap_steps=2),
}


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)})"


def main(argv=None):
    from . import weights_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=weights_dir())
    ap.add_argument("--out", type=Path, default=None,
                    help="where quality.json / QUALITY.md go (default: --weights; with --quick / --smoke: "
                    "outputs/shapes-quality-<mode>)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=2048, help="fresh renders per classification bar")
    ap.add_argument("--n-gen", type=int, default=240, help="generations per prompt set")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for unguided generations")
    ap.add_argument("--cfg", type=float, nargs="+", default=None,
                    help="guidance scales for unguided generations; the first decides the bar (default: sd-shapes' "
                    "recommended scale, ShapesWeights.guidance_scale, chosen on held-out prompts -- see its model "
                    "card -- then SD's usual 7.5)")
    ap.add_argument("--gen-seed-offset", type=int, default=6, help="prompt sets EVAL_SEED + this and + this + 1")
    ap.add_argument("--gap-cfg", type=float, default=7.5, help="guidance scale of the guide-vs-evaluator runs")
    ap.add_argument("--gap-items", type=int, default=16)
    ap.add_argument("--gap-iters", type=int, default=15, help="DOODL iterations of the guide-vs-evaluator runs")
    ap.add_argument("--gap-steps", type=int, default=10, help="DDIM steps of the guide-vs-evaluator chain")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: vae evaluator classifier clip aesthetic generation gaps")
    ap.add_argument("--no-cards", action="store_true", help="do not write into the model cards")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes: a real but short measurement "
                      f"({SIZES['quick']}; explicit sizes win); never touches the cards")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script, not a measurement)")
    a = ap.parse_args(argv)
    size = "quick" if a.quick else "smoke" if a.smoke else None
    if size:  # the mode's sizes replace the defaults; sizes given on the command line still win
        ap.set_defaults(**SIZES[size])
        a = ap.parse_args(argv)
    weights = ShapesWeights(a.weights)
    if a.cfg is None:
        a.cfg = [weights.guidance_scale, 7.5]
    if min(a.gap_items, a.gap_iters, a.gap_steps, a.steps, a.n, a.n_gen) < 1:
        ap.error("--n, --n-gen, --steps and the --gap-* sizes must be >= 1")
    out = a.out or (Path("outputs") / f"shapes-quality-{size}" if size else a.weights)
    out.mkdir(parents=True, exist_ok=True)
    quiet_lightning()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    r: dict = {"machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": "python -m doodl_lightning.shapes.quality" + (f" --{size}" if size else ""),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "timings_s": {}}
    t_start = time.time()

    def timed(name, fn):
        t0 = time.time()
        r[name] = fn()
        r["timings_s"][name] = round(time.time() - t0, 1)
        print(name, json.dumps(r[name]), flush=True)

    t0 = time.time()
    models = Models(weights, dev)
    r["timings_s"]["load"] = round(time.time() - t0, 1)
    bb, ev = models.backbone, models.evaluator
    if bb is not None and "vae" not in a.skip:
        timed("vae", lambda: measure_vae(bb, min(a.n, 1024), dev, ev))
    if ev is not None and "evaluator" not in a.skip:
        timed("evaluator", lambda: measure_evaluator(ev, a.n, dev))
    if models.has_classifier and "classifier" not in a.skip:
        timed("classifier", lambda: measure_classifier(models, a.n, dev))
    if models.clip is not None and "clip" not in a.skip:
        timed("clip", lambda: measure_clip(models, min(a.n, 512), dev))
    if models.aesthetic is not None and "aesthetic" not in a.skip:
        timed("aesthetic", lambda: measure_aesthetic(models, a.n, dev))
    if bb is not None and ev is not None and "generation" not in a.skip:
        timed("generation", lambda: measure_generation(bb, ev, a.n_gen, dev, a.steps, a.cfg[0], a.gen_seed_offset))
        if len(a.cfg) > 1:
            timed("generation_other_cfg", lambda: {str(c): measure_generation(bb, ev, a.n_gen, dev, a.steps, c,
                                                                              a.gen_seed_offset) for c in a.cfg[1:]})
    ready = None not in (bb, ev, models.clip, models.aesthetic) and models.has_classifier
    if ready and "gaps" not in a.skip:
        timed("guidance_gaps", lambda: measure_guidance_gaps(models, dev, a.gap_items, a.gap_iters, a.gap_steps, a.gap_cfg))
    r["timings_s"]["total"] = round(time.time() - t_start, 1)
    r["bars"] = bar_verdicts(r)
    atomic_write_text(out / "quality.json", json.dumps(r, indent=2))
    atomic_write_text(out / "QUALITY.md", report_markdown(r))
    if not a.no_cards and size is None:
        update_cards(a.weights, r)
    print(report_markdown(r))
    print(f"wrote {out / 'quality.json'} and {out / 'QUALITY.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
