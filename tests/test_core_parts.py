"""The module's parts on their own: an injected backbone, where the chain starts, renormalisation, the
frozen models' absence from checkpoints, the inverse of sharding, and the one precision helper."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from doodl_lightning.families import PretrainedBackbone, UNetBackbone, resolve_backbone
from doodl_lightning.data import Item, initial_noise, shard, unshard
from doodl_lightning.frozen import leave_out_of_checkpoints
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.optim import renormalize_latents
from doodl_lightning.precision import at_least_float32, frozen_dtype, keep_optimised_dtypes, module_dtype, to_module_dtype
from doodl_lightning.start import ChainStart


def test_an_injected_backbone_is_used_as_it_is(tiny_pipeline_dir):
    bb = PretrainedBackbone(tiny_pipeline_dir)
    m1 = DOODL(model=bb, prompts=["a"], seeds=[0, 1], steps=2, sampler="ddim", guidance=[SymmetryGuidance()])
    m2 = DOODL(model=bb, prompts=["b"], seeds=[0], steps=2, sampler="ddim", guidance=[SymmetryGuidance()])
    assert m1.backbone is bb and m2.backbone is bb  # loaded once, shared: no monkeypatching needed
    assert m1.hparams.model == "PretrainedBackbone"
    # a test double: any components in a UNet family's Backbone
    double = UNetBackbone(bb.unet, bb.vae, bb.text_encoder, bb.tokenizer, bb.scheduler)
    assert DOODL(model=double, prompts=["a"], steps=2, guidance=[SymmetryGuidance()]).backbone is double
    with pytest.raises(ValueError, match="go with model: <path or id>"):
        resolve_backbone(bb, vae_checkpointing=True)
    # the string shortcut loads the same weights
    by_path = resolve_backbone(tiny_pipeline_dir)
    assert all(torch.equal(a, b) for a, b in zip(by_path.unet.state_dict().values(), bb.unet.state_dict().values()))


def test_the_backbone_class_path_form_parses_in_the_cli(tiny_pipeline_dir, tmp_path, write_config):
    from cli import main

    cfg = write_config(tmp_path / "c.yaml", {"class_path": "doodl_lightning.families.PretrainedBackbone",
                                             "init_args": {"path": tiny_pipeline_dir}}, tmp_path / "o")
    m = main(["--config", cfg], run=False).model
    assert type(m.backbone) is PretrainedBackbone
    m2 = main(["--config", cfg, "--model.model", tiny_pipeline_dir], run=False).model
    assert m2.hparams.model == tiny_pipeline_dir


def test_chain_start_from_seeds_and_its_checks(tmp_path):
    items = [Item(0, "a", 3), Item(1, "a", 4)]
    pair, norm = ChainStart(10, "edict", 0.93).noise(items, (4, 8, 8))
    assert pair.shape == (2, 2, 4, 8, 8) and pair.dtype == torch.float32 and norm.dtype == torch.float64
    assert torch.equal(pair[:, 0], pair[:, 1]) and torch.equal(pair[1, 0], initial_noise(items[1], (4, 8, 8)))
    assert torch.allclose(norm, pair[:, 0].double().flatten(1).norm(dim=1))
    assert ChainStart(10, "ddim", 0.93).noise(items, (4, 8, 8))[0].shape == (2, 1, 4, 8, 8)
    assert ChainStart(10, "ddim", 0.93).renormalize and ChainStart(10, "ddim", 0.93, renormalize_latents=False).renormalize is False
    with pytest.raises(ValueError, match=r"opt_t must be in \[1, steps=10\]"):
        ChainStart.check(10, "edict", opt_t=11)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChainStart.check(10, "edict", source_image=str(tmp_path / "nope.png"))
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    with pytest.raises(ValueError, match="renormalize_latents must be off"):
        ChainStart.check(10, "edict", source_image=str(img), renormalize_latents=True)
    with pytest.raises(ValueError, match="editing a source_image needs sampler 'edict'"):
        ChainStart.check(10, "ddim", source_image=str(img))
    ChainStart.check(10, None, source_image=str(img))  # the model's sampler: checked once it is known
    with pytest.raises(ValueError, match="editing a source_image needs sampler 'edict'"):
        ChainStart.check_editable("lcm", str(img))
    assert ChainStart(10, "edict", 0.93, source_image=str(img)).renormalize is False


def test_renormalize_latents_hits_the_target_and_leaves_stopped_rows_alone():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1, 1)
    target = torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64)
    before = z.clone()
    renormalize_latents(z, target, torch.tensor([True, False, True]))
    norms = z.flatten(2).norm(dim=2)
    assert torch.allclose(norms[[0, 2]], target[[0, 2], None].float().expand(2, 2))
    assert torch.equal(z[1], before[1])
    # direction kept
    assert torch.allclose(z[0] / z[0].flatten(1).norm(dim=1).view(2, 1, 1, 1),
                          before[0] / before[0].flatten(1).norm(dim=1).view(2, 1, 1, 1), atol=1e-6)


def test_frozen_modules_leave_containers_checkpoints_but_keep_their_own():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(2, 2)
            leave_out_of_checkpoints(self.frozen)
            self.latents = nn.Parameter(torch.zeros(3))

    h = Holder()
    assert set(h.state_dict()) == {"latents"}
    assert set(h.frozen.state_dict()) == {"weight", "bias"}  # asked directly: its own weights
    h2 = Holder()
    h2.load_state_dict({"latents": torch.ones(3)}, strict=True)  # the frozen keys are not expected back
    assert torch.equal(h2.latents, torch.ones(3))
    with pytest.raises(RuntimeError, match="latents"):
        Holder().load_state_dict({}, strict=True)  # but a missing latent still is an error


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (4, 4), (3, 1)])
def test_unshard_inverts_shard(n, world):
    items = list(range(n))
    m = -(-n // world)
    rows = torch.full((world, m), float("nan"))
    for r in range(world):
        part = shard(items, r, world)
        rows[r, : len(part)] = torch.tensor(part, dtype=torch.float32)
    assert unshard(rows, n).tolist() == items


def test_the_precision_helper():
    assert frozen_dtype("bf16-mixed") == torch.bfloat16 and frozen_dtype("64-true") == torch.float64
    with pytest.raises(ValueError, match="unknown precision"):
        frozen_dtype("8-bit")
    lin = nn.Linear(2, 2).to(torch.bfloat16)
    assert module_dtype(lin) == torch.bfloat16 and module_dtype(nn.ReLU()) is None
    assert to_module_dtype(torch.zeros(2), lin).dtype == torch.bfloat16
    assert to_module_dtype(torch.zeros(2, dtype=torch.float64), nn.ReLU()).dtype == torch.float64
    assert at_least_float32(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
    assert at_least_float32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.latents = nn.Parameter(torch.ones(2))

        def _apply(self, fn, recurse=True):
            keep_optimised_dtypes(self, lambda: super(M, self)._apply(fn, recurse))
            return self

    m = M().to(torch.float16)
    assert m.lin.weight.dtype == torch.float16 and m.latents.dtype == torch.float32
    assert M().double().latents.dtype == torch.float64  # 64-true widens


@pytest.mark.parametrize("sampler,backprop", [("ddim", "checkpoint"), ("edict", "reversible")])
def test_the_chains_gradient_in_each_precision_against_float64(tiny_pipeline_dir, sampler, backprop):
    """The default-suite twin of the slow precision benchmark's claims (one module cast in turn, as the ``-true``
    precisions cast it; its latents stay float32): the float32 gradient is the float64 one up to float32 rounding,
    and float16 / bfloat16 ones are finite, nonzero, less exact than float32 (the cast really happened) and
    within 10% (room for the low-precision kernels, not for a broken chain)."""
    m = DOODL(model=tiny_pipeline_dir, prompts=["a red circle"], seeds=[0, 1], steps=2, sampler=sampler,
              backprop=backprop, guidance_scale=3.0, guidance=[SymmetryGuidance()]).prepare()

    def grad(dtype):
        m.to(dtype)
        m.latents.grad = None
        m.evaluate_items(backward=True)
        assert m.backbone.dtype == dtype
        return m.latents.grad.double()

    ref = grad(torch.float64)
    err = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = grad(dtype)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, dtype
        err[dtype] = float((g - ref).norm() / ref.norm())
    assert err[torch.float32] < 1e-4, err
    assert all(10 * err[torch.float32] < err[d] < 0.1 for d in (torch.float16, torch.bfloat16)), err
