"""Guide vs evaluator (``shapes.quality``'s last part): for every guidance model, the framework's ``DOODL``
LightningModule (one shared ``Backbone``) is fitted by a ``lightning.Trainer`` and the optimised images are
judged by the guide and by the independent evaluator: how often the guide believes it reached the target vs
how often the evaluator agrees. The settings and why: ``shapes.quality``'s docstring."""
from __future__ import annotations

import random
import time

import torch

from . import data as D
from .quality_measures import EVAL_SEED, Models

__all__ = ["GAP_CHAIN", "GAP_UPDATE", "GAP_UPDATE_SOURCE", "gap_items", "measure_guidance_gaps", "run_doodl"]

# the guide-vs-evaluator runs: DOODL's official update at shapes_eval.py's vocabulary-expansion step 0.1
# (clip_grad_val = step, grad_scale = 2 step / 1e-3; see shapes.quality's docstring for why not quickstart.yaml's 100 / 0.03)
GAP_UPDATE = dict(grad_scale=200.0, clip_grad_val=0.1, use_momentum=True, momentum=0.9, perturb_grad_scale=1e-4,
                  renormalize_latents=True)
GAP_UPDATE_SOURCE = ("experiments/benchmarks/shapes_eval.py's vocabulary-expansion step 0.1, "
                     "see experiments/benchmarks/results/shapes/README.md")
GAP_CHAIN = dict(sampler="ddim", backprop="checkpoint", timestep_grid="model")


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

    from callbacks import RenormalizeLatents  # DOODL's renormalize_latents, as cli.py adds it to every fit

    return lightning.Trainer(max_steps=iters, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             callbacks=[RenormalizeLatents()],
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
