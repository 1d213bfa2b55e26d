#!/usr/bin/env python
"""A reward with no gradient in the shapes world (issue 28, item 4): DNO's zeroth-order noise optimisation against
best-of-N at equal UNet evaluations, both driven by the shapes evaluator's verdict alone.

    python experiments/benchmarks/blackbox_demo.py            # the config's 16 items, ~1.5 CPU-minutes on 1 thread

The run is ``experiments/methods/dno_blackbox.yaml`` exactly as ``cli.py`` builds it (items, chain, DNO settings,
the ``BlackBoxReward`` of ``shapes.verdict.EvaluatorVerdict``: 1 when the evaluator's most likely shape is the
item's target polygon, else 0); best-of-N runs on the same items, chain and reward with N = the chains per image DNO
spent, so both cost the same UNet evaluations (counted by a forward hook on the UNet, ``compute.UNetCounter``). Each
method keeps, per item, the first image of the best verdict it showed (DNO: its iterates; best-of-N: its candidates).

The evaluator is then both the reward and a judge, so its rate is what the search optimised, not a held-out
measure: the guide classifier's verdict on the same images (never seen by either method here) is the independent
check, and the colour the prompt names (the evaluator's) says whether the image kept the prompt.

Prints a table and writes ``experiments/benchmarks/results/shapes/blackbox_demo.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from doodl_lightning.best_of_n import BestOfN  # noqa: E402
from doodl_lightning.compute import UNetCounter  # noqa: E402
from doodl_lightning.console import quiet_lightning  # noqa: E402
from doodl_lightning.guidance import ClassifierGuidance  # noqa: E402
from doodl_lightning.search import NoiseSearch  # noqa: E402
from doodl_lightning.shapes import ShapesWeights  # noqa: E402
from doodl_lightning.shapes.data import COLOURS, SHAPES  # noqa: E402

from common import machine_info, text_table, write_json  # noqa: E402

CONFIG = ROOT / "experiments" / "methods" / "dno_blackbox.yaml"
OUT = ROOT / "experiments" / "benchmarks" / "results" / "shapes" / "blackbox_demo.json"


class Record(Callback):
    """After every step: the images the method shows, their reward losses and the UNet evaluations so far per image
    (a CFG pair = 1)."""

    def __init__(self, counter: UNetCounter, cfg_rows: int, n: int):
        self.counter, self.per = counter, cfg_rows * n
        self.images, self.losses, self.unet, self.backprop = [], [], [], []

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images.append(pl_module.last.images.detach().float().cpu())
        self.losses.append(pl_module.last.reward.detach().double().cpu())
        self.unet.append((self.counter.rows + self.counter.grad_rows) / self.per)
        self.backprop.append(self.counter.grad_rows / self.per)
        self.seconds = time.perf_counter() - self.t0


def fit(module, steps: int, counter: UNetCounter) -> Record:
    import lightning

    from callbacks import RenormalizeLatents

    rec = Record(counter, module.backbone.rows_per_evaluation(module.hparams.guidance_scale), len(module.items))
    counter.reset()
    lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[rec, RenormalizeLatents()]).fit(module)
    return rec


def judges(targets: dict[str, str], weights: ShapesWeights):
    """images, prompts -> {evaluator_target, guide_target, colour_kept}: per-image 0/1 lists."""
    evaluator = weights.evaluator()
    guide = ClassifierGuidance(target={p: SHAPES.index(t) for p, t in targets.items()}, num_cuts=0,
                               **weights.classifier_kwargs())

    def verdicts(images: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        ev = evaluator(images)
        with torch.no_grad():
            g = guide.logits(images).mean(1).argmax(-1)
        want = [SHAPES.index(targets[p]) for p in prompts]
        colour = [COLOURS.index(p.split()[2]) for p in prompts]
        return {"evaluator_target": [float(int(ev["shape"][i]) == want[i]) for i in range(len(prompts))],
                "guide_target": [float(int(g[i]) == want[i]) for i in range(len(prompts))],
                "colour_kept": [float(int(ev["colour"][i]) == colour[i]) for i in range(len(prompts))]}

    return verdicts


def summarise(label: str, rec: Record, verdicts, prompts: list[str], n_items: int) -> dict:
    """Per step, each item's best-so-far image (the first of its lowest reward loss) judged; the record at the end."""
    losses = torch.stack(rec.losses)  # (steps, items)
    judged = [verdicts(im, prompts) for im in rec.images]
    curve, pick = [], []
    for s in range(len(rec.images)):
        pick = losses[: s + 1].argmin(0).tolist()  # torch.argmin: the first of equal minima
        curve.append({"step": s, "unet_evaluations_per_image": round(rec.unet[s], 2),
                      **{k: sum(judged[p][k][i] for i, p in enumerate(pick)) / n_items for k in judged[0]}})
    final = {k: [judged[p][k][i] for i, p in enumerate(pick)] for k in judged[0]}
    return {"method": label, "unet_evaluations_per_image": round(rec.unet[-1], 2),
            "unet_backprop_per_image": round(rec.backprop[-1], 2),
            "seconds_per_image": round(rec.seconds / n_items, 3), "steps": len(rec.images),
            **{k: sum(v) / n_items for k, v in final.items()}, "per_item": final, "kept_step": pick, "curve": curve}


def _shown(path: str) -> str:
    """A path as the record shows it: relative to the repository when inside it (the committed JSON names no home)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(CONFIG), help="the DNO config (cli.py's YAML)")
    ap.add_argument("--out", default=str(OUT), help="the JSON to write")
    ap.add_argument("--max-steps", type=int, default=None, help="DNO steps (default: the config's trainer.max_steps)")
    ap.add_argument("--prompts", type=int, default=None, help="only the config's first K prompts (a smoke run)")
    ap.add_argument("--chain-steps", type=int, default=None, help="sampler steps (default: the config's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    quiet_lightning()
    from cli import main as cli_main

    extra = []
    if a.chain_steps is not None:
        extra += ["--model.init_args.steps", str(a.chain_steps)]
    argv0, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv beside args: give it this script's name only
    try:
        cli = cli_main(["--config", a.config, *extra], run=False)
    finally:
        sys.argv = argv0
    dno = cli.model
    if a.prompts is not None:  # the same module, on fewer prompts
        hp = {k: v for k, v in dno.hparams.items() if not k.startswith("_") and k != "model"}
        hp["prompts"] = hp["prompts"][: a.prompts]
        dno = type(dno)(model=dno.backbone, guidance=list(dno.guidance), **hp)
    steps = a.max_steps or cli.trainer.max_steps
    reward = dno.guidance[0]
    targets = {p: SHAPES[i] for p, i in reward.reward.targets.items()}
    prompts = [it.prompt for it in dno.items]
    n = len(dno.items)
    counter = UNetCounter(dno.backbone.unet)
    chain = dno.hparams.steps

    print(f"DNO ({dno.hparams.directions} probe pairs, mu {dno.hparams.mu}, {steps} steps) on {n} items ...", flush=True)
    dno_rec = fit(dno, steps, counter)
    chains = round(dno_rec.unet[-1] / chain)
    print(f"best-of-{chains} (equal UNet evaluations) ...", flush=True)
    search_keys = set(inspect.signature(NoiseSearch.__init__).parameters) - {"self", "model", "guidance", "metrics"}
    bon = BestOfN(model=dno.backbone, guidance=list(dno.guidance), candidates=chains,
                  **{k: v for k, v in dno.hparams.items() if k in search_keys})
    bon_rec = fit(bon, chains, counter)

    verdicts = judges(targets, ShapesWeights())
    d = summarise(f"DNO, zeroth order (q={dno.hparams.directions}, {steps} steps)", dno_rec, verdicts, prompts, n)
    b = summarise(f"best-of-{chains}", bon_rec, verdicts, prompts, n)
    first = b["curve"][0]  # step 0 of either method: each item's own seed noise
    unguided = {"method": "unguided (seed noise)", "unet_evaluations_per_image": first["unet_evaluations_per_image"],
                "unet_backprop_per_image": 0.0, **{k: first[k] for k in ("evaluator_target", "guide_target",
                                                                         "colour_kept")}}
    rows = [unguided, b, d]
    wins = {k: {"dno_better": sum(x > y for x, y in zip(d["per_item"][k], b["per_item"][k])),
                "best_of_n_better": sum(y > x for x, y in zip(d["per_item"][k], b["per_item"][k]))}
            for k in ("evaluator_target", "guide_target", "colour_kept")}
    print(text_table([("method", "method", None), ("UNet evals/img", "unet_evaluations_per_image", "f"),
                      ("backprop/img", "unet_backprop_per_image", "f"),
                      ("evaluator target % (= reward)", "evaluator_target", "%"),
                      ("guide target % (independent)", "guide_target", "%"), ("colour kept %", "colour_kept", "%")],
                     rows))
    print("paired items (DNO better / best-of-N better): " + ", ".join(
        f"{k} {v['dno_better']}/{v['best_of_n_better']}" for k, v in wins.items()))
    write_json(a.out, {"what": "issue 28 item 4: DNO (zeroth order) vs best-of-N at equal UNet evaluations, the "
                               "shapes evaluator's verdict as the only reward; the evaluator is also a judge here, the "
                               "guide classifier's verdict is the independent check",
                       "config": _shown(a.config),
                       "items": n, "prompts": sorted(set(prompts)), "targets": targets,
                       "seeds": sorted({it.seed for it in dno.items}), "chain_steps": chain,
                       "dno": {k: dno.hparams[k] for k in ("directions", "mu", "hybrid_weight", "update_rule", "lr",
                                                          "max_grad_norm")},
                       "rows": rows, "paired": wins, "machine": machine_info("cpu")})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
