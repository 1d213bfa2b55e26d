"""The test-time search methods of issue 27 in the comparison protocol: FK steering, zero-order search, search then
refine, population DOODL, DOODL with an expectation-over-transformations guide and DOODL stopped per item on its
guide's own margin (``ItemEarlyStopping(stop_at)``), each run through its
LightningModule with a per-step record of what it shows and what it has spent (UNet evaluations, back-propagated
ones, seconds), so every method has a curve of the evaluator's verdict against compute in both units.

Validation chooses each method's knob (``Plan``'s grids) at the full budget and, for every budget of
``Plan.budgets``, the point of its curve to stop at; both are frozen in ``val.json`` before the test run reads them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback

from callbacks import ItemEarlyStopping
from doodl_lightning.fk_steering import FKSteering
from doodl_lightning.guidance import ExpectationOverTransforms
from doodl_lightning.module import DOODL
from doodl_lightning.population import PopulationDOODL
from doodl_lightning.search_refine import SearchThenRefine
from doodl_lightning.zero_order import ZeroOrderSearch

UPDATE_KEYS = ("update_rule", "step", "lr", "max_grad_norm")


@dataclass(frozen=True)
class Method:
    """How the protocol runs one search method: its module, which CFG it takes (best-of-N's for the samplers,
    DOODL's for the gradient methods), the knob validation sweeps (``Plan`` attribute), how many training steps a
    budget of ``chains`` chain evaluations per image buys, and up to which step each item shows its best proposal
    so far (selection) rather than the latest iterate."""

    label: str
    cls: type
    cfg_from: str
    knob: str
    grid: str
    gradient: bool

    def fixed(self, plan) -> dict:
        """The settings the protocol holds fixed (from ``plan``), beside the swept knob."""
        if self.cls is FKSteering:  # the reference resamples every 5 of 100 steps; a short chain every 2
            return {"particles": plan.fk_particles, "resample_every": plan.fk_resample_every,
                    "resample_start": plan.fk_resample_every}
        if self.cls is ZeroOrderSearch:
            return {"neighbours": plan.zo_neighbours}
        if self.cls is PopulationDOODL:
            return {"exchange_every": plan.population_exchange_every}
        return {}

    def steps(self, chains: int, setting: dict) -> int:
        """Training steps that spend ``chains`` chain evaluations per image."""
        if self.cls is FKSteering:
            return max(1, chains // setting["particles"])
        if self.cls is ZeroOrderSearch:
            return chains
        if self.cls is SearchThenRefine:  # a DOODL iteration = a chain + its checkpointed recomputation
            return setting["candidates"] + max(1, (chains - setting["candidates"]) // 2)
        if self.cls is PopulationDOODL:
            return max(1, chains // (2 * setting["members"]))
        return max(1, chains // 2)  # DOODL with the EOT guide

    def keeps_best_until(self, setting: dict) -> float:
        """Steps before this show each item's best proposal so far (selection); later ones the latest iterate."""
        if self.cls in (FKSteering, ZeroOrderSearch):
            return float("inf")
        return setting["candidates"] if self.cls is SearchThenRefine else 0


METHODS = {
    "fk_steering": Method("FK steering", FKSteering, "best_of_n", "lmbda", "fk_lmbdas", False),
    "zero_order": Method("zero-order search", ZeroOrderSearch, "best_of_n", "radius", "zo_radii", False),
    "search_refine": Method("search then refine", SearchThenRefine, "doodl_ddim", "candidates", "refine_candidates", True),
    "population_doodl": Method("population DOODL", PopulationDOODL, "doodl_ddim", "members", "population_members", True),
    "doodl_eot": Method("DOODL + EOT guide", DOODL, "doodl_ddim", "samples", "eot_samples", True),
    # an item stops (its latents frozen) once its guide loss is <= stop_at: for the classifier guide stop_at = -log p*
    # stops at p(target) >= p*, before further steps drive the guide's confidence past what the image supports
    "doodl_margin": Method("DOODL + margin stop", DOODL, "doodl_ddim", "stop_at", "margin_stops", True),
}


class StepLog(Callback):
    """After every training step: the images the step shows, their reward losses, and the compute spent so far per
    image (UNet evaluations and back-propagated ones from the runner's counter, a CFG pair = 1; seconds)."""

    def __init__(self, counter, cfg_rows: int, n_items: int):
        self.counter, self.cfg_rows, self.n = counter, cfg_rows, n_items
        self.images, self.losses, self.unet, self.backprop, self.seconds, self.guidance = [], [], [], [], [], []

    def on_train_start(self, trainer, pl_module):
        self.guidance_rows = 0
        self.hooks = [g.register_forward_hook(self._count) for g in pl_module.guidance]
        self.t0 = time.perf_counter()

    def _count(self, module, args, output):
        self.guidance_rows += int(output.shape[0]) if hasattr(output, "shape") and output.dim() else 1

    def on_train_end(self, trainer, pl_module):
        for h in self.hooks:
            h.remove()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        c, per = self.counter, self.cfg_rows * self.n
        self.images.append(pl_module.last.images.detach().float().cpu())
        self.losses.append(pl_module.last.reward.detach().double().cpu())
        self.unet.append(round((c.rows + c.grad_rows) / per, 2))
        self.backprop.append(round(c.grad_rows / per, 2))
        self.seconds.append(round((time.perf_counter() - self.t0) / self.n, 4))
        self.guidance.append(round(self.guidance_rows / self.n, 2))


def run_search(runner, task, name: str, cfg: float, chains: int, setting: dict, update: dict) -> dict:
    """``name`` on ``task`` for a budget of ``chains`` chain evaluations per image: a record with its curve (after
    each step: UNet evaluations, back-propagated ones, seconds per image, and each item's verdict on what the
    method keeps at that point) and every step's images and verdicts (for the test's chosen point)."""
    method = METHODS[name]
    kw = dict(setting)
    steps = method.steps(chains, setting)
    if method.cls is FKSteering:
        kw["runs"] = steps  # one FK run per step, each item keeping its best result
    if method.gradient:
        kw.update(_update_kwargs(update))
    kw.pop("stop_at", None)  # doodl_margin's knob is its callback's
    if name == "doodl_eot":
        samples = kw.pop("samples")
        module = runner.module(task, guidance_scale=cfg, **kw)
        module.guidance[0] = ExpectationOverTransforms(module.guidance[0], samples=samples)
    else:
        module = runner.module(task, cls=method.cls, guidance_scale=cfg, **kw)
    log = StepLog(runner.counter, 2 if cfg not in (0.0, 1.0) else 1, len(task.items))
    callbacks = [log]
    if name == "doodl_margin":  # patience beyond the run: only the margin stops an item (the fit ends when all have)
        callbacks.append(ItemEarlyStopping(patience=steps + 1, stop_at=setting["stop_at"]))
    runner.counter.reset()
    runner._fit(module, steps, callbacks)
    ref = runner.reference(task, cfg)
    verdicts = [runner._verdicts(task, im, ref) for im in log.images]
    losses = torch.stack(log.losses)  # (steps, items)
    until = method.keeps_best_until(setting)
    curve, kept = [], []
    for s in range(len(log.images)):
        if s < until:  # the best proposal so far
            pick = losses[: s + 1].argmin(0).tolist()
        else:  # the latest iterate (after a search phase: DOODL's)
            pick = [s] * losses.shape[1]
        kept.append(pick)
        curve.append({"step": s, "unet_evaluations_per_image": log.unet[s], "backprop_per_image": log.backprop[s],
                      "seconds_per_image": log.seconds[s], "guidance_per_image": log.guidance[s],
                      "per_item": {k: [verdicts[p]["metrics"][k][i] for i, p in enumerate(pick)]
                                   for k in (task.primary, task.guide_metric)}})
    return {"method": name, "params": {**setting, "cfg": cfg, "chains": chains, "steps": steps,
                                       **(_update_kwargs(update) if method.gradient else {})},
            "curve": curve, "kept": kept, "step_losses": losses.tolist(), "step_images": log.images,
            "step_verdicts": verdicts}


def _update_kwargs(update: dict) -> dict:
    """DOODL's chosen update (``choices['doodl_ddim']``) as module keyword arguments (``Runner.doodl``'s mapping)."""
    if update.get("update_rule", "official") == "official":
        step = update.get("step", 0.1)
        return dict(grad_scale=2 * step / 1e-3, clip_grad_val=step, momentum=0.9, perturb_grad_scale=1e-4)
    return dict(update_rule=update["update_rule"], lr=update["lr"], max_grad_norm=update.get("max_grad_norm"),
                momentum=0.9, use_nesterov=update["update_rule"] == "sgd")


def _mean(point: dict, key: str) -> float:
    v = point["per_item"][key]
    return sum(v) / len(v)


def budget_points(curve: list[dict], budgets: list[float], key: str) -> dict:
    """For each budget (UNet evaluations per image): the index of the curve's best point (validation mean of
    ``key``; ties: the cheaper) among those within it, or None when the first point already costs more."""
    out = {}
    for b in budgets:
        within = [i for i, p in enumerate(curve) if p["unet_evaluations_per_image"] <= b + 1e-6]
        out[f"{b:g}"] = max(within, key=lambda i: (_mean(curve[i], key), -i)) if within else None
    return out


def validate_search(runner, task, plan, choices: dict, log=print, methods=None) -> tuple[dict, dict]:
    """Each search method's knob at the full budget (``plan.n_max`` chains), then its point per budget; returns
    (choices, runs) to add to ``val.json``. ``methods``: only these (default all of ``METHODS``)."""
    runs, out = {}, {}
    budgets = [b * plan.steps for b in plan.budgets]
    update = {k: v for k, v in choices["doodl_ddim"].items() if k in UPDATE_KEYS}
    for name, method in METHODS.items():
        if methods is not None and name not in methods:
            continue
        cfg = choices[method.cfg_from]["cfg"]
        recs = []
        for value in task.grid(plan, method.grid):
            rec = run_search(runner, task, name, cfg, plan.n_max, {method.knob: value, **method.fixed(plan)}, update)
            best = max(range(len(rec["curve"])), key=lambda i: (_mean(rec["curve"][i], task.primary), -i))
            runs[f"{name} {method.knob}{value:g}"] = {k: v for k, v in rec.items()
                                                       if k not in ("step_images", "step_verdicts", "step_losses")}
            log(f"  [{task.name}/val] {name} {method.knob} {value:g}: best {task.primary}="
                f"{_mean(rec['curve'][best], task.primary):.3f} at step {best}", flush=True)
            recs.append((_mean(rec["curve"][best], task.primary), -len(recs), value, rec, best))
        m, _, value, rec, best = max(recs, key=lambda x: x[:2])
        out[name] = {method.knob: value, "setting": {method.knob: value, **method.fixed(plan)}, "cfg": cfg, "chains": plan.n_max, "point": best, "val_mean": m,
                     "sweep": list(task.grid(plan, method.grid)),
                     **({k: v for k, v in update.items()} if method.gradient else {}),
                     "budget_points": budget_points(rec["curve"], budgets, task.primary),
                     "val_curve": [[p["unet_evaluations_per_image"], round(_mean(p, task.primary), 5)] for p in rec["curve"]]}
    return out, runs


def run_search_test(runner, task, choices: dict, name: str) -> dict:
    """``name`` on the test task with its frozen choices: the record's result is its curve's point chosen on
    validation (``point``); the budget table reads the other chosen points (``budget_points``)."""
    c = choices[name]
    update = {k: c[k] for k in UPDATE_KEYS if k in c}
    rec = run_search(runner, task, name, c["cfg"], c["chains"], c["setting"], update)
    i = min(c["point"], len(rec["curve"]) - 1)
    pick = rec["kept"][i]
    images = torch.stack([rec["step_images"][p][j] for j, p in enumerate(pick)])
    rec.update(runner._verdicts(task, images, runner.reference(task, c["cfg"])))
    rec["images"] = images
    rec["chosen_point"] = i
    rec["compute"] = {k: rec["curve"][i][k] for k in ("unet_evaluations_per_image", "backprop_per_image",
                                                      "seconds_per_image", "guidance_per_image")}
    rec["budget_points"] = c.get("budget_points", {})
    for key in ("step_images", "step_verdicts", "kept", "step_losses"):
        rec.pop(key)
    return rec
