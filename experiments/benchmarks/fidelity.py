"""How much the fidelity fixes and options change the chain, measured on the shipped shapes world.

    python experiments/benchmarks/fidelity.py --out experiments/benchmarks/results/fidelity_cpu.json

Per sampler-step count it samples a batch of seeds of one prompt (float64, CPU) and reports the relative
difference of the final latents (||a - b|| / ||b||, whole batch) between:
  * ``mixing_order``: EDICT with the mixing layer in the step's leapfrog frame (this project before the
    fix) vs the official order (x mixed first at every step);
  * ``grid_edict`` / ``grid_ddim``: the model's scheduler grid (SD: offset 1) vs the official offset-0 grid.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from doodl_lightning.families import UNetBackbone as Backbone  # noqa: E402
from doodl_lightning.data import Item, initial_noise  # noqa: E402
from doodl_lightning.module import default_model  # noqa: E402
from doodl_lightning.sampling import Schedule, edict_step, relative_error, sample_ddim, sample_edict  # noqa: E402

from common import machine_description  # noqa: E402


def sample_edict_mixing_in_frame(eps, x, y, schedule, mix_weight):
    """The pre-fix EDICT chain: the mixing layer applied in the step's leapfrog frame, so on odd steps (where y
    takes the first half-step) y is mixed first. That is the core's ``edict_step`` with the roles of x and y
    swapped on odd steps, each step run as a one-step schedule (parity 0: the first latent steps and mixes first)."""
    for i in range(len(schedule)):
        step = schedule.tail(i).head(1)
        if i % 2 == 0:
            x, y = edict_step(eps, x, y, step, 0, mix_weight)
        else:
            y, x = edict_step(eps, y, x, step, 0, mix_weight)
    return x, y


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--guidance-scale", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "experiments/benchmarks/results/fidelity_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = Backbone.load(default_model(), dtype=torch.float64)
    shape = bb.latent_shape(None)
    z = torch.stack([initial_noise(Item(i, args.prompt, s), shape) for i, s in enumerate(range(args.seeds))]).double()
    with torch.no_grad():
        cond = bb.encode_prompts([args.prompt]).expand(args.seeds, -1, -1)
        eps = bb.denoiser(cond, bb.encode_prompts([""]), args.guidance_scale)
        rows = []
        for n in args.steps:
            official = Schedule.from_scheduler(bb.scheduler, n, "official")
            model = Schedule.from_scheduler(bb.scheduler, n, "model")
            x_off, _ = sample_edict(eps, z, z, official)
            x_old, _ = sample_edict_mixing_in_frame(eps, z, z, official, 0.93)
            x_model, _ = sample_edict(eps, z, z, model)
            d_off, d_model = sample_ddim(eps, z, official), sample_ddim(eps, z, model)
            rows.append({"steps": n, "mixing_order": relative_error(x_old, x_off),
                         "grid_edict": relative_error(x_model, x_off), "grid_ddim": relative_error(d_model, d_off)})
    res = {"meta": {"command": "python experiments/benchmarks/fidelity.py " + " ".join(argv or sys.argv[1:]),
                    "machine": f"{machine_description('cpu')}, float64",
                    "model": "shapes world sd-shapes (shipped)", "prompt": args.prompt, "seeds": args.seeds,
                    "guidance_scale": args.guidance_scale, "seconds": round(time.time() - t0, 1)},
           "relative_difference_of_x0": rows}
    print(f"{'steps':>5}  {'mixing order':>13}  {'grid (EDICT)':>13}  {'grid (DDIM)':>12}")
    for r in rows:
        print(f"{r['steps']:>5}  {r['mixing_order']:>13.4f}  {r['grid_edict']:>13.4f}  {r['grid_ddim']:>12.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
