"""The chain-gradient benchmark script runs end to end on the tiny model and reports sane records."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from doodl_lightning import cuda_graphs as G

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "backprop.py"
SCHEMA = {
    "sampler", "backprop", "steps", "batch", "resolution", "dtype", "device", "seconds_per_iteration", "saved_bytes",
    "peak_memory_bytes", "grad_rel_error_vs_autograd", "grad_rel_error_vs_fp32", "reversible_drift", "unet_calls",
    "status", "role",
}


def load_script():
    """The benchmark script as a module, loaded from its path (it is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("backprop_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, *extra):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/iter" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_quick_in_process(tmp_path):
    records = run(tmp_path)
    combos = {(r["sampler"], r["backprop"]) for r in records}
    assert combos == {("ddim", "autograd"), ("ddim", "checkpoint"), ("edict", "autograd"), ("edict", "checkpoint"),
                      ("edict", "reversible")}
    for r in records:
        assert SCHEMA <= set(r), SCHEMA - set(r)
        assert r["status"] == "ok" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["seconds_per_iteration"] > 0 and r["peak_memory_bytes"] > 0 and r["saved_bytes"] > 0
        assert r["grad_rel_error_vs_autograd"] is not None
        assert r["grad_rel_error_vs_autograd"] < 1e-4, r  # float32: the same gradient
        assert r["unet_calls"] == {"ddim": 1, "edict": 2}[r["sampler"]] * r["steps"] * (1 if r["backprop"] == "autograd" else 2)
        if r["backprop"] == "reversible":
            assert r["reversible_drift"] < 1e-4 and r["reversible_fallback"] is False
    saved = {(r["sampler"], r["backprop"], r["steps"]): r["saved_bytes"] for r in records}
    assert saved["edict", "reversible", 2] == saved["edict", "reversible", 3]  # flat in steps
    assert saved["edict", "checkpoint", 3] > saved["edict", "checkpoint", 2]  # one latent pair a step
    assert saved["edict", "autograd", 3] > 100 * saved["edict", "checkpoint", 3]


@pytest.mark.slow
def test_subprocess_records_and_fp32_reference(tmp_path):
    # one fresh interpreter per record on CPU (peak RSS of its own), gradients compared across processes:
    # a bfloat16 record gets its error against the same gradient with the model in float32
    records = run(tmp_path, "--isolate", "subprocess", "--samplers", "ddim", "--backprops", "checkpoint",
                  "--steps", "2", "--dtype", "bfloat16")
    assert [(r["role"], r["dtype"]) for r in records] == [("timed", "bfloat16"), ("reference", "float32")]
    for r in records:
        assert r["status"] == "ok" and r["peak_memory_kind"] == "rss_fresh_subprocess" and r["peak_memory_bytes"] > 0
    # measured 6.0% (tiny model, 2 steps, CPU, 2026-11-30); the SD-1.5 architecture's bf16 error is
    # 1.8-4.2% (experiments/benchmarks/precision.py). 10% leaves room for kernels, not for a broken chain.
    assert 0 < records[0]["grad_rel_error_vs_fp32"] < 0.1


def test_sd15_architecture_is_the_released_one():
    # built on the meta device: shapes and parameter counts without allocating 1B parameters
    from doodl_lightning.testing import architectures as A
    from doodl_lightning.sampling import Schedule

    parts = A.build_components("sd15", device="meta")
    counts = {k: A.parameter_count(v) for k, v in parts.items() if k != "scheduler"}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}  # SD-1.5's
    assert parts["vae"].config.scaling_factor == 0.18215 and A.latent_size("sd15") == 64
    assert Schedule.from_scheduler(parts["scheduler"], 50, "model").timesteps[:2] == (981, 961)  # SD config: offset 1
    assert Schedule.from_scheduler(parts["scheduler"], 50).timesteps[:2] == (980, 960)  # official grid: offset 0
    assert A.build_scheduler("sd21").config.prediction_type == "v_prediction"


def test_model_is_the_core_backbone_noise_and_guidance():
    # the benchmark builds nothing of its own: a core Backbone, the items' initial noise, SymmetryGuidance
    import torch

    from doodl_lightning.backbone import Backbone
    from doodl_lightning.data import Item, initial_noise
    from doodl_lightning.guidance import SymmetryGuidance

    B = load_script()
    args = B.parse_args(["--quick", "--seed", "3"])
    model = B.Model(args)
    assert isinstance(model.backbone, Backbone) and model.unet is model.backbone.unet
    z = model.latents(2, 16)
    assert torch.equal(z[1], initial_noise(Item(1, args.prompt, 4), (4, 8, 8)))  # item i: seed --seed + i
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    total, terms = model.loss_fn(2)(images)
    assert torch.equal(total, SymmetryGuidance()(images)) and set(terms) == {"symmetry"}
    assert not any(hasattr(B, name) for name in ("symmetry_loss", "_load_pretrained"))


def test_graphed_unet_gradients_survive_overwritten_replays():
    # CUDA graphs own ONE set of activations; simulate that on CPU (each "replay" overwrites the single
    # static graph) and check every mode's gradient equals plain eager, refreshing where it must
    import torch

    from doodl_lightning.testing import architectures as A
    from doodl_lightning.objective import decode_latents, evaluate
    from doodl_lightning.sampling import Denoiser, Schedule

    class Replay:
        def __init__(self, f):
            self.replay = f

    def fake_graphs(unet, x, t, c):
        g = object.__new__(G._Graphs)
        g.x_inf, g.t, g.c, g.x_grad = x.clone(), t.clone(), c.clone(), x.clone().requires_grad_()
        g.generation = g.refreshes = 0
        g.out_inf, g.out_grad, g.gout, g.gx = (torch.zeros_like(x) for _ in range(4))
        state = {}

        def inf():
            with torch.no_grad():
                g.out_inf.copy_(unet(g.x_inf, g.t, encoder_hidden_states=g.c).sample)

        def fwd():
            with torch.enable_grad():
                state["out"] = unet(g.x_grad, g.t, encoder_hidden_states=g.c).sample
            g.out_grad.copy_(state["out"].detach())

        def bwd():
            g.gx.copy_(torch.autograd.grad(state["out"], g.x_grad, g.gout, retain_graph=True)[0])

        g.g_inf, g.g_fwd, g.g_bwd = Replay(inf), Replay(fwd), Replay(bwd)
        return g

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention
    try:
        _check_graphed_modes(torch, A, decode_latents, evaluate, Denoiser, Schedule, fake_graphs)
    finally:
        torch.set_num_threads(threads)


def _check_graphed_modes(torch, A, decode_latents, evaluate, Denoiser, Schedule, fake_graphs):
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.objective import weighted_guidance

    torch.manual_seed(0)
    unet, vae = A.build_unet("tiny"), A.build_vae("tiny")
    cond, uncond = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    schedule = Schedule.from_scheduler(A.build_scheduler("tiny"), 3, "model")
    z0 = torch.randn(2, 4, 8, 8)
    loss_fn = weighted_guidance([SymmetryGuidance()], ["", ""], None)
    expected_refreshes = {("ddim", "autograd"): 2, ("ddim", "checkpoint"): 0, ("edict", "autograd"): 5,
                          ("edict", "checkpoint"): 3, ("edict", "reversible"): 0}
    for (sampler, backprop), refreshes in expected_refreshes.items():
        grads = []
        for graphed in (False, True):
            den = Denoiser(unet, cond=cond, uncond=uncond, guidance_scale=7.5)
            if graphed:
                den.unet = G.GraphedUNet(unet)
                x, c = torch.cat([z0, z0]), torch.cat([uncond.expand(2, -1, -1), cond.expand(2, -1, -1)])
                fake = fake_graphs(unet, x, torch.tensor(schedule.timesteps[0]), c)
                den.unet.graphs[(tuple(x.shape), tuple(c.shape), x.dtype)] = fake
            z = z0.clone().requires_grad_()
            evaluate(den, z, schedule, lambda lat: decode_latents(vae, lat), loss_fn, sampler=sampler, backprop=backprop)
            grads.append(z.grad)
        assert torch.equal(grads[0], grads[1]), (sampler, backprop)
        assert fake.refreshes == refreshes, (sampler, backprop, fake.refreshes)
