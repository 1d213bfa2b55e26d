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
import math
import os
import platform
import random
import time
from pathlib import Path

import torch

from ..console import quiet_lightning
from ..data import Item, initial_noise
from ..io import atomic_write_text
from ..sampling import Schedule, sample_ddim
from . import ShapesWeights
from . import data as D
from .modules import QUALITY_MARK, augment

EVAL_SEED = 7_777_000_000  # fresh renders: far from every training seed range

# the guide-vs-evaluator runs: DOODL's official update at shapes_eval.py's vocabulary-expansion step 0.1
# (clip_grad_val = step, grad_scale = 2 step / 1e-3; see the docstring for why not quickstart.yaml's 100 / 0.03)
GAP_UPDATE = dict(grad_scale=200.0, clip_grad_val=0.1, use_momentum=True, momentum=0.9, perturb_grad_scale=1e-4,
                  renormalize_latents=True)
GAP_UPDATE_SOURCE = ("experiments/benchmarks/shapes_eval.py's vocabulary-expansion step 0.1, "
                     "see experiments/benchmarks/results/shapes/README.md")
GAP_CHAIN = dict(sampler="ddim", backprop="checkpoint", timestep_grid="model")

SIZES = {  # --quick and --smoke; the defaults are the argparse defaults
    "quick": dict(n=512, n_gen=24, steps=50, gap_items=4, gap_iters=15, gap_steps=10),
    "smoke": dict(n=16, n_gen=4, steps=2, gap_items=2, gap_iters=1, gap_steps=2),
}


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)})"


# ---------------------------------------------------------------------------------------------------- models
class Models:
    """Every model the report needs, built once from ``ShapesWeights`` (None where the directory lacks it)."""

    def __init__(self, weights: ShapesWeights, device: torch.device):
        from ..guidance import AestheticGuidance, CLIPTextGuidance

        self.weights, self.device = weights, device
        self.backbone = weights.backbone().to(device) if weights.has("sd-shapes") else None
        self.evaluator = weights.evaluator(device) if weights.has("evaluator") else None
        self._classifiers: dict[int, object] = {}
        has_clip = weights.clip_config.exists() and weights.clip_checkpoint.exists()
        # the measuring CLIP: no fixed prompt (encode_text / embed_images only); the text guides are built per target
        self.clip = CLIPTextGuidance(num_cuts=0, **weights.clip_kwargs()).to(device) if has_clip else None
        self.aesthetic = (AestheticGuidance(head=str(weights.aesthetic_head), num_cuts=0, **weights.clip_kwargs()).to(device)
                          if has_clip and weights.aesthetic_head.exists() else None)

    @property
    def has_classifier(self) -> bool:
        return (self.weights.classifier / "config.json").exists()

    def classifier(self, target: int = 0):
        """The guidance classifier (``ClassifierGuidance``) aiming at ``target``; its logits do not depend on it."""
        from ..guidance import ClassifierGuidance

        if target not in self._classifiers:
            self._classifiers[target] = ClassifierGuidance(target=target, num_cuts=0,
                                                           **self.weights.classifier_kwargs()).to(self.device)
        return self._classifiers[target]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Fine-shape logits (N, classes) of whole images in [-1, 1]."""
        with torch.no_grad():
            return self.classifier().logits(images.to(self.device))[:, 0]

    def clip_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit shapes-CLIP embeddings (N, D) of whole images in [-1, 1]."""
        with torch.no_grad():
            return torch.cat([self.clip.embed_images(c.to(self.device)) for c in images.split(256)])

    def clip_text(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([self.clip.encode_text(texts[j:j + 1024]) for j in range(0, len(texts), 1024)])


# ---------------------------------------------------------------------------------------------------- bars
@torch.no_grad()
def measure_vae(backbone, n, device, evaluator=None) -> dict:
    """PSNR of reconstructions; with ``evaluator``, also how often it still reads each single shape's fine and
    coarse class after the round trip -- a ceiling on generations' shape match that PSNR does not show."""
    attrs = D.sample_attributes(EVAL_SEED + 1, n, p_two=0.2)
    x = D.render(attrs, device)
    rec = torch.cat([backbone.decode(backbone.encode_images(c)) for c in x.split(256)]).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-10))
    res = {"psnr_db_mean": round(float(psnr.mean()), 2), "psnr_db_of_mean_mse": round(float(10 * math.log10(1 / float(mse.mean()))), 2),
           "n": n, "bar": ">= 32 dB"}
    if evaluator is not None:
        one = (attrs.n_objects == 1).cpu()
        truth, pred = attrs.shape[:, 0][one], evaluator(rec)["shape"].cpu()[one]
        coarse = torch.tensor(D.FINE_TO_COARSE)
        res["evaluator_reads_reconstruction_pct"] = {
            "shape": round(100 * float((pred == truth).float().mean()), 2),
            "coarse_shape": round(100 * float((coarse[pred] == coarse[truth]).float().mean()), 2),
            "per_shape": {s: round(100 * float((pred[truth == i] == i).float().mean()), 1)
                          for i, s in enumerate(D.SHAPES) if bool((truth == i).any())},  # no NaN for absent classes
            "n_single_shape": int(one.sum())}
    return res


@torch.no_grad()
def measure_evaluator(evaluator, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 2, n)
    x = D.render(attrs, device)
    pred = evaluator(x)
    labels = attrs.labels()
    acc = {a: round(float((pred[a] == labels[a]).float().mean()) * 100, 2) for a in D.ATTRIBUTES}
    return {"accuracy_pct": acc, "quality_mae": round(float((pred["quality"] - attrs.quality).abs().mean()), 3), "n": n,
            "bar": ">= 99% per attribute"}


@torch.no_grad()
def measure_classifier(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 3, n)
    x = D.render(attrs, device)
    y = attrs.shape[:, 0]
    g = torch.Generator().manual_seed(0)
    res = {}
    for name, xx in [("clean", x), ("noise_0.2", x + 0.2 * torch.randn(x.shape, generator=g).to(device)),
                     ("noise_0.4", x + 0.4 * torch.randn(x.shape, generator=g).to(device)),
                     ("shift_2px", augment(x, 0.0, 2, g))]:
        pred = torch.cat([models.classify(c).argmax(-1).cpu() for c in xx.split(512)])
        res[name] = round(float((pred == y).float().mean()) * 100, 2)
    return {"accuracy_pct": res, "n": n, "bar": ">= 98% clean, robust"}


def _template(size, colour, shape, position, background):
    return f"a {size} {colour} {shape} {D.POSITION_PHRASE[D.POSITIONS.index(position)]} on a {background} background"


@torch.no_grad()
def measure_clip(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 4, n)
    img = models.clip_features(D.render(attrs, device))
    lab = attrs.labels()
    acc = {}
    for a in D.ATTRIBUTES:
        names = D.ATTRIBUTE_NAMES[a]
        caps = []
        for i in range(n):
            true = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
            for v in names:
                t = dict(true, **{a: v})
                caps.append(_template(t["size"], t["colour"], t["shape"], t["position"], t["background"]))
        txt = models.clip_text(caps).view(n, len(names), -1).to(img.device)
        pick = torch.einsum("nd,ncd->nc", img, txt).argmax(-1).cpu()
        acc[a] = round(float((pick == lab[a]).float().mean()) * 100, 2)
    models.clip._text_cache.clear()  # thousands of captions: do not keep them
    return {"zero_shot_accuracy_pct": acc, "n": n, "protocol": "full caption with the true attributes vs the same "
            "caption with this one attribute changed (all alternatives)", "bar": ">= 90%"}


@torch.no_grad()
def measure_aesthetic(models: Models, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 5, n, p_degraded=0.7)
    x = D.render(attrs, device)
    s = torch.cat([models.aesthetic.score(c) for c in x.split(256)]).cpu()
    q = attrs.quality
    r = torch.corrcoef(torch.stack([s, q]))[0, 1]
    rs = torch.corrcoef(torch.stack([s.argsort().argsort().float(), q.argsort().argsort().float()]))[0, 1]
    return {"pearson_r": round(float(r), 3), "spearman_r": round(float(rs), 3), "mae": round(float((s - q).abs().mean()), 3), "n": n}


def _prompts(n, seed, kind):
    attrs = D.sample_attributes(seed, n, p_degraded=0.0)
    lab = attrs.labels()
    prompts, want = [], []
    for i in range(n):
        t = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
        coarse = D.COARSE_SHAPES[D.FINE_TO_COARSE[int(lab["shape"][i])]]
        if kind == "full":
            prompts.append(_template(t["size"], t["colour"], coarse, t["position"], t["background"]))
            want.append({"coarse_shape": coarse, "colour": t["colour"], "size": t["size"], "position": t["position"],
                         "background": t["background"]})
        else:
            prompts.append(D.with_article(f"{t['colour']} {coarse}"))
            want.append({"coarse_shape": coarse, "colour": t["colour"]})
    return prompts, want


@torch.no_grad()
def generate(backbone, prompts, seeds, steps, cfg, device, batch=128) -> torch.Tensor:
    """Unguided images in [-1, 1]: DDIM (eta 0) on the model's grid from each seed's initial noise, batched CFG."""
    schedule = Schedule.from_scheduler(backbone.scheduler, steps, "model")
    shape = backbone.latent_shape(None)
    uncond = backbone.encode_prompts([""])
    out = []
    for j in range(0, len(prompts), batch):
        ps, ss = prompts[j:j + batch], seeds[j:j + batch]
        z = torch.stack([initial_noise(Item(j + i, p, int(s)), shape) for i, (p, s) in enumerate(zip(ps, ss))]).to(device)
        eps = backbone.denoiser(backbone.encode_prompts(ps), uncond, cfg)
        out.append(backbone.decode(sample_ddim(eps, z, schedule)).clamp(-1, 1))
    return torch.cat(out)


def match_rates(pred_names, want) -> dict:
    keys = sorted({k for w in want for k in w})
    res = {}
    for k in keys:
        pairs = [(p, w) for p, w in zip(pred_names, want) if k in w]
        if k == "coarse_shape":
            hit = [D.COARSE_SHAPES[D.FINE_TO_COARSE[D.SHAPES.index(p["shape"])]] == w[k] for p, w in pairs]
        else:
            hit = [p[k] == w[k] for p, w in pairs]
        res[k] = round(100 * sum(hit) / max(1, len(hit)), 2)
    return res


def _grid_text(schedule: Schedule) -> str:
    ts = schedule.timesteps
    return ", ".join(map(str, ts)) if len(ts) <= 3 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"


def measure_generation(backbone, evaluator, n, device, steps, cfg, seed_offset=6) -> dict:
    """Evaluator match of unguided generations: ``n`` full and ``n`` short prompts (seeds ``EVAL_SEED + seed_offset``
    and the next; another offset gives a held-out prompt set, e.g. for choosing the guidance scale)."""
    from .evaluator import Evaluator

    res = {"num_inference_steps": steps, "guidance_scale": cfg, "sampler": "DDIM (eta 0, sampling.sample_ddim)",
           "timestep_grid": "model", "timesteps": _grid_text(Schedule.from_scheduler(backbone.scheduler, steps, "model"))}
    for kind, seed in [("full", EVAL_SEED + seed_offset), ("short", EVAL_SEED + seed_offset + 1)]:
        prompts, want = _prompts(n, seed, kind)
        imgs = generate(backbone, prompts, [seed + i for i in range(n)], steps, cfg, device)
        pred = evaluator(imgs)
        res[f"{kind}_prompts_match_pct"] = match_rates(Evaluator.names(pred), want)
        res[f"{kind}_prompts_evaluator_quality_mean"] = round(float(pred["quality"].mean()), 2)
        res[f"{kind}_example_prompt"] = prompts[0]
    res["n_per_prompt_set"] = n
    res["bar"] = ">= 90% shape (coarse: circle / polygon / star) and colour"
    return res


# ------------------------------------------------------------------------------------------- guidance gaps
def gap_items(n: int) -> tuple[list[str], list[int], list[int], list[str]]:
    """The guide-vs-evaluator items: prompts "a <colour> polygon", fine-class targets, seeds, colours."""
    rng = random.Random(0)
    colours = [rng.choice(D.COLOURS) for _ in range(n)]
    targets = [1 + (i % 4) for i in range(n)]  # triangle, square, pentagon, hexagon
    prompts = [D.with_article(f"{c} polygon") for c in colours]
    seeds = [EVAL_SEED + 100 + i for i in range(n)]
    return prompts, targets, seeds, colours


def _trainer(iters: int, device: torch.device):
    import lightning

    return lightning.Trainer(max_steps=iters, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, devices=1,
                             accelerator="gpu" if device.type == "cuda" else "cpu")


def run_doodl(backbone, prompts, seeds, keys, make_guide, device, iters, steps, cfg, label="") -> dict:
    """Fit the framework's DOODL module on every item, one module per group of items sharing ``keys[i]``
    (their prompt and target); returns the images before / after (item order, clamped to [-1, 1]) and the
    guide's losses before / after."""
    from ..module import DOODL

    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    n = len(prompts)
    before, after, loss0, loss1 = [None] * n, [None] * n, torch.zeros(n), torch.zeros(n)
    for g, (key, idx) in enumerate(groups.items()):
        t0 = time.time()
        if len({prompts[i] for i in idx}) != 1:
            raise ValueError(f"group {key!r} mixes prompts")
        m = DOODL(model=backbone, prompts=[prompts[idx[0]]], seeds=[seeds[i] for i in idx], guidance=[make_guide(key)],
                  steps=steps, guidance_scale=cfg, **GAP_CHAIN, **GAP_UPDATE)
        m.prepare(device)
        ev0 = m.final_evaluation()
        _trainer(iters, device).fit(m)
        m.to(device)  # the Trainer's teardown may move the module (and the shared backbone) back to the CPU
        ev1 = m.final_evaluation()
        for row, i in enumerate(idx):  # the module's items are its seeds in the group's order
            before[i], after[i] = ev0.images[row].clamp(-1, 1), ev1.images[row].clamp(-1, 1)
            loss0[i], loss1[i] = float(ev0.total[row]), float(ev1.total[row])
        print(f"  [{label}] module {g + 1}/{len(groups)}: {len(idx)} item(s) {key!r}, loss "
              f"{float(ev0.total.mean()):.4f} -> {float(ev1.total.mean()):.4f}, {time.time() - t0:.1f} s", flush=True)
    return {"before": torch.stack(before), "after": torch.stack(after), "loss_before": loss0, "loss_after": loss1,
            "modules": len(groups)}


def _pct(hits: torch.Tensor) -> float:
    return round(100 * float(hits.float().mean()), 1)


def measure_guidance_gaps(models: Models, device, n, iters, steps, cfg) -> dict:
    from ..guidance import CLIPTextGuidance

    prompts, targets, seeds, colours = gap_items(n)
    target_t = torch.tensor(targets)
    colour_t = torch.tensor([D.COLOURS.index(c) for c in colours])
    ev = models.evaluator
    out = {"items": n, "optimisation_steps": iters, "ddim_steps": steps, "guidance_scale": cfg,
           "task": "prompt 'a <colour> polygon', target = one of the 4 polygon classes (vocabulary expansion)",
           "method": "doodl_lightning.module.DOODL fitted by lightning.Trainer (the framework's chain, guidance and "
                     "update); whole images (num_cuts 0)",
           "chain": dict(GAP_CHAIN), "update": {k: v for k, v in GAP_UPDATE.items()},
           "update_source": GAP_UPDATE_SOURCE}

    def rates(res, guide_pred_fn):
        first, last = res["before"], res["after"]
        ev0, ev1 = ev(first), ev(last)
        with torch.no_grad():
            g0, g1 = guide_pred_fn(first).cpu(), guide_pred_fn(last).cpu()
        return {"guide_says_target_before_pct": _pct(g0 == target_t),
                "guide_says_target_after_pct": _pct(g1 == target_t),
                "evaluator_says_target_before_pct": _pct(ev0["shape"] == target_t),
                "evaluator_says_target_after_pct": _pct(ev1["shape"] == target_t),
                "evaluator_colour_kept_after_pct": _pct(ev1["colour"] == colour_t),
                "guide_loss_before_mean": round(float(res["loss_before"].mean()), 4),
                "guide_loss_after_mean": round(float(res["loss_after"].mean()), 4),
                "doodl_modules": res["modules"]}

    t0 = time.time()
    # 1. the classifier toward the target class: cross-entropy
    res = run_doodl(models.backbone, prompts, seeds, list(zip(prompts, targets)), lambda k: models.classifier(k[1]),
                    device, iters, steps, cfg, "classifier")
    out["classifier"] = rates(res, lambda im: models.classify(im).argmax(-1))
    # 2. shapes-CLIP text guidance toward the fine class name: spherical distance
    texts = [D.with_article(f"{c} {D.SHAPES[t]}") for c, t in zip(colours, targets)]
    res = run_doodl(models.backbone, prompts, seeds, list(zip(prompts, texts)),
                    lambda k: CLIPTextGuidance(prompt=k[1], num_cuts=0, **models.weights.clip_kwargs()),
                    device, iters, steps, cfg, "clip_text")
    shape_txt = models.clip_text([f"a {s}" for s in D.SHAPES])
    out["clip_text"] = rates(res, lambda im: (models.clip_features(im) @ shape_txt.t().to(device)).argmax(-1))
    out["clip_text"]["note"] = "guide's belief = shapes-CLIP zero-shot over 'a <shape>'"
    # 3. the aesthetic head: maximised (loss = -score)
    res = run_doodl(models.backbone, prompts, seeds, prompts, lambda k: models.aesthetic, device, iters, steps, cfg,
                    "aesthetic")
    with torch.no_grad():
        score = lambda im: torch.cat([models.aesthetic.score(c.to(device)) for c in im.split(256)]).cpu()
        out["aesthetic"] = {"head_score_before": round(float(score(res["before"]).mean()), 2),
                            "head_score_after": round(float(score(res["after"]).mean()), 2),
                            "evaluator_quality_before": round(float(ev(res["before"])["quality"].mean()), 2),
                            "evaluator_quality_after": round(float(ev(res["after"])["quality"].mean()), 2),
                            "doodl_modules": res["modules"]}
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _md(results: dict) -> str:
    r = results
    L = ["# Shapes world: measured quality", "", f"Measured on {r['machine']} on {r['date']} by "
         f"`{r.get('command', 'python -m doodl_lightning.shapes.quality')}` (fresh renders, seeds never used in training; "
         "every model from `ShapesWeights`, every model call through the framework)"
         + (f"; load average {r['load_average_at_start'][0]} at the start (other jobs share the machine)"
            if "load_average_at_start" in r else "")
         + (f"; {r['timings_s']['total']:.0f} s in all" if "total" in r.get("timings_s", {}) else "") + ".", ""]
    if "vae" in r:
        L.append(f"- VAE reconstruction PSNR: **{r['vae']['psnr_db_mean']} dB** (mean over {r['vae']['n']} images; bar >= 32 dB)")
        if "evaluator_reads_reconstruction_pct" in r["vae"]:
            e = r["vae"]["evaluator_reads_reconstruction_pct"]
            L.append(f"- Evaluator on VAE reconstructions of {e['n_single_shape']} single shapes: fine shape {e['shape']}%, "
                     f"coarse shape {e['coarse_shape']}% (per shape {e['per_shape']}) -- a ceiling for generations")
    if "evaluator" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["evaluator"]["accuracy_pct"].items())
        L.append(f"- Evaluator accuracy: {acc}; quality MAE {r['evaluator']['quality_mae']} (bar >= 99% each)")
    if "classifier" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["classifier"]["accuracy_pct"].items())
        L.append(f"- Classifier (fine shape) accuracy: {acc} (bar >= 98% clean)")
    if "clip" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["clip"]["zero_shot_accuracy_pct"].items())
        L.append(f"- shapes-CLIP zero-shot: {acc} (bar >= 90%)")
    if "aesthetic" in r:
        a = r["aesthetic"]
        L.append(f"- Aesthetic head vs procedural quality: Pearson {a['pearson_r']}, Spearman {a['spearman_r']}, MAE {a['mae']}")
    if "generation" in r:
        g = r["generation"]
        for g in [g] + list(r.get("generation_other_cfg", {}).values()):
            L.append(f"- Unguided generations (DDIM, {g['num_inference_steps']} steps on the model's grid {g['timesteps']}, "
                     f"CFG {g['guidance_scale']}, {g['n_per_prompt_set']} per set), evaluator match: full prompts "
                     f"{g['full_prompts_match_pct']}; short prompts {g['short_prompts_match_pct']}"
                     + (" (bar >= 90% shape and colour)" if g is r["generation"] else ""))
    if "guidance_gaps" in r:
        gg = r["guidance_gaps"]
        u = gg["update"]
        L += ["", f"## Guide vs evaluator ({gg['task']}; {gg['items']} items, {gg['optimisation_steps']} DOODL iterations "
              f"through a {gg['ddim_steps']}-step DDIM chain, CFG {gg['guidance_scale']})", "",
              f"The framework's `DOODL` module fitted by a Lightning `Trainer`: DDIM on the model's grid, backprop "
              f"`{gg['chain']['backprop']}`, the official update with grad_scale {u['grad_scale']:g}, clip_grad_val "
              f"{u['clip_grad_val']:g}, momentum {u['momentum']:g}, perturb_grad_scale {u['perturb_grad_scale']:g}, "
              f"renormalised latents ({gg['update_source']}); whole images (no cutouts).", "",
              "| guide | guide says target (before -> after) | evaluator says target (before -> after) | colour kept | guide loss (before -> after) |",
              "|---|---|---|---|---|"]
        for k in ("classifier", "clip_text"):
            v = gg[k]
            L.append(f"| {k} | {v['guide_says_target_before_pct']}% -> {v['guide_says_target_after_pct']}% | "
                     f"{v['evaluator_says_target_before_pct']}% -> {v['evaluator_says_target_after_pct']}% | "
                     f"{v['evaluator_colour_kept_after_pct']}% | {v['guide_loss_before_mean']} -> {v['guide_loss_after_mean']} |")
        a = gg["aesthetic"]
        L += ["", f"Aesthetic head (maximised): head score {a['head_score_before']} -> {a['head_score_after']}, "
              f"evaluator's quality {a['evaluator_quality_before']} -> {a['evaluator_quality_after']}."]
    if "bars" in r:
        L += ["", "## Bars", ""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in r["bars"].items()]
    return "\n".join(L) + "\n"


def _bars(r: dict) -> dict:
    bars = {}
    if "vae" in r:
        bars["VAE PSNR >= 32 dB"] = r["vae"]["psnr_db_mean"] >= 32
    if "evaluator" in r:
        bars["evaluator >= 99% each attribute"] = min(r["evaluator"]["accuracy_pct"].values()) >= 99
    if "generation" in r:
        g = r["generation"]
        bars["generations match shape >= 90%"] = min(g["full_prompts_match_pct"]["coarse_shape"], g["short_prompts_match_pct"]["coarse_shape"]) >= 90
        bars["generations match colour >= 90%"] = min(g["full_prompts_match_pct"]["colour"], g["short_prompts_match_pct"]["colour"]) >= 90
    if "clip" in r:
        z = r["clip"]["zero_shot_accuracy_pct"]
        bars["CLIP zero-shot >= 90% (shape, colour)"] = min(z["shape"], z["colour"]) >= 90
        bars["CLIP zero-shot >= 90% (all attributes)"] = min(z.values()) >= 90
    if "classifier" in r:
        bars["classifier >= 98% clean"] = r["classifier"]["accuracy_pct"]["clean"] >= 98
    return bars


def update_cards(weights: Path, results: dict) -> None:
    sections = {"sd-shapes": ["vae", "generation", "generation_other_cfg", "guidance_gaps"], "shapes-clip": ["clip", "guidance_gaps"],
                "classifier": ["classifier", "guidance_gaps"], "aesthetic": ["aesthetic", "guidance_gaps"],
                "evaluator": ["evaluator"]}
    for d, keys in sections.items():
        card = weights / d / "README.md"
        if not card.exists():
            continue
        text = card.read_text()
        if text.count(QUALITY_MARK) != 2:
            continue
        sub = {k: results[k] for k in keys if k in results}
        if "guidance_gaps" in sub and d != "sd-shapes":
            gg = results["guidance_gaps"]
            name = {"shapes-clip": "clip_text", "classifier": "classifier", "aesthetic": "aesthetic"}[d]
            sub["guidance_gaps"] = {name: gg.get(name), "task": gg.get("task"), "method": gg.get("method")}
        body = (f"Measured on {results['machine']}, {results['date']} (`python -m doodl_lightning.shapes.quality`; "
                f"all numbers in ../QUALITY.md):\n\n```json\n{json.dumps(sub, indent=1)}\n```")
        a, _, rest = text.partition(QUALITY_MARK)
        _, _, c = rest.partition(QUALITY_MARK)
        atomic_write_text(card, a + QUALITY_MARK + "\n" + body + "\n" + QUALITY_MARK + c)


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
    r["bars"] = _bars(r)
    atomic_write_text(out / "quality.json", json.dumps(r, indent=2))
    atomic_write_text(out / "QUALITY.md", _md(r))
    if not a.no_cards and size is None:
        update_cards(a.weights, r)
    print(_md(r))
    print(f"wrote {out / 'quality.json'} and {out / 'QUALITY.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
