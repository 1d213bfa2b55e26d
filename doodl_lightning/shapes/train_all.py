"""Retrain the whole shapes world from scratch and measure it (run from the repository root):

    python -m doodl_lightning.shapes.train_all                  # CPU, 2 cores: <= 2 h, two chains in parallel
    python -m doodl_lightning.shapes.train_all --profile gpu    # one GPU, ~6 min, three chains in parallel
    python -m doodl_lightning.shapes.train_all --profile smoke  # a few steps of every stage (a test)
    python -m doodl_lightning.shapes.train_all --time-scale 0.5 --out DIR  # the CPU recipe in about an hour

Stages (each ``python -m doodl_lightning.shapes.train fit --config experiments/shapes/<stage>.yaml``):
VAE -> diffusion (UNet + text encoder, exported with the VAE as sd-shapes/); shapes-CLIP -> aesthetic head;
classifier; evaluator. Chains run as parallel processes; weights go to ``--out`` (default: the package's
weights directory), then ``shapes.quality`` measures them and fills in the model cards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import weights_dir

CONFIG_DIR = Path("experiments/shapes")

# per profile: stage -> extra CLI arguments (on top of the YAML)
PROFILES: dict[str, dict[str, list[str]]] = {
    # 2 CPU cores, two chains of one thread each; time caps keep the whole run under 2 hours
    "cpu": {
        "vae": ["--trainer.max_time", "00:00:20:00"],
        "diffusion": ["--trainer.max_time", "00:01:25:00"],
        "clip": ["--trainer.max_time", "00:00:40:00"],
        "aesthetic": ["--trainer.max_time", "00:00:04:00"],
        "classifier": ["--trainer.max_time", "00:00:25:00"],
        "evaluator": ["--trainer.max_time", "00:00:20:00"],
    },
    "gpu": {
        "vae": ["--trainer.max_steps", "6000", "--trainer.max_time", "00:00:01:10", "--model.init_args.batch_size", "256",
                "--model.init_args.lr", "2e-3"],
        "diffusion": ["--trainer.max_steps", "100000", "--trainer.max_time", "00:00:03:30", "--model.init_args.batch_size",
                      "512", "--model.init_args.lr", "8e-4", "--model.init_args.warmup_steps", "300"],
        "clip": ["--trainer.max_steps", "100000", "--trainer.max_time", "00:00:03:00", "--model.init_args.batch_size",
                 "512", "--model.init_args.lr", "2e-3"],
        "aesthetic": ["--trainer.max_steps", "2000", "--trainer.max_time", "00:00:00:40", "--model.init_args.batch_size", "512"],
        "classifier": ["--trainer.max_steps", "100000", "--trainer.max_time", "00:00:02:00", "--model.init_args.batch_size",
                       "256", "--model.init_args.lr", "3e-3"],
        "evaluator": ["--trainer.max_steps", "100000", "--trainer.max_time", "00:00:02:00", "--model.init_args.batch_size",
                      "256", "--model.init_args.lr", "3e-3"],
    },
    "smoke": {s: ["--trainer.max_steps", "3", "--model.init_args.batch_size", "8", "--model.init_args.warmup_steps", "1",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
              for s in ("vae", "diffusion", "clip", "aesthetic", "classifier", "evaluator")},
}
CHAINS = {"cpu": [["vae", "diffusion"], ["clip", "aesthetic", "classifier", "evaluator"]],
          "gpu": [["vae", "diffusion"], ["clip", "aesthetic"], ["classifier", "evaluator"]],
          "smoke": [["vae", "diffusion", "clip", "aesthetic", "classifier", "evaluator"]]}
EXPORT = {"vae": "vae", "diffusion": "sd-shapes", "clip": "shapes-clip", "aesthetic": "aesthetic",
          "classifier": "classifier", "evaluator": "evaluator"}


def max_time_seconds(hms: str) -> int:
    """Seconds in Lightning's ``max_time`` string ``DD:HH:MM:SS``."""
    d, h, m, sec = (int(x) for x in hms.split(":"))
    return ((d * 24 + h) * 60 + m) * 60 + sec


def scale_time(hms: str, factor: float) -> str:
    """``DD:HH:MM:SS`` times ``factor``, rounded to whole seconds."""
    t = max(1, round(max_time_seconds(hms) * factor))
    return f"{t // 86400:02d}:{t % 86400 // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"


def stage_command(stage: str, out: Path, work: Path, profile: str, extra: str = "", time_scale: float = 1.0) -> list[str]:
    export = (work if stage == "vae" else out) / EXPORT[stage]
    cmd = [sys.executable, "-m", "doodl_lightning.shapes.train", "fit", "--config", str(CONFIG_DIR / f"{stage}.yaml"),
           "--model.init_args.export_dir", str(export), "--trainer.default_root_dir", str(work / "logs" / stage)]
    if stage == "diffusion":
        cmd += ["--model.init_args.vae_path", str(work / "vae")]
    if stage == "aesthetic":
        cmd += ["--model.init_args.clip_dir", str(out / "shapes-clip")]
    args = list(PROFILES[profile][stage])
    if time_scale != 1.0:  # a shorter (or longer) run of the same recipe: every stage's time cap scaled
        args = [scale_time(v, time_scale) if k == "--trainer.max_time" else v
                for k, v in zip([None] + args[:-1], args)]
    return cmd + args + extra.split()


def run_chain(stages, out, work, profile, threads, log, extra="", time_scale=1.0) -> dict:
    times = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for stage in stages:
        cmd = stage_command(stage, out, work, profile, extra, time_scale)
        t0 = time.time()
        with open(work / f"{stage}.log", "w") as f:
            print(f"[train_all] {stage}: {' '.join(cmd[1:])}", file=log, flush=True)
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        times[stage] = {"seconds": round(time.time() - t0, 1), "returncode": rc}
        print(f"[train_all] {stage}: rc={rc} in {time.time() - t0:.0f} s", file=log, flush=True)
        if rc != 0:
            break
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", type=Path, default=weights_dir(), help="where the weights go (default: the package's)")
    ap.add_argument("--work", type=Path, default=Path("outputs/shapes/train_all"), help="logs and the VAE stage")
    ap.add_argument("--stages", nargs="*", default=None, help="only these stages (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every stage's time cap (e.g. 0.5: the CPU recipe in about an hour)")
    ap.add_argument("--extra", default="", help="extra CLI arguments appended to every stage")
    ap.add_argument("--no-quality", action="store_true", help="skip measuring the quality bars at the end")
    ap.add_argument("--quality-args", default="", help="extra arguments for shapes.quality")
    ap.add_argument("--pack", type=Path, default=None,
                    help="also pack the weights into <= 2 tar files here (for machines that return few files)")
    a = ap.parse_args(argv)
    if a.time_scale <= 0:
        ap.error(f"--time-scale must be > 0, got {a.time_scale}")
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    chains = [[s for s in c if a.stages is None or s in a.stages] for c in CHAINS[a.profile]]
    t0 = time.time()
    with ThreadPoolExecutor(len(chains)) as ex:
        results = list(ex.map(lambda c: run_chain(c, a.out, a.work, a.profile, a.threads, sys.stdout, a.extra,
                                                    a.time_scale), chains))
    times = {k: v for r in results for k, v in r.items()}
    summary = {"profile": a.profile, "time_scale": a.time_scale, "total_seconds": round(time.time() - t0, 1), "stages": times}
    (a.work / "train_all.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = all(v["returncode"] == 0 for v in times.values())
    if ok and not a.no_quality:
        cmd = [sys.executable, "-m", "doodl_lightning.shapes.quality", "--weights", str(a.out)] + a.quality_args.split()
        if a.profile == "smoke":
            cmd += ["--smoke"]
        ok = subprocess.call(cmd) == 0
    if a.pack is not None:
        import tarfile

        a.pack.mkdir(parents=True, exist_ok=True)
        groups = {"sd-shapes.tar": ["sd-shapes"], "others.tar": [p.name for p in a.out.iterdir() if p.name != "sd-shapes"]}
        for name, members in groups.items():
            with tarfile.open(a.pack / name, "w") as tar:
                for m in members:
                    if (a.out / m).exists():
                        tar.add(a.out / m, arcname=m)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
