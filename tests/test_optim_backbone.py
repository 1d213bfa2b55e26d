"""The DOODL update rule and the backbone loader's contracts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from doodl_lightning.backbone import Backbone, ModelNotFoundError, precision_dtype
from doodl_lightning.optim import DOODLOptimizer, masked_step
from tiny import save_tiny_pipeline


def test_doodl_update_is_momentum_sgd_on_clipped_gradients_plus_seeded_noise():
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(3, 2, 4, 4))
    ref = torch.nn.Parameter(z.detach().clone())
    opt = DOODLOptimizer([z], lr=0.5, momentum=0.9, clip=1e-2, perturbation=0.0)
    sgd = torch.optim.SGD([ref], lr=0.5, momentum=0.9)
    for _ in range(3):
        g = torch.randn_like(z)
        z.grad, ref.grad = g.clone(), g.clamp(-1e-2, 1e-2)
        opt.step()
        sgd.step()
    assert torch.allclose(z, ref, atol=1e-7)
    # the perturbation of row r at step k comes from noise_generator(r, k): repeatable
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2, 3))
    for p in (a, b):
        o = DOODLOptimizer([p], lr=1.0, perturbation=1e-4)
        o.noise_generator = lambda r, k: torch.Generator().manual_seed(100 * r + k)
        p.grad = torch.zeros_like(p)
        o.step()
    assert torch.equal(a, b) and a.abs().max() > 0
    assert torch.allclose(a[1], 1e-4 * torch.randn(3, generator=torch.Generator().manual_seed(100)))


def test_masked_step_leaves_stopped_rows_and_their_momentum_untouched():
    z = torch.nn.Parameter(torch.ones(3, 2))
    opt = DOODLOptimizer([z], lr=1.0, clip=1.0, perturbation=0.0)
    z.grad = torch.full_like(z, 0.5)
    opt.step()
    before_row, before_buf = z[1].detach().clone(), opt.state[z]["momentum_buffer"][1].clone()
    z.grad = torch.full_like(z, 0.5)
    masked_step(opt, z, torch.tensor([True, False, True]))
    assert torch.equal(z[1], before_row) and torch.equal(opt.state[z]["momentum_buffer"][1], before_buf)
    assert not torch.equal(z[0], before_row)


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="lr > 0"):
        DOODLOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0)


def test_backbone_loads_a_saved_pipeline_frozen_and_in_dtype(tmp_path):
    path = save_tiny_pipeline(tmp_path / "pipe")
    bb = Backbone.load(path, dtype=torch.bfloat16, vae_checkpointing=True)
    assert bb.dtype == torch.bfloat16 and not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.unet.training
    assert bb.vae.decoder.gradient_checkpointing
    cond = bb.encode_prompts(["a red circle", ""])
    assert cond.shape == (2, 77, 16)
    assert bb.latent_shape(None) == (4, 8, 8) and bb.latent_shape(32) == (4, 16, 16)


def test_missing_models_fail_with_one_clear_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        Backbone.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        Backbone.load(str(tmp_path / "empty"))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_config"):
        Backbone.load(str(tmp_path / "w.safetensors"))
    # a hub id that is not in the local cache, offline: names the id and how to provide it
    code = ("from doodl_lightning.backbone import Backbone\n"
            "try:\n    Backbone.load('someorg/not-a-cached-model')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "ModelNotFoundError" in out and "someorg/not-a-cached-model" in out and "--local-dir" in out


def test_precision_names():
    assert precision_dtype("bf16-mixed") == torch.bfloat16 and precision_dtype("16-true") == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        precision_dtype("8-bit")
