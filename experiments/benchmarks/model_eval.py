#!/usr/bin/env python
"""The comparison protocol of ``shapes_eval.py`` on any backbone, guidance and held-out metrics, from YAML.

    python experiments/benchmarks/model_eval.py --config experiments/sd15/eval_aesthetic.yaml --out DIR
    python experiments/benchmarks/model_eval.py --config C --out DIR --stage val     # then --stage test, --stage report

The YAML (every key is checked against the code's signatures, as ``cli.py``'s configs are):

    model: the backbone: a hub id, diffusers directory or single file, or
           {class_path: doodl_lightning.families.PretrainedBackbone, init_args: {...}}
    guidance: [guidance modules]       # what every method optimises or ranks by (weighted sum)
    metrics: [guidance modules]        # held out, never optimised: the first is the primary measure; each
                                       # item's measure is minus the module's loss (higher = better)
    val:  {prompts: [...], seeds: [...]}    # or prompt_file; validation and test must not share items
    test: {prompts: [...], seeds: [...]}
    plan: {steps: 50, cfgs: [7.5], ...}     # compare.Plan: what is swept on validation, what runs on test
    device: cuda

There is no success threshold for a generic metric, so every measure is continuous (``binary: false``);
paired intervals and sign tests are over items, as in the shapes world.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from jsonargparse import ArgumentParser, ActionConfigFile  # noqa: E402

from doodl_lightning.families import PretrainedBackbone, resolve_backbone  # noqa: E402
from doodl_lightning.console import quiet_lightning  # noqa: E402
from doodl_lightning.data import make_items  # noqa: E402
from doodl_lightning.guidance.base import Guidance  # noqa: E402
from doodl_lightning.objective import weighted_guidance  # noqa: E402

from common import git_state, machine_description  # noqa: E402
from compare import (TEST_METHODS, Plan, Runner, Task, run_test, save_json, save_test, summarise, task_info,  # noqa: E402
                     validate, write_report)


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", action=ActionConfigFile)
    ap.add_argument("--model", type=PretrainedBackbone | str, required=True)
    ap.add_argument("--guidance", type=list[Guidance], required=True)
    ap.add_argument("--metrics", type=list[Guidance], required=True)
    ap.add_argument("--val", type=dict, required=True)
    ap.add_argument("--test", type=dict, required=True)
    ap.add_argument("--plan", type=Plan, default=Plan())
    ap.add_argument("--name", type=str, default="eval")
    ap.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stage", type=str, default="all", choices=["val", "test", "report", "all"])
    ap.add_argument("--methods", type=list[str], default=list(TEST_METHODS))
    return ap


def build_task(name: str, split: str, spec: dict, guidance: list[Guidance], metrics: list[Guidance],
               device: torch.device) -> Task:
    """A task whose verdict is the held-out metrics (minus their losses) and the guide's own loss."""
    items = make_items(spec.get("prompts"), spec.get("seeds", [0]), spec.get("prompt_file"))
    prompts = list(dict.fromkeys(it.prompt for it in items))
    seeds = list(dict.fromkeys(it.seed for it in items))
    for m in [*guidance, *metrics]:
        m.to(device)
    if len(guidance) != 1:
        raise ValueError("model_eval.py takes one guidance module (weight it inside the module); got "
                         f"{len(guidance)}")
    names = [m.name for m in metrics]

    def verdict(images, task_items, reference=None):
        gens = [torch.Generator().manual_seed(s) for _, s in task_items]
        ps = [p for p, _ in task_items]
        with torch.no_grad():
            out = {f"metric_{n}": (-m(images.to(device), prompts=ps, generators=gens)).tolist()
                   for n, m in zip(names, metrics)}
            out["guide"] = (-weighted_guidance(guidance, ps, gens)(images.to(device))[0]).tolist()
        return out, [None] * len(task_items), [f"{out[f'metric_{names[0]}'][i]:.3f}" for i in range(len(task_items))]

    labels = {f"metric_{n}": f"{n} (held out, -loss)" for n in names}
    labels["guide"] = "guide (-loss)"
    metric_list = [{"name": k, "label": v, "judge": "guide" if k == "guide" else "evaluator", "percent": False}
                   for k, v in labels.items()]
    return Task(name, split, prompts, seeds, lambda num_cuts: guidance[0], verdict, f"metric_{names[0]}", "guide",
                metric_list, binary=False)


def main(argv=None) -> int:
    cfg = parser().parse_args(argv)
    init = parser().instantiate(cfg)
    quiet_lightning()
    device = torch.device(init.device)
    out: Path = init.out
    out.mkdir(parents=True, exist_ok=True)
    plan: Plan = init.plan
    pairs = [{(it.prompt, it.seed) for it in make_items(s.get("prompts"), s.get("seeds", [0]), s.get("prompt_file"))}
             for s in (init.val, init.test)]
    if pairs[0] & pairs[1]:
        raise ValueError(f"val and test share {len(pairs[0] & pairs[1])} (prompt, seed) items: give the validation "
                         "split other seeds (and, where you can, other prompts)")
    commit, dirty = git_state()
    command = "python experiments/benchmarks/model_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def meta():
        return {"command": command, "machine": machine_description(device), "git_commit": commit,
                "uncommitted": dirty, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan": plan.__dict__}

    exp_dir = out / init.name
    if init.stage != "report":
        backbone = resolve_backbone(init.model, None, None, False) if isinstance(init.model, str) else init.model
        runner = Runner(backbone.to(device), device, plan.steps, plan.timestep_grid)
        if init.stage in ("val", "all"):
            task = build_task(init.name, "val", init.val, init.guidance, init.metrics, device)
            save_json(exp_dir / "val.json", {"task": task_info(task), "meta": meta(), **validate(runner, task, plan)})
        if init.stage in ("test", "all"):
            import json

            choices = json.loads((exp_dir / "val.json").read_text())["choices"]
            task = build_task(init.name, "test", init.test, init.guidance, init.metrics, device)
            for method in init.methods:
                if method in choices:
                    save_test(out, task, method, run_test(runner, task, plan, choices, method), meta())
    write_report(out, [summarise(exp_dir)], [f"# DOODL against one-step guidance and best-of-N: {init.name}", "",
                                             f"Command: `{command}`; machine: {machine_description(device)}.", ""],
                 {}, {init.name: None})
    print(f"wrote {out}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
