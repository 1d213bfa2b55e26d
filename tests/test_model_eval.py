"""model_eval.py: the comparison protocol from YAML for any backbone (tiny models here), and every shipped
eval_*.yaml parses against the code's signatures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "model_eval.py"
EVAL_CONFIGS = sorted((ROOT / "experiments").rglob("eval_*.yaml"))


def _parser():
    sys.path.insert(0, str(SCRIPT.parent))
    from model_eval import parser

    return parser()


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=[str(p.relative_to(ROOT)) for p in EVAL_CONFIGS])
def test_eval_config_parses(path):
    cfg = _parser().parse_args(["--config", str(path), "--out", "/nonexistent"])  # parse and type-check only
    assert cfg.guidance and cfg.metrics and cfg.plan.steps > 0
    val, test = cfg.val, cfg.test
    assert val.get("seeds") and test.get("seeds") and not set(val["seeds"]) & set(test["seeds"])


def test_there_are_eval_configs_for_sd15():
    assert {p.name for p in EVAL_CONFIGS} >= {"eval_aesthetic.yaml", "eval_clip_text.yaml"}


@pytest.mark.slow
def test_tiny_model_comparison_from_yaml(tmp_path, tiny_pipeline_dir, tiny_clip):
    clip = {"model_config": str(tiny_clip.config), "pretrained": str(tiny_clip.weights), "num_cuts": 0}
    cfg = {
        "name": "tiny", "model": tiny_pipeline_dir, "device": "cpu",
        "guidance": [{"class_path": "doodl_lightning.guidance.CLIPTextGuidance", "init_args": {**clip, "prompt": "a red circle"}}],
        "metrics": [{"class_path": "doodl_lightning.guidance.SymmetryGuidance"},
                    {"class_path": "doodl_lightning.guidance.CLIPTextGuidance",
                     "init_args": {**clip, "prompt": "a blue circle", "name": "clip_blue"}}],
        "val": {"prompts": ["a circle"], "seeds": [100]},
        "test": {"prompts": ["a circle", "a square"], "seeds": [0, 1]},
        "plan": {"steps": 2, "cfgs": [2.5], "scales": [1.0, 10.0, 100.0], "doodl_steps": [0.1], "adam_lrs": [0.03],
                 "sgd_lrs": [1.0], "iters": 2, "n_max": 3, "paper_steps": 4, "num_cuts": 2, "extras_items": 2,
                 "val_extras_items": 1},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (summary,) = json.loads((out / "results.json").read_text())["experiments"]
    assert summary["task"]["primary"] == "metric_symmetry" and summary["task"]["items"] == 4
    rows = {r["key"]: r for r in summary["rows"]}
    assert {"unguided", "one_step", "doodl_ddim", "best_of_3"} <= set(rows)
    assert "metric_clip_blue" in rows["doodl_ddim"]["other"]  # every held-out metric reported
    assert (out / "tiny_compute.png").is_file() and "doodl_ddim - one_step" in summary["paired"]
    # validation and test must not share items
    cfg["val"] = {"prompts": ["a circle"], "seeds": [0]}
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--out", str(tmp_path / "o2")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "val and test share 1 (prompt, seed) items" in proc.stderr


def test_the_runner_samples_on_the_plans_grid(tmp_path):
    """``Plan.timestep_grid`` reaches every method's chain: null is the model's own grid (a trailing one-step model
    such as SD-Turbo starts at t = 999), "official" the official DOODL grid (one step: t = 0, no image), so the
    SD-Turbo comparison config runs on the grid its model was distilled for."""
    sys.path.insert(0, str(SCRIPT.parent))
    from compare import Plan, Runner, Task

    from doodl_lightning.families import resolve_backbone
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.testing.families import tiny_model

    backbone = resolve_backbone(tiny_model("sd-turbo", tmp_path), None, None, False, None)
    task = Task("t", "val", ["a circle"], [0], lambda n: SymmetryGuidance(), None, "m", "m", [])
    own = Runner(backbone, torch.device("cpu"), 1, Plan(timestep_grid=None).timestep_grid).module(task)
    assert own.chain.schedule.timesteps == (999,)
    assert Runner(backbone, torch.device("cpu"), 1).module(task).chain.schedule.timesteps == (0,)
