"""The comparison protocol (issue 14): DOODL against one-step guidance and best-of-N, knobs chosen on a
validation split and frozen before the test split is run, paired statistics over items, accuracy against
compute. World-agnostic: a ``Task`` brings the items, the guidance and a verdict; ``shapes_eval.py`` builds
the shapes world's tasks, ``model_eval.py`` builds tasks from YAML for any backbone.

Every method runs through the core: ``DOODL`` and ``BestOfN`` LightningModules fitted by a
``lightning.Trainer``, the official one-step baseline through ``baselines.guided_sampling``.

Compute is counted, not estimated: UNet evaluations per image with a forward hook (a CFG pair = 1;
"backprop'd" = recorded for a VJP, checkpoint recomputations included), guidance evaluations per image, and
wall-clock seconds per image (the run's time divided by its items: items are batched through the chain).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch import Callback

from callbacks import RenormalizeLatents
from doodl_lightning.baselines import guided_sampling
from doodl_lightning.best_of_n import BestOfN
from doodl_lightning.compute import UNetCounter
from doodl_lightning.io import atomic_write_text
from doodl_lightning.module import DOODL


log = print


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """One experiment on one split: the items (prompt-major, as ``make_items``), the guide, and the verdict.

    ``verdict(images, items, reference)`` -> ({metric: [value per item]}, ok [per item], text [per item]);
    ``reference`` is the same items' unguided images (for drift measures) or None. ``guidance(num_cuts)``
    builds the guide (cutouts are a DOODL variant). ``primary``: the independent evaluator's measure the
    methods are ranked by; ``guide_metric``: the guide's own verdict, reported beside it."""

    name: str
    split: str
    prompts: list[str]
    seeds: list[int]
    guidance: Callable[[int], torch.nn.Module]
    verdict: Callable
    primary: str
    guide_metric: str
    metrics: list[dict]
    binary: bool = True       # the primary measure is a success (0/1) per item
    info: dict = field(default_factory=dict)
    # a knob grid in this task's guide units, replacing the plan's of that name (``margin_stops``: a guide-loss
    # threshold means p(target) for the classifier, a spherical distance for CLIP, minus the score for aesthetic)
    grids: dict = field(default_factory=dict)

    def grid(self, plan, name: str) -> tuple:
        """The values swept for the knob grid ``name``: this task's own, else the plan's."""
        return tuple(self.grids.get(name, getattr(plan, name)))

    @property
    def items(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]


# ------------------------------------------------------------------------------------------------ runs
class Trajectory(Callback):
    """The images and guide losses each optimisation step evaluated (step k: after k updates, or candidate k)."""

    def __init__(self):
        self.images: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images.append(pl_module.last.images.detach().float().cpu())
        self.losses.append(pl_module.last.total.detach().double().cpu())


class Runner:
    """Runs the methods on tasks with one shared backbone (loaded once) on one device."""

    def __init__(self, backbone, device: torch.device, steps: int, grid: str | None = "official"):
        self.backbone, self.device, self.steps, self.grid = backbone, device, steps, grid
        self.counter = UNetCounter(backbone.unet)
        self.references: dict[tuple, torch.Tensor] = {}  # (task, split, cfg) -> unguided images

    def module(self, task: Task, cls=DOODL, num_cuts: int = 0, **kw) -> DOODL:
        kw.setdefault("sampler", "ddim")
        kw.setdefault("steps", self.steps)
        return cls(model=self.backbone, prompts=task.prompts, seeds=task.seeds, guidance=[task.guidance(num_cuts)],
                   timestep_grid=self.grid, mix_weight=0.93, **kw)

    def _fit(self, module, steps: int, callbacks):
        import lightning

        trainer = lightning.Trainer(
            max_steps=steps, accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[*callbacks, RenormalizeLatents()],  # DOODL's renormalize_latents, as cli.py adds it
            num_sanity_val_steps=0)
        trainer.fit(module)

    def _verdicts(self, task: Task, images: torch.Tensor, reference: torch.Tensor | None) -> dict:
        metrics, ok, text = task.verdict(images, task.items, reference)
        return {"metrics": {k: [round(float(x), 5) for x in v] for k, v in metrics.items()}, "ok": ok, "text": text}

    def _compute(self, task: Task, seconds: float, guidance_evals: float, cfg: float) -> dict:
        n = len(task.items)
        c = self.counter.per_image(n, 2 if cfg not in (0.0, 1.0) else 1)
        c.update(guidance_evaluations_per_image=guidance_evals, seconds_total=round(seconds, 2),
                 seconds_per_image=round(seconds / n, 4))
        return c

    def _start(self):
        self.counter.reset()
        return time.time()

    def _seconds(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time() - t0

    def reference(self, task: Task, cfg: float) -> torch.Tensor:
        """The unguided DDIM images of the task's items at CFG ``cfg`` (drift measures compare to them)."""
        key = (task.name, task.split, len(task.items), cfg)
        if key not in self.references:
            m = self.module(task, guidance_scale=cfg).prepare(self.device)
            self.references[key] = m.final_evaluation().images.detach().float().cpu()
        return self.references[key]

    def one_step(self, task: Task, scale: float, cfg: float) -> dict:
        """The official one-step baseline (``latent_traversal=False``, unconditional x0 estimate) on DDIM."""
        m = self.module(task, guidance_scale=cfg).prepare(self.device)
        t0 = self._start()
        ev = guided_sampling(m, grad_scale=scale, estimate="one_step")
        seconds = self._seconds(t0)
        images = ev.images.detach().float().cpu()
        rec = {"method": "one_step", "params": {"scale": scale, "cfg": cfg},
               "compute": self._compute(task, seconds, self.steps + 1, cfg),
               "guide_loss": [round(float(x), 6) for x in ev.total]}
        rec.update(self._verdicts(task, images, self.reference(task, cfg)))
        rec["images"] = images
        return rec

    def best_of_n(self, task: Task, n_max: int, cfg: float, sampler: str = "ddim") -> dict:
        """Best-of-N for every N <= ``n_max`` from one search: candidate k's loss and verdict are recorded, and
        best-of-N is the verdict of the candidate with the lowest guide loss among the first N."""
        m = self.module(task, cls=BestOfN, candidates=n_max, guidance_scale=cfg, sampler=sampler)
        traj = Trajectory()
        t0 = self._start()
        self._fit(m, n_max, [traj])
        seconds = self._seconds(t0)
        losses = torch.stack(traj.losses)  # (n_max, items)
        ref = traj.images[0]  # candidate 0 = the unguided sample
        verdicts = [self._verdicts(task, im, ref) for im in traj.images]
        curve = []
        for n in range(1, n_max + 1):
            winner = losses[:n].argmin(0)
            curve.append({"n": n, "unet_evaluations_per_image": n * self.steps * (2 if sampler == "edict" else 1),
                          "per_item": {k: [verdicts[int(w)]["metrics"][k][i] for i, w in enumerate(winner)]
                                       for k in (task.primary, task.guide_metric)}})
        winner = losses.argmin(0)
        rec = {"method": "best_of_n", "params": {"n_max": n_max, "cfg": cfg, "sampler": sampler},
               "compute": self._compute(task, seconds, n_max, cfg), "curve": curve,
               "candidate_losses": [[round(float(x), 6) for x in row] for row in losses]}
        final = torch.stack([traj.images[int(w)][i] for i, w in enumerate(winner)])
        rec.update(self._verdicts(task, final, ref))
        rec["images"] = final
        rec["candidate_images"] = traj.images
        rec["candidate_verdicts"] = verdicts
        return rec

    def doodl(self, task: Task, iters: int, cfg: float, sampler: str = "ddim", steps: int | None = None,
              update_rule: str = "official", step: float = 0.1, lr: float = 0.01, max_grad_norm: float | None = None,
              num_cuts: int = 0) -> dict:
        """DOODL for ``iters`` iterations; its verdict after every iteration (0 = the unguided start)."""
        steps = steps or self.steps
        if update_rule == "official":  # ``step`` bounds each element's move per iteration before momentum
            upd = dict(grad_scale=2 * step / 1e-3, clip_grad_val=step, momentum=0.9, perturb_grad_scale=1e-4)
        else:
            upd = dict(update_rule=update_rule, lr=lr, max_grad_norm=max_grad_norm, momentum=0.9,
                       use_nesterov=update_rule == "sgd")
        m = self.module(task, guidance_scale=cfg, sampler=sampler, steps=steps, num_cuts=num_cuts, **upd)
        traj = Trajectory()
        t0 = self._start()
        self._fit(m, iters, [traj])
        ev = m.final_evaluation()
        seconds = self._seconds(t0)
        compute = self._compute(task, seconds, iters + 1, cfg)  # before the reference images are sampled
        images = traj.images + [ev.images.detach().float().cpu()]
        ref = self.reference(task, cfg)
        verdicts = [self._verdicts(task, im, ref) for im in images]
        chain = steps * (2 if sampler == "edict" else 1)
        per_iter = (compute["unet_forward_per_image"] - chain) / max(iters, 1)
        curve = [{"iterations": i, "unet_evaluations_per_image": round(chain + i * per_iter, 2),
                  "per_item": {k: verdicts[i]["metrics"][k] for k in (task.primary, task.guide_metric)}}
                 for i in range(iters + 1)]
        params = {"sampler": sampler, "steps": steps, "cfg": cfg, "update_rule": update_rule, "iters": iters,
                  "num_cuts": num_cuts, **({"step": step} if update_rule == "official" else {"lr": lr, "max_grad_norm": max_grad_norm})}
        rec = {"method": "doodl", "params": params, "compute": compute, "curve": curve,
               "loss_trace": [round(float(x.mean()), 6) for x in traj.losses] + [round(float(ev.total.mean()), 6)],
               "guide_loss": [round(float(x), 6) for x in ev.total]}
        rec.update(verdicts[-1])
        rec["images"] = images[-1]
        rec["curve_images"] = images
        return rec


# ------------------------------------------------------------------------------------------------ statistics
def mean_ci(values, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean and 95% percentile-bootstrap interval over items."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci95": [mean, mean], "n": len(x)}
    g = torch.Generator().manual_seed(seed)
    boots = x[torch.randint(0, len(x), (n_boot, len(x)), generator=g)].mean(1).sort().values
    return {"mean": mean, "ci95": [float(boots[int(0.025 * n_boot)]), float(boots[int(0.975 * n_boot) - 1])], "n": len(x)}


def sign_test(a, b) -> dict:
    """Exact two-sided sign test on paired outcomes: items where a > b vs a < b (ties dropped)."""
    wins = sum(1 for x, y in zip(a, b) if x > y)
    losses = sum(1 for x, y in zip(a, b) if x < y)
    n, k = wins + losses, min(wins, losses)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_better": wins, "b_better": losses, "ties": len(list(a)) - n, "p_two_sided": p}


def paired(a, b) -> dict:
    """The difference a - b of paired per-item values: mean, paired bootstrap interval over items, sign test."""
    d = [float(x) - float(y) for x, y in zip(a, b)]
    return {**mean_ci(d), "sign_test": sign_test(a, b)}


# ------------------------------------------------------------------------------------------------ selection
def best_by(records: list[dict], task: Task, key=None) -> dict:
    """The record with the highest validation mean of the primary measure (ties: the first, i.e. the cheaper)."""
    key = key or (lambda r: sum(r["metrics"][task.primary]) / len(r["metrics"][task.primary]))
    return max(records, key=key)


def best_iteration(rec: dict, task: Task) -> tuple[int, float]:
    """The iteration count with the highest validation mean along a DOODL curve (ties: fewer iterations)."""
    means = [_point_mean(p, task) for p in rec["curve"]]
    i = max(range(len(means)), key=lambda k: (means[k], -k))
    return i, means[i]


def bracketed(values: list[float], best: float) -> bool:
    """Whether a sweep's optimum is inside it (not at either end)."""
    s = sorted(values)
    return len(s) < 3 or s[0] < best < s[-1]


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), json.dumps(obj, indent=1))


def strip(rec: dict) -> dict:
    """A record without its tensors (images), for JSON."""
    return {k: v for k, v in rec.items() if k not in ("images", "candidate_images", "candidate_verdicts", "curve_images")}


def threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------ the protocol
@dataclass
class Plan:
    """What is swept on validation and what runs on test. Sizes come from the mode (``shapes_eval.MODES``)."""

    steps: int = 10                       # sampler steps of every method (DDIM; EDICT at the same steps)
    timestep_grid: str | None = "official"  # the time grid of every method; null: the model's own (SD-Turbo's trailing)
    variants: bool = True                 # DOODL-EDICT, cutouts and EDICT at the paper's steps (off for 1-step models)
    cfgs: tuple = (2.5, 7.5)              # classifier-free guidance scales tried for every method
    scales: tuple = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # one-step grad_scale
    doodl_steps: tuple = (0.03, 0.1, 0.3)  # official update: per-iteration bound on each element's move
    adam_lrs: tuple = (0.03,)
    sgd_lrs: tuple = (1.0,)
    max_grad_norm: float = 1.0            # per item, for adam and sgd
    iters: int = 8                        # DOODL iterations of every configuration in the validation sweep
    iters_max: int = 32                   # the chosen configuration's validation curve runs this far: its
                                          # iteration count is read from it (bracketed unless best at the end)
    n_max: int = 64                       # best-of-N candidates (every N <= n_max is read from one search)
    val_n_max: int | None = 32            # best-of-N's CFG is chosen at this N on validation (None: n_max)
    paper_steps: int = 50                 # DOODL-EDICT at the paper's steps (on a subset)
    num_cuts: int = 4                     # the cutout variant of DOODL-DDIM
    extras_items: int = 32                # test items of the subset variants (DOODL-EDICT, cutouts)
    paper_items: int = 16                 # test items of DOODL-EDICT at the paper's steps (5x the chain)
    val_extras_items: int = 16            # validation items of the subset variants (half that at the paper's steps)
    # the search methods (``search_methods.py``): each runs n_max chain evaluations per image, its knob swept here
    search: bool = True                   # run them at all (validation and test)
    fk_lmbdas: tuple = (1.0, 10.0, 100.0)  # FK steering's lambda (the guide's loss scale differs per task)
    fk_particles: int = 4
    fk_resample_every: int = 2
    zo_radii: tuple = (0.3, 1.0)          # zero-order search's neighbourhood
    zo_neighbours: int = 4
    refine_candidates: tuple = (4, 16)    # search then refine: best-of-K first
    population_members: tuple = (2, 4)
    population_exchange_every: int = 2
    eot_samples: tuple = (4,)             # DOODL + EOT guide: transformed copies per image
    margin_stops: tuple = (0.1, 0.5)      # DOODL + margin stop: guide-loss thresholds (classifier: -log p*, p* 0.9 / 0.6)
    budgets: tuple = (4, 16, 64)          # the budget table's budgets, in chains per image (x steps = UNet evaluations)


def _point_mean(point: dict, task: Task) -> float:
    """The primary measure's mean at one point of a curve (an iteration count, or an N)."""
    v = point["per_item"][task.primary]
    return sum(v) / len(v)


def _mean(rec: dict, task: Task) -> float:
    v = rec["metrics"][task.primary]
    return sum(v) / len(v)


def validate(runner: Runner, task: Task, plan: Plan, extras: bool = True) -> dict:
    """Choose every knob of every method on the validation task; returns the choices and every validation run."""
    runs: dict[str, dict] = {}
    choices: dict[str, dict] = {}

    def keep(key, rec):
        runs[key] = strip(rec)
        log(f"  [{task.name}/val] {key:44s} {task.primary}={_mean(rec, task):.3f}  "
            f"{rec['compute']['seconds_total']:.0f} s", flush=True)
        return rec

    # one-step: CFG x grad_scale, extended past an end of the sweep when the optimum sits there
    one = [keep(f"one_step cfg{c:g} s{s:g}", runner.one_step(task, s, c)) for c in plan.cfgs for s in plan.scales]
    best = best_by(one, task)
    scales = list(plan.scales)
    for _ in range(2):
        if bracketed(scales, best["params"]["scale"]):
            break
        s = best["params"]["scale"] * (10.0 if best["params"]["scale"] == max(scales) else 0.1)
        scales.append(s)
        best = best_by([best, keep(f"one_step cfg{best['params']['cfg']:g} s{s:g}",
                                   runner.one_step(task, s, best["params"]["cfg"]))], task)
    choices["one_step"] = {**best["params"], "val_mean": _mean(best, task),
                           "bracketed": bracketed(scales, best["params"]["scale"]), "sweep": sorted(scales)}

    # best-of-N: CFG, judged at N = val_n_max
    n_val = plan.val_n_max or plan.n_max
    bon = {c: keep(f"best_of_n cfg{c:g} N{n_val}", runner.best_of_n(task, n_val, c)) for c in plan.cfgs}
    c_bon = max(plan.cfgs, key=lambda c: (_mean(bon[c], task), -plan.cfgs.index(c)))
    choices["best_of_n"] = {"cfg": c_bon, "judged_at_n": n_val, "val_mean_at_n": _mean(bon[c_bon], task)}

    # DOODL-DDIM: CFG at the middle step, then the update variants at that CFG; iterations from each curve
    mid = plan.doodl_steps[len(plan.doodl_steps) // 2]
    cands = []

    def doodl(label, **kw):
        rec = keep(label, runner.doodl(task, plan.iters, **kw))
        i, m = best_iteration(rec, task)
        cands.append((m, -i, label, kw, i))
        return rec

    for c in plan.cfgs:
        doodl(f"doodl ddim cfg{c:g} official step{mid:g}", cfg=c, step=mid)
    cfg = max(cands, key=lambda x: x[:2])[3]["cfg"]
    steps = list(plan.doodl_steps)
    for s in [s for s in steps if s != mid]:
        doodl(f"doodl ddim cfg{cfg:g} official step{s:g}", cfg=cfg, step=s)
    official = [x for x in cands if x[3].get("cfg") == cfg and "update_rule" not in x[3]]
    top = max(official, key=lambda x: x[:2])[3]["step"]
    if not bracketed(steps, top):  # extend once past the end the optimum sits at
        s = top * (3.0 if top == max(steps) else 1 / 3)
        steps.append(s)
        doodl(f"doodl ddim cfg{cfg:g} official step{s:g}", cfg=cfg, step=s)
    for lr in plan.adam_lrs:
        doodl(f"doodl ddim cfg{cfg:g} adam lr{lr:g}", cfg=cfg, update_rule="adam", lr=lr, max_grad_norm=plan.max_grad_norm)
    for lr in plan.sgd_lrs:
        doodl(f"doodl ddim cfg{cfg:g} sgd lr{lr:g}", cfg=cfg, update_rule="sgd", lr=lr, max_grad_norm=plan.max_grad_norm)
    m, _, label, kw, iters = max([x for x in cands if x[3]["cfg"] == cfg], key=lambda x: x[:2])
    official = [x[3]["step"] for x in cands if x[3]["cfg"] == cfg and "update_rule" not in x[3]]
    choices["doodl_ddim"] = {**kw, "iters": iters, "val_mean": m, "chosen_from": label,
                             "official_step_sweep": sorted(official),
                             "official_step_bracketed": bracketed(official, max(
                                 [x for x in cands if x[3]["cfg"] == cfg and "update_rule" not in x[3]],
                                 key=lambda x: x[:2])[3]["step"])}
    upd = {k: v for k, v in kw.items() if k != "cfg"}

    # the iteration count: the chosen configuration's curve run on to iters_max, its best point read from it
    # (the sweep's short curves cannot bracket it when they still rise at their end)
    if plan.iters_max > plan.iters:
        long = keep(f"{label} to {plan.iters_max} it", runner.doodl(task, plan.iters_max, **kw))
        iters, m = best_iteration(long, task)
        choices["doodl_ddim"].update(iters=iters, val_mean=m, iterations_run=plan.iters_max)
        curve = long["curve"]
    else:
        curve = runs[label]["curve"]
    choices["doodl_ddim"]["iterations_bracketed"] = iters < len(curve) - 1
    # (UNet evaluations per image, validation mean) along both curves: the validation figure
    choices["doodl_ddim"]["iteration_curve"] = [[p["unet_evaluations_per_image"], round(_point_mean(p, task), 5)]
                                                for p in curve]
    choices["best_of_n"]["n_curve"] = [[p["unet_evaluations_per_image"], round(_point_mean(p, task), 5)]
                                       for p in runs[f"best_of_n cfg{c_bon:g} N{n_val}"]["curve"]]

    # the variants that go to test with DDIM's update: EDICT (same steps), cutouts; iterations from their own
    # curves, run as far as DDIM's chosen count (at least the sweep's)
    if extras and plan.variants:
        sub, small = subset(task, plan.val_extras_items), subset(task, max(1, plan.val_extras_items // 2))
        for key, kw2, t in (("doodl_edict", dict(sampler="edict"), sub),
                            ("doodl_ddim_cutouts", dict(num_cuts=plan.num_cuts), sub),
                            ("doodl_edict_paper_steps", dict(sampler="edict", steps=plan.paper_steps), small)):
            rec = runner.doodl(t, max(plan.iters, iters), cfg=cfg, **upd, **kw2)
            runs[key] = strip(rec)
            i, m = best_iteration(rec, t)
            log(f"  [{task.name}/val] {key:44s} best {m:.3f} after {i} iterations", flush=True)
            choices[key] = {"cfg": cfg, **upd, **kw2, "iters": i, "val_mean": m, "val_items": len(t.items)}
    if plan.search:
        from search_methods import validate_search

        more, more_runs = validate_search(runner, task, plan, choices, log)
        choices.update(more)
        runs.update(more_runs)
    return {"choices": choices, "runs": runs}


def subset(task: Task, n_items: int) -> Task:
    """The first seeds of every prompt, about ``n_items`` items (the expensive variants' test subset)."""
    k = max(1, math.ceil(n_items / len(task.prompts)))
    return replace(task, seeds=task.seeds[:k])


SEARCH_METHODS = ("fk_steering", "zero_order", "search_refine", "population_doodl", "doodl_eot", "doodl_margin")  # search_methods.py
TEST_METHODS = ("one_step", "best_of_n", "doodl_ddim", "doodl_edict", "doodl_ddim_cutouts", "doodl_edict_paper_steps",
                *SEARCH_METHODS)


def run_test(runner: Runner, task: Task, plan: Plan, choices: dict, method: str) -> dict:
    """One method on the test task with its frozen validation choices."""
    c = choices[method]
    if method in SEARCH_METHODS:
        from search_methods import run_search_test

        return run_search_test(runner, task, choices, method)
    if method == "one_step":
        return runner.one_step(task, c["scale"], c["cfg"])
    if method == "best_of_n":
        return runner.best_of_n(task, plan.n_max, c["cfg"])
    kw = {k: v for k, v in c.items() if k in ("cfg", "sampler", "steps", "update_rule", "step", "lr", "max_grad_norm",
                                              "num_cuts")}
    t = task if method == "doodl_ddim" else subset(
        task, plan.paper_items if method == "doodl_edict_paper_steps" else plan.extras_items)
    # DOODL-DDIM's curve runs at least as far as the validation sweep's (the figure shows it); the subset
    # variants stop at their chosen count; the method's result is the point at the chosen iterations
    i = c["iters"]
    rec = runner.doodl(t, max(i, plan.iters) if method == "doodl_ddim" else max(i, 1), **kw)
    rec["chosen_iterations"] = i
    rec["metrics"] = {**rec["metrics"], **rec["curve"][i]["per_item"]}
    full = runner._verdicts(t, rec["curve_images"][i], runner.reference(t, kw["cfg"]))
    rec.update(full)
    rec["images"] = rec["curve_images"][i]
    rec["compute_at_chosen"] = {"unet_evaluations_per_image": rec["curve"][i]["unet_evaluations_per_image"],
                                "seconds_per_image": round(rec["compute"]["seconds_per_image"] * rec["curve"][i]["unet_evaluations_per_image"]
                                                           / rec["curve"][-1]["unet_evaluations_per_image"], 4),
                                "guidance_evaluations_per_image": i + 1}
    rec["items"] = len(t.items)
    return rec


def task_info(task: Task) -> dict:
    return {"name": task.name, "split": task.split, "prompts": task.prompts, "seeds": task.seeds,
            "items": len(task.items), "primary": task.primary, "guide_metric": task.guide_metric,
            "metrics": task.metrics, "binary": task.binary, **task.info}


def save_test(out: Path, task: Task, method: str, rec: dict, meta: dict, n_examples: int = 8) -> None:
    """``<out>/<task>/test/<method>.json`` (+ example images): one part of a test run, merged by ``report``."""
    from safetensors.torch import save_file

    d = out / task.name / "test"
    d.mkdir(parents=True, exist_ok=True)
    n_p, n_s = len(task.prompts), len(rec["images"]) // len(task.prompts)
    cols = [(j % n_p) * n_s + j // n_p for j in range(min(n_examples, len(rec["images"])))]  # one per prompt first
    tmp = d / f".{method}_examples.safetensors.tmp"
    save_file({"images": rec["images"][cols].contiguous()}, str(tmp))
    os.replace(tmp, d / f"{method}_examples.safetensors")
    keys = [[c // n_s, c % n_s] for c in cols]  # (prompt index, seed index): subsets hold the first seeds
    save_json(d / f"{method}.json", {"task": task_info(task), "meta": meta, "example_items": cols, "example_keys": keys,
                                     "record": strip(rec)})


# ------------------------------------------------------------------------------------------------ report
METHOD_LABELS = {"best_of_n": "best-of-N", "doodl_ddim": "DOODL-DDIM", "one_step": "one-step guidance",
                 "fk_steering": "FK steering", "zero_order": "zero-order search", "search_refine": "search then refine",
                 "population_doodl": "population DOODL", "doodl_eot": "DOODL + EOT guide",
                 "doodl_margin": "DOODL + margin stop"}
CURVE_NOTES = {"best_of_n": " (N = 1...)", "doodl_ddim": " (0, 1, ... it)"}


def _budget_methods(summary: dict) -> list[str]:
    """The methods of an experiment's budget table, in a fixed order."""
    seen = {m for b in summary["budgets"] for m in b["methods"]}
    return [m for m in METHOD_LABELS if m in seen]


SUBSET_METHODS = {"doodl_edict": "DOODL-EDICT", "doodl_ddim_cutouts": "DOODL-DDIM + cutouts",
                  "doodl_edict_paper_steps": "DOODL-EDICT, paper's steps"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _num(x: float, k: float) -> str:
    """A rate in % with one decimal (k = 100), a continuous measure with three significant digits (k = 1)."""
    return f"{x * k:.1f}" if k == 100.0 else f"{x:.3g}"


def _pct(m: dict, k: float) -> str:
    return f"{_num(m['mean'], k)} [{_num(m['ci95'][0], k)}, {_num(m['ci95'][1], k)}]"


def _items_of(full: dict, sub: dict) -> list[int]:
    """Indices into the full test task's items of a subset task's items (same prompts, first seeds)."""
    n_s = len(full["seeds"])
    return [p * n_s + s for p in range(len(full["prompts"])) for s in range(len(sub["seeds"]))]


def summarise(exp_dir: Path, targets: Callable | None = None) -> dict:
    """Merge an experiment's validation choices and test parts into rows, paired differences and targets."""
    val = _load(exp_dir / "val.json")
    tests = {p.stem: _load(p) for p in sorted((exp_dir / "test").glob("*.json"))}
    missing = [m for m in ("one_step", "best_of_n", "doodl_ddim") if m not in tests]
    if missing:
        return {"name": exp_dir.name, "incomplete": f"test parts missing: {', '.join(missing)}", "choices": val["choices"]}
    task = tests["doodl_ddim"]["task"]
    prim, guide = task["primary"], task["guide_metric"]
    k = 100.0 if task["binary"] else 1.0
    one, bon, dd = (tests[m]["record"] for m in ("one_step", "best_of_n", "doodl_ddim"))
    n_max = bon["params"]["n_max"]
    steps = dd["params"]["steps"]
    per_candidate_s = bon["compute"]["seconds_per_image"] / n_max
    at = dd["compute_at_chosen"]
    n_evals = max(1, min(n_max, round(at["unet_evaluations_per_image"] / steps)))
    n_secs = max(1, min(n_max, round(at["seconds_per_image"] / per_candidate_s)))
    rows = []

    def row(key, label, per_item, guide_item, compute, setting, items=None, full=None):
        rows.append({"key": key, "label": label, "setting": setting, "items": len(per_item),
                     "primary": mean_ci(per_item), "guide": mean_ci(guide_item), "compute": compute,
                     "other": {m: mean_ci(v)["mean"] for m, v in (full or {}).items() if m not in (prim, guide)},
                     "per_item": per_item, "item_index": items})

    def bon_row(n, why):
        c = bon["curve"][n - 1]["per_item"]
        full = bon["metrics"] if n == n_max else None
        row(f"best_of_{n}", f"best-of-{n}", c[prim], c[guide],
            {"unet": n * steps, "backprop": 0, "guidance": n, "seconds": round(per_candidate_s * n, 4)},
            f"N = {n} ({why}), CFG {bon['params']['cfg']:g}", full=full)

    c0 = bon["curve"][0]["per_item"]
    row("unguided", "unguided (best-of-1)", c0[prim], c0[guide],
        {"unet": steps, "backprop": 0, "guidance": 1, "seconds": round(per_candidate_s, 4)},
        f"DDIM {steps} steps, CFG {bon['params']['cfg']:g}")
    oc = one["compute"]
    row("one_step", "one-step guidance (official)", one["metrics"][prim], one["metrics"][guide],
        {"unet": oc["unet_forward_per_image"], "backprop": oc["unet_backward_per_image"],
         "guidance": oc["guidance_evaluations_per_image"], "seconds": oc["seconds_per_image"]},
        f"grad_scale {one['params']['scale']:g}, CFG {one['params']['cfg']:g}", full=one["metrics"])
    searches = {m: tests[m]["record"] for m in SEARCH_METHODS if m in tests}
    equal = {m: (max(1, min(n_max, round(r["compute"]["unet_evaluations_per_image"] / steps))),
                 max(1, min(n_max, round(r["compute"]["seconds_per_image"] / per_candidate_s))))
             for m, r in searches.items()}
    reasons: dict[int, list[str]] = {}
    for n, why in ((4, "fixed"), (16, "fixed"), (n_evals, "DOODL's UNet evaluations"), (n_secs, "DOODL's seconds"),
                   (n_max, "the largest"), *[(ne, f"{m}'s UNet evaluations") for m, (ne, _) in equal.items()],
                   *[(ns, f"{m}'s seconds") for m, (_, ns) in equal.items()]):
        if n <= n_max and why not in reasons.setdefault(n, []):
            reasons[n].append(why)
    for n in sorted(reasons):
        bon_row(n, "; ".join(reasons[n]))

    def doodl_row(key, label, rec, items=None):
        ci = rec["compute_at_chosen"]
        p = rec["params"]
        upd = f"step {p['step']:g}" if p["update_rule"] == "official" else f"{p['update_rule']} lr {p['lr']:g}"
        per_iter_backprop = rec["compute"]["unet_backward_per_image"] / max(p["iters"], 1)
        row(key, label, rec["metrics"][prim], rec["metrics"][guide],
            {"unet": ci["unet_evaluations_per_image"], "backprop": round(per_iter_backprop * rec["chosen_iterations"], 2),
             "guidance": ci["guidance_evaluations_per_image"], "seconds": ci["seconds_per_image"]},
            f"{p['sampler'].upper()} {p['steps']} steps, {upd}, {rec['chosen_iterations']} it, CFG {p['cfg']:g}"
            + (f", {p['num_cuts']} cutouts" if p["num_cuts"] else ""), items=items, full=rec["metrics"])

    doodl_row("doodl_ddim", "DOODL-DDIM", dd)
    for m, label in SUBSET_METHODS.items():
        if m in tests:
            doodl_row(m, label + " (test subset)", tests[m]["record"], _items_of(task, tests[m]["task"]))
    from search_methods import METHODS as SEARCH

    for m, rec in searches.items():
        c, p = rec["compute"], rec["params"]
        knob = SEARCH[m].knob
        row(m, SEARCH[m].label, rec["metrics"][prim], rec["metrics"][guide],
            {"unet": c["unet_evaluations_per_image"], "backprop": c["backprop_per_image"],
             "guidance": c["guidance_per_image"], "seconds": c["seconds_per_image"]},
            f"{knob} {p[knob]:g}, CFG {p['cfg']:g}, {rec['chosen_point'] + 1} of {p['steps']} steps", full=rec["metrics"])
    by = {r["key"]: r for r in rows}
    d_items = dd["metrics"][prim]
    pairs = {}
    for other in ["one_step", f"best_of_{n_evals}", f"best_of_{n_secs}", "best_of_16"]:
        if other in by and f"doodl_ddim - {other}" not in pairs:
            pairs[f"doodl_ddim - {other}"] = paired(d_items, by[other]["per_item"])
    for m in SUBSET_METHODS:
        if m in by:
            idx = by[m]["item_index"]
            pairs[f"{m} - one_step (subset items)"] = paired(by[m]["per_item"], [one["metrics"][prim][i] for i in idx])
    for m, (ne, ns) in equal.items():
        for other in (f"best_of_{ne}", f"best_of_{ns}", "doodl_ddim"):
            if f"{m} - {other}" not in pairs:
                pairs[f"{m} - {other}"] = paired(by[m]["per_item"], by[other]["per_item"])
    summary = {"name": exp_dir.name, "task": task, "choices": val["choices"], "rows": rows, "paired": pairs,
               "n_equal_compute": {"unet_evaluations": n_evals, "seconds": n_secs, "n_max": n_max},
               "curves": {"best_of_n": [(p["unet_evaluations_per_image"], mean_ci(p["per_item"][prim])) for p in bon["curve"]],
                          "doodl_ddim": [(p["unet_evaluations_per_image"], mean_ci(p["per_item"][prim])) for p in dd["curve"]],
                          "one_step": [(oc["unet_forward_per_image"], mean_ci(one["metrics"][prim]))],
                          **{m: [(p["unet_evaluations_per_image"], mean_ci(p["per_item"][prim])) for p in r["curve"]]
                             for m, r in searches.items()}},
               "seconds_curves": {
                   "best_of_n": [(round(per_candidate_s * p["n"], 4), mean_ci(p["per_item"][prim])) for p in bon["curve"]],
                   "doodl_ddim": [(round(dd["compute"]["seconds_per_image"] * p["unet_evaluations_per_image"]
                                         / dd["curve"][-1]["unet_evaluations_per_image"], 4), mean_ci(p["per_item"][prim]))
                                  for p in dd["curve"]],
                   "one_step": [(oc["seconds_per_image"], mean_ci(one["metrics"][prim]))],
                   **{m: [(p["seconds_per_image"], mean_ci(p["per_item"][prim])) for p in r["curve"]]
                      for m, r in searches.items()}},
               "budgets": budget_rows(val, bon, dd, one, searches, prim, steps),
               "meta": {m: t["meta"] for m, t in tests.items()}, "val_meta": val.get("meta")}
    if targets is not None:
        summary["targets"] = targets(summary)
    for r in rows:
        r.pop("per_item")
    return summary


def _best_point(curve: list, budget: float) -> int | None:
    """The index of the best validation point ([UNet evaluations, mean] pairs) within ``budget`` (ties: cheaper)."""
    within = [i for i, (u, _) in enumerate(curve) if u <= budget + 1e-6]
    return max(within, key=lambda i: (curve[i][1], -i)) if within else None


def budget_rows(val: dict, bon: dict, dd: dict, one: dict, searches: dict, prim: str, steps: int) -> list[dict]:
    """"Which method at which budget": for each budget of UNet evaluations per image, each method's test result at
    the point validation chose within that budget (best-of-N: N = budget / steps; DOODL: the best iteration of its
    validation curve within it; the search methods: their ``budget_points``; one-step when it fits), the best
    method, and the best method other than best-of-N (``rival``) against best-of-N at that budget (paired over
    items), ahead or behind."""
    plan = (val.get("meta") or {}).get("plan") or {}
    out = []
    for b in plan.get("budgets", (4, 16, 64)):
        budget = b * steps
        cands = {}
        n = budget // steps
        if 1 <= n <= len(bon["curve"]):
            cands["best_of_n"] = (f"N = {n}", bon["curve"][n - 1]["per_item"][prim])
        i = _best_point(val["choices"]["doodl_ddim"].get("iteration_curve", []), budget)
        if i is not None and i < len(dd["curve"]):
            cands["doodl_ddim"] = (f"{i} it", dd["curve"][i]["per_item"][prim])
        if one["compute"]["unet_forward_per_image"] <= budget:
            cands["one_step"] = ("official", one["metrics"][prim])
        for m, rec in searches.items():
            j = rec.get("budget_points", {}).get(f"{budget:g}")
            if j is not None and j < len(rec["curve"]):
                cands[m] = (f"{j + 1} step{'s' if j else ''}", rec["curve"][j]["per_item"][prim])
        if not cands:
            continue
        stats = {k: {"label": lab, **mean_ci(v)} for k, (lab, v) in cands.items()}
        best = max(stats, key=lambda k: stats[k]["mean"])
        entry = {"budget": budget, "methods": stats, "best": best}
        others = [k for k in stats if k != "best_of_n"]
        if "best_of_n" in cands and others:  # the best method that is not best-of-N, against it (ahead or behind)
            rival = max(others, key=lambda k: stats[k]["mean"])
            entry["rival"] = rival
            entry["rival_minus_best_of_n"] = paired(cands[rival][1], cands["best_of_n"][1])
        out.append(entry)
    return out


def guide_label(label: str) -> str:
    return label if label.startswith("guide") else f"guide: {label}"


def write_report(out: Path, summaries: list[dict], header: list[str], descriptions: dict[str, str], ymax: dict) -> None:
    """results.json, results.md and ``<exp>_compute.png`` (evaluator measure against UNet evaluations per image)."""
    from eval_lib import draw_curves

    md = list(header)
    for s in summaries:
        md += [f"## {s['name']}", ""]
        if "incomplete" in s:
            md += [f"Not complete: {s['incomplete']}.", ""]
            continue
        t = s["task"]
        k = 100.0 if t["binary"] else 1.0
        unit = " (%)" if t["binary"] else ""
        label = {d["name"]: d["label"] for d in t["metrics"]}
        md += [descriptions.get(s["name"], ""), "",
               f"Test: {t['items']} items ({len(t['prompts'])} prompts x {len(t['seeds'])} seeds); validation on "
               "other seeds and other prompts (or other targets), every choice below frozen before the test run.", "",
               f"| method | setting | items | {label[t['primary']]}{unit} [95% CI] | {guide_label(label[t['guide_metric']])}{unit} "
               "| guide − evaluator (points) | other evaluator measures | UNet evals/img (backprop'd) | guidance evals/img "
               "| s/img |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            other = ", ".join(f"{label.get(m, m)} {_num(v, 100.0 if d['percent'] else 1.0)}"
                              for m, v in r["other"].items() for d in t["metrics"] if d["name"] == m)
            c = r["compute"]
            # how far the guide's verdict runs ahead of the evaluator's (rates only: the same units); a method that
            # fools its guide shows a large gap
            gap = f"{(r['guide']['mean'] - r['primary']['mean']) * 100:+.1f}" if t["binary"] else "-"
            md.append(f"| {r['label']} | {r['setting']} | {r['items']} | {_pct(r['primary'], k)} | "
                      f"{_num(r['guide']['mean'], k)} | {gap} | {other or '-'} | {c['unet']:g} ({c['backprop']:g}) | "
                      f"{c['guidance']:g} | {c['seconds']:.3f} |")
        md += ["", "Paired differences over items (mean [95% paired bootstrap CI]; exact two-sided sign test):", "",
               "| difference | mean [95% CI] | first better / second better / ties | sign-test p |", "|---|---|---|---|"]
        for name, p in s["paired"].items():
            st = p["sign_test"]
            md.append(f"| {name} | {_pct(p, k)} | {st['a_better']} / {st['b_better']} / {st['ties']} | {st['p_two_sided']:.2g} |")
        if s.get("targets"):
            md += ["", "Targets: " + "; ".join(f"{n}: {'MET' if v['met'] else 'NOT MET'} ({v['detail']})"
                                               for n, v in s["targets"].items())]
        ch = s["choices"]
        md += ["", "Validation choices (frozen in `" + s["name"] + "/val.json` before the test run):", ""]
        md += [f"- {m}: " + ", ".join(f"{kk} {vv:g}" if isinstance(vv, float) else f"{kk} {vv}" for kk, vv in c.items()
                                      if kk not in ("sweep", "official_step_sweep", "iteration_curve", "n_curve",
                                                    "val_curve", "budget_points", "setting"))
               + (f"; sweep {c.get('sweep') or c.get('official_step_sweep')}" if c.get("sweep") or c.get("official_step_sweep") else "")
               for m, c in ch.items()]
        val_fig = _validation_curves(s, out / f"{s['name']}_validation.png", k, unit, label[t["primary"]],
                                     ymax.get(s["name"], 100.0 if t["binary"] else None))
        if val_fig:
            md += ["", val_fig, "", f"![{s['name']}: validation curves]({s['name']}_validation.png)"]
        md += ["", f"![{s['name']}: evaluator against compute]({s['name']}_compute.png)", ""]
        if s.get("seconds_curves"):
            md += [f"![{s['name']}: evaluator against seconds]({s['name']}_compute_seconds.png)", ""]
        md += [f"![{s['name']}: test examples]({s['name']}_examples.png)", ""]
        draw_examples(out / s["name"], out / f"{s['name']}_examples.png", s)
        if s.get("budgets"):
            md += ["", "Which method at which budget (test; each method stopped where validation chose within the "
                   "budget; margin over best-of-N at the same budget, paired over items):", "",
                   "| UNet evals/img | " + " | ".join(METHOD_LABELS.get(m, m) for m in _budget_methods(s)) +
                   " | best | best other than best-of-N − best-of-N [95% CI], sign-test p |",
                   "|---" * (len(_budget_methods(s)) + 3) + "|"]
            for b in s["budgets"]:
                cells = [(_num(b["methods"][m]["mean"], k) if m in b["methods"] else "-") for m in _budget_methods(s)]
                d = b.get("rival_minus_best_of_n")
                margin = (f"{METHOD_LABELS.get(b['rival'], b['rival'])}: {_pct(d, k)}, p = "
                          f"{d['sign_test']['p_two_sided']:.2g}") if d else "-"
                md.append(f"| {b['budget']:g} | " + " | ".join(cells) + f" | {METHOD_LABELS.get(b['best'], b['best'])} | {margin} |")
            md.append("")  # the table ends before the next experiment's heading
        for kind, xlabel, suffix in (("curves", "UNet evaluations per image (log scale; backprop'd ones counted once)", ""),
                                     ("seconds_curves", "seconds per image (log scale; this run's machine)", "_seconds")):
            cur = s.get(kind)
            if not cur:
                continue
            series = [{"label": METHOD_LABELS.get(m, m) + CURVE_NOTES.get(m, ""), "marker": m == "one_step",
                       "points": [(x, v["mean"] * k, v["ci95"][0] * k, v["ci95"][1] * k) for x, v in pts]}
                      for m, pts in cur.items()]
            draw_curves(series, out / f"{s['name']}_compute{suffix}.png",
                        f"{s['name']} (test, {t['items']} items): {label[t['primary']]}, mean and 95% CI",
                        xlabel, label[t["primary"]] + unit, ymax.get(s["name"], 100.0 if t["binary"] else None))
    atomic_write_text(str(out / "results.md"), "\n".join(md) + "\n")
    save_json(out / "results.json", {"experiments": summaries})


def _validation_curves(summary: dict, path: Path, k: float, unit: str, measure: str, ymax) -> str:
    """The figure and sentence that show where the DOODL iteration count was read (the chosen configuration's
    validation curve beside best-of-N's at its chosen CFG); '' for results made before the curves were kept."""
    from eval_lib import draw_curves

    d, b = summary["choices"]["doodl_ddim"], summary["choices"]["best_of_n"]
    if "iteration_curve" not in d:
        return ""
    dc = d["iteration_curve"]
    series = [{"label": f"DOODL-DDIM (0...{len(dc) - 1} it)", "points": [(x, y * k, y * k, y * k) for x, y in dc]}]
    if b.get("n_curve"):  # first, so each method has the same colour as in the test figure
        series.insert(0, {"label": f"best-of-N (N = 1...{len(b['n_curve'])})",
                          "points": [(x, y * k, y * k, y * k) for x, y in b["n_curve"]]})
    draw_curves(series, path, f"{summary['name']} (validation): {measure}, mean; DOODL's iterations read here",
                "UNet evaluations per image (log scale)", measure + unit, ymax)
    best = d["iters"]
    return (f"Validation curve of the chosen DOODL-DDIM configuration (mean after 0, 1, ... iterations): "
            + ", ".join(_num(y, k) for _, y in dc) + f". Best after {best} iterations of {len(dc) - 1} run: "
            + ("bracketed (the curve falls or stays flat after it)." if d.get("iterations_bracketed")
               else "NOT bracketed (the best is the last point run)."))


def draw_examples(exp_dir: Path, path: Path, summary: dict) -> None:
    """Rows = methods (their test results), columns = example items; border green/red = evaluator verdict."""
    from safetensors.torch import load_file

    from eval_lib import draw_grid

    rows, labels = [], None
    for m in TEST_METHODS:
        f = exp_dir / "test" / f"{m}.json"
        if not f.is_file():
            continue
        part = _load(f)
        rec, cols = part["record"], part["example_items"]
        images = load_file(str(exp_dir / "test" / f"{m}_examples.safetensors"))["images"]
        label = {"one_step": "one-step", "best_of_n": f"best-of-{rec['params'].get('n_max')}",
                 "doodl_ddim": "DOODL-DDIM"}.get(m, SUBSET_METHODS.get(m, METHOD_LABELS.get(m, m)))
        if labels is None:  # the columns: the first method's example items (a full-test method)
            t = part["task"]
            keys = [tuple(k) for k in part["example_keys"]]
            labels = [f"P{p + 1} seed {t['seeds'][si]}" for p, si in keys]
        where = {tuple(k): j for j, k in enumerate(part["example_keys"])}
        pick = [where.get(k) for k in keys]
        blank = torch.zeros_like(images[0])
        rows.append({"label": label, "images": torch.stack([images[j] if j is not None else blank for j in pick]),
                     "ok": [rec["ok"][cols[j]] if j is not None else None for j in pick],
                     "text": [rec["text"][cols[j]] if j is not None else "not in subset" for j in pick]})
    t = summary["task"]
    draw_grid(rows, labels or [], path, title=f"{summary['name']} test examples (border: green = evaluator success, "
              "red = failure)\n" + "\n".join(f"P{i + 1}: {p}" for i, p in enumerate(t["prompts"][:8])))


README_BEGIN, README_END = "<!-- comparison-table:begin (generated) -->", "<!-- comparison-table:end -->"


def readme_table(summaries: list[dict], source: str) -> str:
    """The README's headline table: per experiment, the evaluator's measure of each method on test and the
    paired differences of DOODL-DDIM, generated from ``results.json`` (``source``)."""
    lines = [README_BEGIN, "",
             f"Generated from [`{source}`]({source}) by `shapes_eval.py --stage report --readme README.md`.", "",
             "| experiment: evaluator's measure (test items) | unguided | one-step | DOODL-DDIM | best-of-N at DOODL's "
             "UNet evaluations | best-of-N at DOODL's seconds | DOODL − one-step [paired 95% CI], sign-test p | "
             "DOODL − best-of-N (UNet evaluations) | DOODL − best-of-N (seconds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if "incomplete" in s:
            lines.append(f"| {s['name']} | {s['incomplete']} | | | | | | | |")
            continue
        t = s["task"]
        k = 100.0 if t["binary"] else 1.0
        rows = {r["key"]: r for r in s["rows"]}
        n_e, n_s = s["n_equal_compute"]["unet_evaluations"], s["n_equal_compute"]["seconds"]
        cell = lambda key: _pct(rows[key]["primary"], k)  # noqa: E731
        diff = lambda p: f"{_pct(p, k)}, p = {p['sign_test']['p_two_sided']:.2g}"  # noqa: E731
        label = next(d["label"] for d in t["metrics"] if d["name"] == t["primary"])
        lines.append(f"| {s['name']}: {label}{', %' if t['binary'] else ''} ({t['items']}) | {cell('unguided')} | "
                     f"{cell('one_step')} | {cell('doodl_ddim')} | N = {n_e}: {cell(f'best_of_{n_e}')} | "
                     f"N = {n_s}: {cell(f'best_of_{n_s}')} | {diff(s['paired']['doodl_ddim - one_step'])} | "
                     f"{diff(s['paired'][f'doodl_ddim - best_of_{n_e}'])} | {diff(s['paired'][f'doodl_ddim - best_of_{n_s}'])} |")
    return "\n".join(lines + ["", README_END])


BUDGET_BEGIN, BUDGET_END = "<!-- budget-table:begin (generated) -->", "<!-- budget-table:end -->"


def readme_budget_table(summaries: list[dict], source: str) -> str:
    """The README's "which method at which budget" table: per experiment and budget, the best method on test (each
    method stopped where validation chose within the budget) and its margin over best-of-N at that budget."""
    lines = [BUDGET_BEGIN, "",
             f"Generated from [`{source}`]({source}) by `shapes_eval.py --stage report --readme README.md`.", "",
             "| experiment: evaluator's measure | UNet evals per image | best method (its stopping point) | its result "
             "[95% CI] | best-of-N at that budget | best other method − best-of-N [paired 95% CI], sign-test p | "
             "methods compared |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        if "incomplete" in s or not s.get("budgets"):
            continue
        t = s["task"]
        k = 100.0 if t["binary"] else 1.0
        label = next(d["label"] for d in t["metrics"] if d["name"] == t["primary"])
        for b in s["budgets"]:
            best = b["methods"][b["best"]]
            bon = b["methods"].get("best_of_n")
            d = b.get("rival_minus_best_of_n")
            rival = (f"{METHOD_LABELS.get(b['rival'], b['rival'])} ({b['methods'][b['rival']]['label']}): {_pct(d, k)}, "
                     f"p = {d['sign_test']['p_two_sided']:.2g}") if d else "-"
            lines.append(f"| {s['name']}: {label}{', %' if t['binary'] else ''} | {b['budget']:g} | "
                         f"{METHOD_LABELS.get(b['best'], b['best'])} ({best['label']}) | {_pct(best, k)} | "
                         f"{_pct(bon, k) + ' (' + bon['label'] + ')' if bon else '-'} | {rival} | {len(b['methods'])} |")
    return "\n".join(lines + ["", BUDGET_END])


def update_readme(path: Path, table: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Replace the generated block of ``path`` (between the markers ``begin`` ... ``end``) with ``table``."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no generated-table markers ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(str(path), head + table + tail)
