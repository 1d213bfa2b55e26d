"""The shapes-world evaluation script: output files and their schema (tiny random models, fast), the
compute accounting against the analytic count, and (slow) the real ``--quick`` run on the shapes weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "shapes_eval.py"
EXPERIMENTS = ("vocab", "compositional", "aesthetic", "personalisation")


def build_tiny_world(root: Path) -> Path:
    """A shapes-world weights directory of tiny random models (same layout and loaders as the real one)."""
    from safetensors.torch import save_file

    from doodl_lightning.shapes import data as D
    from doodl_lightning.shapes.evaluator import ShapesEvaluatorNet
    from doodl_lightning.testing.tiny import save_tiny_clip, save_tiny_pipeline, write_tiny_clip_config

    save_tiny_pipeline(root / "sd-shapes")
    (root / "shapes-clip").mkdir(parents=True)
    cfg = write_tiny_clip_config(root / "shapes-clip", name="shapes-clip")
    save_tiny_clip(cfg, root / "shapes-clip" / "open_clip_model.safetensors")
    import timm

    torch.manual_seed(0)
    clf = timm.create_model("test_resnet", pretrained=False, num_classes=len(D.SHAPES))
    (root / "classifier").mkdir()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(root / "classifier" / "model.safetensors"))
    (root / "classifier" / "labels.txt").write_text("\n".join(D.SHAPES) + "\n")
    (root / "classifier" / "config.json").write_text(json.dumps(
        {"arch": "timm:test_resnet", "num_classes": len(D.SHAPES), "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}))
    (root / "aesthetic").mkdir()
    save_file({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, str(root / "aesthetic" / "head.safetensors"))
    (root / "evaluator").mkdir()
    net = ShapesEvaluatorNet(width=4, hidden=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "evaluator" / "model.safetensors"))
    (root / "evaluator" / "config.json").write_text(json.dumps({"width": 4, "hidden": 8}))
    return root


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def check_outputs(out: Path, mode: str) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["mode"] == mode and res["meta"]["machine"] and res["meta"]["total_seconds"] > 0
    assert set(res["experiments"]) == set(EXPERIMENTS)
    md = (out / "results.md").read_text()
    from PIL import Image

    for name, e in res["experiments"].items():
        assert e["title"] in md
        for fig in (f"{name}_bars.png", f"{name}_grid.png"):
            with Image.open(out / fig) as im:
                assert im.width > 100 and im.height > 100
        runs = e["runs"]
        assert e["one_step_best"] in runs and e["one_step_best"] in e["headline"]
        assert {"render", "unguided_ddim", "unguided_edict"} <= set(e["headline"]) and len(e["headline"]) == 6
        assert {r["method"] for r in runs.values()} == {"render", "unguided", "one_step", "doodl"}
        assert {r["sampler"] for r in runs.values() if r["method"] == "doodl"} == {"ddim", "edict"}
        n_items = len(e["prompts"]) * len(e["seeds"])
        judges = {d["judge"] for d in e["metrics"]}
        assert {"evaluator", "guide"} <= judges  # both verdicts for every result
        for key, r in runs.items():
            for d in e["metrics"]:
                m = r["metrics"][d["name"]]
                assert m["ci95"][0] - 1e-9 <= m["mean"] <= m["ci95"][1] + 1e-9 and m["n_seeds"] == len(e["seeds"])
                assert len(r["per_item"][d["name"]]) == n_items
            c = r["compute"]
            assert c["seconds_per_image"] >= 0 and (c["unet_forward_per_image"] > 0) == (r["method"] != "render")
    assert "targets_check" in res["experiments"]["vocab"]
    return res


def test_tiny_run_writes_every_output_with_its_schema(tmp_path):
    weights = build_tiny_world(tmp_path / "weights")
    out = tmp_path / "out"
    run_script("--tiny", "--weights", weights, "--out", out, "--threads", "1", timeout=300)
    res = check_outputs(out, "tiny")
    cfg = res["config"]
    S, K = cfg["steps"], cfg["iters"]
    for e in res["experiments"].values():
        for r in e["runs"].values():
            c = r["compute"]
            # analytic count (checkpoint backprop): DDIM 1 eps per step, EDICT 2; DOODL = K chains forward without
            # grad + K recomputed with grad (back-propagated) + the final evaluation; the official one-step baseline:
            # each eps (a CFG pair, 2 rows) plus one back-propagated UNCONDITIONAL call (1 row = half a pair)
            per_chain = S * (2 if r["sampler"] == "edict" else 1)
            expect = {"render": (0, 0), "unguided": (per_chain, 0), "one_step": (1.5 * per_chain, 0.5 * per_chain),
                      "doodl": ((2 * K + 1) * per_chain, K * per_chain)}[r["method"]]
            assert (c["unet_forward_per_image"], c["unet_backward_per_image"]) == expect, (r["key"], c)
    assert sorted(p.name for p in (out / "refs").iterdir())


@pytest.mark.slow
def test_quick_run_on_the_shapes_weights(tmp_path):
    from doodl_lightning.shapes import weights_dir

    w = weights_dir()
    need = ["sd-shapes", "shapes-clip", "classifier", "aesthetic", "evaluator"]
    if not all((w / n).exists() for n in need):
        pytest.skip("shapes-world weights not present")
    out = tmp_path / "quick"
    run_script("--quick", "--out", out, timeout=900)
    res = check_outputs(out, "quick")
    assert res["meta"]["total_seconds"] <= 300 * 1.5  # 5 minutes on 2 free cores; slack for a shared machine
