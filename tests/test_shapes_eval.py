"""The held-out comparison (shapes_eval.py + compare.py): the frozen validation -> test protocol, output files and
their schema (tiny random models, fast), compute against the analytic count, the statistics, and (slow) the real
``--quick`` run on the shapes weights."""
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


def run_script(*args, timeout=600, ok=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def check_outputs(out: Path, variants=EXPERIMENTS, searched=EXPERIMENTS) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in res["experiments"]] == list(EXPERIMENTS)
    md = (out / "results.md").read_text()
    from PIL import Image

    for e in res["experiments"]:
        name = e["name"]
        assert "incomplete" not in e, e
        assert f"## {name}" in md
        for fig in (f"{name}_compute.png", f"{name}_examples.png"):
            with Image.open(out / fig) as im:
                assert im.width > 300 and im.height > 100
        val = json.loads((out / name / "val.json").read_text())
        test_items = {(p, s) for p in e["task"]["prompts"] for s in e["task"]["seeds"]}
        val_items = {(p, s) for p in val["task"]["prompts"] for s in val["task"]["seeds"]}
        assert not test_items & val_items and not set(e["task"]["seeds"]) & set(val["task"]["seeds"])
        # every method's knobs chosen on validation, and every validation run kept
        variant_keys = {"doodl_edict", "doodl_ddim_cutouts", "doodl_edict_paper_steps"}
        search = {"fk_steering", "zero_order", "search_refine", "population_doodl", "doodl_eot", "doodl_margin"}
        if name not in searched:
            search = set()
        assert set(val["choices"]) == {"one_step", "best_of_n", "doodl_ddim"} | search | (variant_keys if name in variants else set())
        assert search <= set(keys := [r["key"] for r in e["rows"]]), keys
        assert e["budgets"] and all(b["best"] in b["methods"] for b in e["budgets"])
        for fig in (f"{name}_compute_seconds.png",):
            assert (out / fig).is_file()
        assert any(k.startswith("doodl ddim") and "adam" in k for k in val["runs"])
        assert any(k.startswith("doodl ddim") and "sgd" in k for k in val["runs"])
        keys = [r["key"] for r in e["rows"]]
        assert keys[:2] == ["unguided", "one_step"] and "doodl_ddim" in keys and any(k.startswith("best_of_") for k in keys)
        for r in e["rows"]:
            lo, hi = r["primary"]["ci95"]
            assert lo - 1e-9 <= r["primary"]["mean"] <= hi + 1e-9
        assert "doodl_ddim - one_step" in e["paired"]
        for p in e["paired"].values():
            st = p["sign_test"]
            assert 0 <= st["p_two_sided"] <= 1 and st["a_better"] + st["b_better"] + st["ties"] >= 1
    return res


@pytest.mark.slow
def test_tiny_run_freezes_validation_choices_and_writes_every_output(tmp_path):
    weights = build_tiny_world(tmp_path / "weights")
    out = tmp_path / "out"
    proc = run_script("--tiny", "--weights", weights, "--out", out, "--stage", "test", ok=False)
    assert proc.returncode != 0 and "run --stage val first" in proc.stderr + proc.stdout  # no test without choices
    # the whole protocol as parallel parts (each experiment's validation, then its test methods), merged
    run_script("--tiny", "--weights", weights, "--out", out, "--threads", "2", "--jobs", "2", timeout=400)
    res = check_outputs(out)
    run = json.loads((out / "run.json").read_text())
    assert run["jobs"] == 2 and run["threads_per_job"] == 1 and all(p["rc"] == 0 for p in run["parts"].values())
    assert {f"{e}_val" for e in EXPERIMENTS} <= set(run["parts"]) and "Whole run:" in (out / "results.md").read_text()
    plan = json.loads((out / "vocab" / "test" / "doodl_ddim.json").read_text())["meta"]["plan"]
    S, N = plan["steps"], plan["n_max"]
    for e in res["experiments"]:
        # the iteration count is read from the chosen configuration's curve run on to iters_max
        ch = json.loads((out / e["name"] / "val.json").read_text())["choices"]["doodl_ddim"]
        assert len(ch["iteration_curve"]) == plan["iters_max"] + 1 and ch["iterations_run"] == plan["iters_max"]
        assert ch["iterations_bracketed"] == (ch["iters"] < plan["iters_max"])
        assert (out / f"{e['name']}_validation.png").is_file()
        for m in ("one_step", "best_of_n", "doodl_ddim", "doodl_edict"):
            r = json.loads((out / e["name"] / "test" / f"{m}.json").read_text())["record"]
            c = r["compute"]
            K = r["params"].get("iters", 0)  # DOODL-DDIM runs max(chosen, the sweep's); a variant its chosen count
            if m == "doodl_ddim":
                assert K == max(ch["iters"], plan["iters"]) and r["chosen_iterations"] == ch["iters"]
            # analytic count (checkpoint backprop; a CFG pair = 1): one-step = each eps + one back-propagated
            # UNCONDITIONAL call (half a pair); best-of-N = N chains; DOODL = K chains without grad + K recomputed
            # with grad + the final evaluation (EDICT: 2 eps per step)
            chain = S * (2 if m == "doodl_edict" else 1)
            expect = {"one_step": (1.5 * S, 0.5 * S), "best_of_n": (N * S, 0),
                      "doodl_ddim": ((2 * K + 1) * chain, K * chain), "doodl_edict": ((2 * K + 1) * chain, K * chain)}[m]
            assert (c["unet_forward_per_image"], c["unet_backward_per_image"]) == expect, (e["name"], m, c)
    # the test stage reads the frozen choices: change one and rerun that part
    val = json.loads((out / "vocab" / "val.json").read_text())
    val["choices"]["one_step"]["scale"] = 123.0
    (out / "vocab" / "val.json").write_text(json.dumps(val))
    run_script("--tiny", "--weights", weights, "--out", out, "--experiments", "vocab", "--stage", "test",
               "--methods", "one_step", "--threads", "1")
    r = json.loads((out / "vocab" / "test" / "one_step.json").read_text())["record"]
    assert r["params"]["scale"] == 123.0
    assert "grad_scale 123" in (out / "results.md").read_text()
    # the README's table is generated from the results (report stage: no sampling)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- comparison-table:begin (generated) -->\nstale\n<!-- comparison-table:end -->\nrest\n")
    run_script("--tiny", "--weights", weights, "--out", out, "--stage", "report", "--readme", readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro") and text.rstrip().endswith("rest")
    assert all(f"| {name}: " in text for name in EXPERIMENTS)


def test_search_methods_curves_count_compute_and_keep_what_each_method_keeps(tiny_pipeline_dir):
    """The protocol's runner of the search methods on the tiny model: after every step each curve point holds the
    UNet evaluations spent so far (a CFG pair = 1, checkpoint recomputations included, as the core counts them), and
    what each item shows: a selection method its best proposal so far (lowest guide loss), a gradient method the
    latest iterate, search then refine the first until its K candidates are spent."""
    sys.path.insert(0, str(SCRIPT.parent))
    from compare import Runner, Task
    from search_methods import METHODS, run_search

    from doodl_lightning.families import resolve_backbone
    from doodl_lightning.guidance import SymmetryGuidance

    def verdict(images, items, reference=None):
        score = [float(-(im - im.flip(-1)).abs().mean()) for im in images]  # a per-item measure to follow
        return {"sym": score, "guide": score}, [s > -0.1 for s in score], [f"{s:.3f}" for s in score]

    task = Task("t", "val", ["a red circle", "a blue square"], [0, 1], lambda n: SymmetryGuidance(), verdict, "sym",
                "guide", [])
    S = 2
    runner = Runner(resolve_backbone(tiny_pipeline_dir, None, None, False, None), torch.device("cpu"), S)
    settings = {"fk_steering": {"lmbda": 10.0, "particles": 2, "resample_every": 1, "resample_start": 0},
                "zero_order": {"radius": 0.5, "neighbours": 2}, "search_refine": {"candidates": 2},
                "population_doodl": {"members": 2, "exchange_every": 1}, "doodl_eot": {"samples": 2}}
    chains, older = 6, 0
    per_step = {"fk_steering": (2 * S, 0), "zero_order": (S, 0), "population_doodl": (2 * 2 * S, 2 * S),
                "doodl_eot": (2 * S, S)}
    for name, setting in settings.items():
        rec = run_search(runner, task, name, 3.0, chains, setting, {"update_rule": "official", "step": 0.1})
        steps = METHODS[name].steps(chains, setting)
        assert len(rec["curve"]) == steps == rec["params"]["steps"]
        for s, p in enumerate(rec["curve"]):
            if name == "search_refine":
                spent = (S * (s + 1), 0) if s < 2 else (S * 2 + 2 * S * (s - 1), S * (s - 1))
            else:
                spent = tuple(v * (s + 1) for v in per_step[name])
            assert (p["unet_evaluations_per_image"], p["backprop_per_image"]) == spent, (name, s, p)
        seen = [v["metrics"]["sym"] for v in rec["step_verdicts"]]
        losses = rec["step_losses"]  # (steps, items): the guide loss of what each step showed
        for s, pick in enumerate(rec["kept"]):
            selecting = name in ("fk_steering", "zero_order") or (name == "search_refine" and s < 2)
            for i, q in enumerate(pick):
                if selecting:  # the first of the lowest losses so far
                    assert q == min(range(s + 1), key=lambda r: (losses[r][i], r))
                else:
                    assert q == s
                assert rec["curve"][s]["per_item"]["sym"][i] == seen[q][i]
        if name in ("fk_steering", "zero_order"):
            older += sum(q != s for s, pick in enumerate(rec["kept"]) for q in pick)
    assert older, "no selection kept an earlier proposal: the test would not see a selection that keeps the latest"


def test_margin_stop_freezes_each_item_once_its_guide_loss_reaches_the_threshold(tiny_pipeline_dir):
    """DOODL + margin stop in the protocol: an item whose guide loss reaches ``stop_at`` stops (its update at that
    step already made, so from the next step it shows one image); until then it is DOODL's run, step for step; with
    no item ever stopping it is DOODL; the fit ends when every item has stopped, its compute counted to there."""
    sys.path.insert(0, str(SCRIPT.parent))
    from compare import Runner, Task
    from search_methods import run_search

    from doodl_lightning.families import resolve_backbone
    from doodl_lightning.guidance import SymmetryGuidance

    def verdict(images, items, reference=None):
        score = [float(-(im - im.flip(-1)).abs().mean()) for im in images]
        return {"sym": score, "guide": score}, [s > -0.1 for s in score], [f"{s:.3f}" for s in score]

    task = Task("t", "val", ["a red circle", "a blue square"], [0], lambda n: SymmetryGuidance(), verdict, "sym",
                "guide", [])
    runner = Runner(resolve_backbone(tiny_pipeline_dir, None, None, False, None), torch.device("cpu"), 2)
    update = {"update_rule": "official", "step": 0.1}
    never = run_search(runner, task, "doodl_margin", 3.0, 10, {"stop_at": -1e9}, update)
    free = never["step_losses"]  # (5 steps, 2 items): DOODL's own run
    assert len(free) == 5 and all(q == [s] * 2 for s, q in enumerate(never["kept"]))
    stop_at = free[1][0]  # item 0 reaches it by step 1
    rec = run_search(runner, task, "doodl_margin", 3.0, 10, {"stop_at": stop_at}, update)
    losses = rec["step_losses"]
    for i in range(2):
        hit = next((s for s, row in enumerate(losses) if row[i] <= stop_at), None)
        last = len(losses) if hit is None else hit + 1
        n = min(last + 1, len(losses))
        assert [row[i] for row in losses[:n]] == [row[i] for row in free[:n]]  # DOODL until it stops
        assert all(row[i] == losses[last][i] for row in losses[last:]), (i, hit)  # then frozen
    assert losses[0][0] > stop_at and any(row[0] <= stop_at for row in losses[:2])
    stopped_all = all(any(row[i] <= stop_at for row in losses) for i in range(2))
    assert len(losses) == (min(max(next(s for s, r in enumerate(losses) if r[i] <= stop_at) for i in range(2)) + 1, 5)
                           if stopped_all else 5)
    assert [p["unet_evaluations_per_image"] for p in rec["curve"]] == [2 * 2 * (s + 1) for s in range(len(losses))]


def test_sign_test_and_paired_interval():
    sys.path.insert(0, str(SCRIPT.parent))
    from compare import bracketed, paired, sign_test

    st = sign_test([1] * 8 + [0] * 2 + [1] * 5, [0] * 8 + [1] * 2 + [1] * 5)
    assert (st["a_better"], st["b_better"], st["ties"]) == (8, 2, 5)
    assert st["p_two_sided"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    p = paired([1, 1, 1, 0], [0, 0, 1, 0])
    assert p["mean"] == pytest.approx(0.5) and p["ci95"][0] <= 0.5 <= p["ci95"][1]
    assert paired([1, 0], [1, 0])["ci95"] == [0.0, 0.0]
    assert not bracketed([0.1, 1, 10], 10) and not bracketed([0.1, 1, 10], 0.1) and bracketed([0.1, 1, 10], 1)


def test_figure_axis_never_clips_a_point():
    sys.path.insert(0, str(SCRIPT.parent))
    from eval_lib import y_range

    series = [{"points": [(10, 9.7, 9.5, 9.9), (100, 10.8, 10.5, 11.0)]}]
    assert y_range(series, 100.0) == (0.0, 100.0)  # a rate's fixed 0-100% scale
    assert y_range(series, 10.0) == (0.0, 11.0)  # the aesthetic head passes its nominal 10: raised, not clipped
    lo, hi = y_range(series, None)  # the data's range with a margin
    assert lo < 9.5 and 11.0 < hi < 11.2


@pytest.mark.slow
def test_quick_run_on_the_shapes_weights(tmp_path):
    from doodl_lightning.shapes import weights_dir

    w = weights_dir()
    need = ["sd-shapes", "shapes-clip", "classifier", "aesthetic", "evaluator"]
    if not all((w / n).exists() for n in need):
        pytest.skip("shapes-world weights not present")
    out = tmp_path / "quick"
    run_script("--quick", "--out", out, timeout=900)
    check_outputs(out, variants=("vocab",), searched=("vocab",))


COMMITTED = ROOT / "experiments" / "benchmarks" / "results" / "shapes" / "heldout"


def test_committed_results_hold_the_protocol_and_the_readme_table_is_generated_from_them():
    """Issue 14's verification: >= 256 vocabulary test items, paired intervals, frozen validation choices, and
    the README's table equal to what the report stage generates from the committed results."""
    sys.path.insert(0, str(SCRIPT.parent))
    from compare import SEARCH_METHODS as SEARCH
    from compare import Plan, readme_budget_table, readme_table
    from shapes_eval import AESTHETIC_MARGIN_STOPS, CLIP_IMAGE_MARGIN_STOPS, CLIP_TEXT_MARGIN_STOPS

    margin_grid = {"vocab": Plan().margin_stops, "aesthetic": AESTHETIC_MARGIN_STOPS,
                   "compositional": CLIP_TEXT_MARGIN_STOPS, "personalisation": CLIP_IMAGE_MARGIN_STOPS}

    res = json.loads((COMMITTED / "results.json").read_text())
    by = {e["name"]: e for e in res["experiments"]}
    assert by["vocab"]["task"]["items"] >= 256
    for e in res["experiments"]:
        if "incomplete" in e:
            continue
        assert e["task"]["items"] >= 96 and "doodl_ddim - one_step" in e["paired"]
        val = json.loads((COMMITTED / e["name"] / "val.json").read_text())
        # what each test part ran with is what validation froze
        one = json.loads((COMMITTED / e["name"] / "test" / "one_step.json").read_text())["record"]["params"]
        assert (one["scale"], one["cfg"]) == (val["choices"]["one_step"]["scale"], val["choices"]["one_step"]["cfg"])
        dd = json.loads((COMMITTED / e["name"] / "test" / "doodl_ddim.json").read_text())["record"]
        frozen = val["choices"]["doodl_ddim"]
        assert dd["chosen_iterations"] == frozen["iters"] and dd["params"]["cfg"] == frozen["cfg"]
        assert dd["params"]["update_rule"] == frozen.get("update_rule", "official")
        # the iteration count was read from a curve run on to 32 iterations, best-of-N went to N = 64
        assert frozen["iterations_run"] >= 32 and len(frozen["iteration_curve"]) == frozen["iterations_run"] + 1
        bon = json.loads((COMMITTED / e["name"] / "test" / "best_of_n.json").read_text())["record"]
        assert bon["params"]["n_max"] >= 64 and len(bon["curve"]) == bon["params"]["n_max"]
        assert not set(val["task"]["seeds"]) & set(e["task"]["seeds"])
        # issue 27: the six search methods hold rows, each validated at its grid and run on test at its frozen
        # point; DOODL + margin stop's thresholds in this guide's units (a threshold every item meets at once, as
        # the classifier's -log p* = 0.1 is for the aesthetic guide's -score, stops the fit after its first step)
        keys = {r["key"] for r in e["rows"]}
        assert set(SEARCH) <= keys and set(SEARCH) <= set(val["choices"]), (e["name"], keys)
        margin = val["choices"]["doodl_margin"]
        assert margin["sweep"] == list(margin_grid[e["name"]]), (e["name"], margin["sweep"])
        runs = [r for k, r in val["runs"].items() if k.startswith("doodl_margin ")]
        assert len(runs) == len(margin["sweep"]) and all(len(r["curve"]) > 1 for r in runs), e["name"]
        for m in SEARCH:
            rec = json.loads((COMMITTED / e["name"] / "test" / f"{m}.json").read_text())["record"]
            assert rec["params"]["cfg"] == val["choices"][m]["cfg"], (e["name"], m)
    source = "experiments/benchmarks/results/shapes/heldout/results.md"
    readme = (ROOT / "README.md").read_text()
    assert readme_table(res["experiments"], source) in readme
    # the "which method at which budget" table too, read from the methods' test curves at validation's points
    assert readme_budget_table(res["experiments"], source) in readme
    assert all(e.get("budgets") for e in res["experiments"] if "incomplete" not in e)
