"""The DOODL update rule and the backbone loader's contracts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from doodl_lightning.backbone import ModelNotFoundError
from doodl_lightning.families import UNetBackbone, resolve_backbone
from doodl_lightning.precision import frozen_dtype
from doodl_lightning.optim import DOODLOptimizer, masked_step
from doodl_lightning.testing.tiny import save_tiny_pipeline


def test_doodl_update_against_the_rule_written_out():
    """g = clip(-0.5 grad_scale dS, clip) (mean over a tied pair), heavy-ball momentum, one noise draw per
    item shared by its pair; the full parity with the official loop is in test_official_parity.py."""
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(3, 2, 4, 4))
    ref = z.detach().clone()
    opt = DOODLOptimizer([z], grad_scale=3.0, momentum=0.9, clip_grad_val=1e-2, perturb_grad_scale=0.0,
                         tied_latents=False)
    b = None
    for _ in range(3):
        g = torch.randn_like(z)
        z.grad = g.clone()
        opt.step()
        step = (-0.5 * 3.0 * g).clamp(-1e-2, 1e-2)
        b = step if b is None else 0.9 * b + step
        ref = ref + b
    assert torch.allclose(z, ref, atol=1e-6)
    # tied: one gradient (the pair's mean), and the pair equal after the step
    t = torch.nn.Parameter(torch.randn(1, 2, 3))
    start = t.detach().clone()
    o = DOODLOptimizer([t], grad_scale=1.0, clip_grad_val=None, use_momentum=False, perturb_grad_scale=0.0)
    t.grad = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])
    o.step()
    assert torch.allclose(t[0, 0], t[0, 1]) and torch.allclose(t[0, 0], start[0].mean(0) - 0.5 * 2.0)
    # the perturbation of row r at step k comes from noise_generator(r, k), one draw for the pair
    a = torch.nn.Parameter(torch.zeros(2, 2, 3))
    b2 = torch.nn.Parameter(torch.zeros(2, 2, 3))
    for p in (a, b2):
        o = DOODLOptimizer([p], perturb_grad_scale=1e-4, tied_latents=False)
        o.noise_generator = lambda r, k: torch.Generator().manual_seed(100 * r + k)
        p.grad = torch.zeros_like(p)
        o.step()
    assert torch.equal(a, b2) and a.abs().max() > 0 and torch.equal(a[:, 0], a[:, 1])
    assert torch.allclose(a[1, 0], 1e-4 * torch.randn(3, generator=torch.Generator().manual_seed(100)))


def test_nesterov_and_no_momentum_updates_against_the_rule_written_out():
    """use_nesterov: b as heavy-ball momentum, the step g + momentum b (official ``use_nesterov``); use_momentum
    false: each step is its own clipped gradient. The default-suite check of the rules; their parity with the
    official loop (tied_nesterov, untied_nesterov, no_momentum) runs with -m slow."""
    torch.manual_seed(1)
    z = torch.nn.Parameter(torch.randn(2, 2, 4))
    ref = z.detach().clone()
    opt = DOODLOptimizer([z], grad_scale=2.0, momentum=0.8, clip_grad_val=0.5, use_momentum=False, use_nesterov=True,
                         perturb_grad_scale=0.0, tied_latents=False)  # nesterov implies momentum (as the official)
    b = None
    for _ in range(3):
        grad = torch.randn_like(z)
        z.grad = grad.clone()
        opt.step()
        g = (-0.5 * 2.0 * grad).clamp(-0.5, 0.5)
        b = g if b is None else 0.8 * b + g
        ref = ref + g + 0.8 * b
    assert torch.allclose(z, ref, atol=1e-6)
    z = torch.nn.Parameter(torch.randn(2, 2, 4))
    ref = z.detach().clone()
    opt = DOODLOptimizer([z], grad_scale=2.0, clip_grad_val=0.5, use_momentum=False, perturb_grad_scale=0.0,
                         tied_latents=False)
    for _ in range(3):  # from the second step on, momentum would add the previous steps
        grad = torch.randn_like(z)
        z.grad = grad.clone()
        opt.step()
        ref = ref + (-0.5 * 2.0 * grad).clamp(-0.5, 0.5)
    assert torch.allclose(z, ref, atol=1e-6)


def test_perturbation_does_not_depend_on_precision():
    outs = []
    for dtype in (torch.float32, torch.float64):
        p = torch.nn.Parameter(torch.zeros(1, 1, 5, dtype=dtype))
        o = DOODLOptimizer([p], perturb_grad_scale=1.0)
        o.noise_generator = lambda r, k: torch.Generator().manual_seed(7)
        p.grad = torch.zeros_like(p)
        o.step()
        outs.append(p.detach().float())
    assert torch.equal(outs[0], outs[1])


def test_masked_step_leaves_stopped_rows_and_their_momentum_untouched():
    z = torch.nn.Parameter(torch.ones(3, 1, 2))
    opt = DOODLOptimizer([z], grad_scale=1.0, clip_grad_val=1.0, perturb_grad_scale=0.0)
    z.grad = torch.full_like(z, 0.5)
    opt.step()
    before_row, before_buf = z[1].detach().clone(), opt.state[z]["momentum_buffer"][1].clone()
    z.grad = torch.full_like(z, 0.5)
    masked_step(opt, z, torch.tensor([True, False, True]))
    assert torch.equal(z[1], before_row) and torch.equal(opt.state[z]["momentum_buffer"][1], before_buf)
    assert not torch.equal(z[0], before_row)


@pytest.mark.parametrize("kw,match", [
    (dict(grad_scale=0), "grad_scale must be > 0"),
    (dict(clip_grad_val=-1.0), "clip_grad_val must be > 0"),
    (dict(perturb_grad_scale=-1e-4), "perturb_grad_scale must be >= 0"),
    (dict(momentum=1.0), "momentum must be in"),
])
def test_bad_optimizer_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DOODLOptimizer([torch.nn.Parameter(torch.zeros(1, 1))], **kw)


def test_backbone_loads_a_saved_pipeline_frozen_and_in_dtype(tmp_path):
    path = save_tiny_pipeline(tmp_path / "pipe")
    bb = UNetBackbone.load(path, dtype=torch.bfloat16, vae_checkpointing=True)
    assert bb.dtype == torch.bfloat16 and not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.unet.training
    assert bb.vae.decoder.gradient_checkpointing
    cond = bb.encode_prompts(["a red circle", ""])
    assert cond.hidden.shape == (2, 77, 16) and not cond.added and bb.family == "sd"
    assert bb.latent_shape(None) == (4, 8, 8) and bb.latent_shape(32) == (4, 16, 16) and bb.latent_shape(16, 32) == (4, 8, 16)


def test_missing_models_fail_with_one_clear_line(tmp_path):
    # the class method and the module's shortcut (through the family registry) say the same
    for load in (UNetBackbone.load, resolve_backbone):
        with pytest.raises(ModelNotFoundError, match="not found"):
            load(str(tmp_path / "nowhere"))
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ModelNotFoundError, match="model_index.json"):
            load(str(tmp_path / "empty"))
        (tmp_path / "w.safetensors").write_bytes(b"")
        with pytest.raises(ValueError, match="model_config"):
            load(str(tmp_path / "w.safetensors"))
    # a hub id that is not in the local cache, offline: names the id and how to provide it
    code = ("from doodl_lightning.families import resolve_backbone\n"
            "try:\n    resolve_backbone('someorg/not-a-cached-model')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "ModelNotFoundError" in out and "someorg/not-a-cached-model" in out and "--local-dir" in out


def test_precision_names():
    assert frozen_dtype("bf16-mixed") == torch.bfloat16 and frozen_dtype("16-true") == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        frozen_dtype("8-bit")
