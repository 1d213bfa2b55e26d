"""Every guidance kind end to end through ``cli.py fit`` on a tiny pipeline; editing and opt_t."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cli import main
from doodl_lightning.baselines import guided_sampling
from doodl_lightning.sampling import Schedule, sample_ddim, sample_edict


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipeline_dir, tiny_clip):
    tmp = tmp_path_factory.mktemp("guided")
    pipe = tiny_pipeline_dir
    from safetensors.torch import save_file

    # scores about 5.5 +- 2, inside the official [1, 10] where each cutout's score is clipped (and flat)
    head = 0.5 * torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    save_file({"weight": head, "bias": torch.full((1,), 5.5)}, str(tmp / "head.safetensors"))
    import timm

    torch.manual_seed(0)
    clf = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp / "clf.safetensors"))
    (tmp / "labels.txt").write_text("circle\nsquare\ntriangle\n")
    refs = tmp / "refs"
    refs.mkdir()
    Image.new("RGBA", (20, 13), (255, 0, 0, 128)).save(refs / "a.png")
    Image.new("L", (9, 9), 40).save(refs / "b.png")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp / "source.png")
    clip = {"model_config": str(tiny_clip.config), "pretrained": str(tiny_clip.weights), "num_cuts": 2}
    kinds = {
        "clip_text": {"class_path": "doodl_lightning.guidance.CLIPTextGuidance",
                      "init_args": {**clip, "prompt": "a green star"}},
        "clip_image": {"class_path": "doodl_lightning.guidance.CLIPImageGuidance",
                       "init_args": {**clip, "references": str(refs)}},
        "aesthetic": {"class_path": "doodl_lightning.guidance.AestheticGuidance",
                      "init_args": {**clip, "head": str(tmp / "head.safetensors")}},
        "classifier": {"class_path": "doodl_lightning.guidance.ClassifierGuidance",
                       "init_args": {"arch": "timm:test_resnet", "checkpoint": str(tmp / "clf.safetensors"),
                                     "labels": str(tmp / "labels.txt"), "target": "triangle", "input_size": 32}},
        "symmetry": {"class_path": "doodl_lightning.guidance.SymmetryGuidance"},
    }
    return tmp, pipe, kinds


@pytest.mark.parametrize("kind", ["clip_text", "clip_image", "aesthetic", "classifier", "symmetry"])
def test_every_guidance_kind_runs_through_the_cli(world, write_config, kind):
    tmp, pipe, kinds = world
    out = tmp / kind
    cfg = write_config(tmp / f"{kind}.yaml", pipe, out, steps=2, guidance=[kinds[kind]], grad_scale=2.0, clip_grad_val=0.05)
    cli = main(["fit", "--config", cfg])
    records = [json.loads(x) for x in (out / "lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(set(r["final_terms"]) == {kind} for r in records)
    assert all(torch.isfinite(torch.tensor([r["initial_loss"], r["final_loss"]])).all() for r in records)
    assert cli.model.latents.grad is not None and cli.model.latents.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def turbo_pipe(world):
    from doodl_lightning.testing.families import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(world[0] / "turbo_pipe", "euler_trailing")


@pytest.mark.parametrize("kind", ["clip_text", "symmetry"] + [pytest.param(k, marks=pytest.mark.slow)
                                                              for k in ("clip_image", "aesthetic", "classifier")])
def test_one_step_turbo_optimisation_works_with_every_guidance_kind(world, turbo_pipe, write_config, kind):
    """steps: 1 on a Turbo-layout model (its trailing grid and sampler, chosen from the model): one UNet call per
    iteration, and the gradient reaches the noise through it for every guidance module."""
    tmp, _, kinds = world
    out = tmp / f"turbo_{kind}"
    cfg = write_config(tmp / f"turbo_{kind}.yaml", turbo_pipe, out, steps=2, guidance=[kinds[kind]], guidance_scale=1.0,
                       update_rule="adam", lr=0.05)
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = 1
    Path(cfg).write_text(yaml.safe_dump(data))
    cli = main(["fit", "--config", cfg])
    m = cli.model
    assert m.chain.schedule.timesteps == (999,) and m.hparams.sampler == "ddim"
    assert m.latents.grad is not None and torch.isfinite(m.latents.grad).all() and m.latents.grad.abs().sum() > 0
    compute = json.loads((out / "lightning_logs/version_0/compute.json").read_text())
    # one UNet call per chain: 2 iterations x (forward + its checkpoint recomputation) + the final evaluation
    assert compute["unet_evaluations_per_image"] == 5 and compute["unet_backprop_per_image"] == 2


def test_weighted_sum_of_two_guidances_logs_each_term(world, write_config):
    tmp, pipe, kinds = world
    two = [kinds["symmetry"], {**kinds["clip_text"], "init_args": {**kinds["clip_text"]["init_args"], "weight": 0.5}}]
    cli = main(["fit", "--config", write_config(tmp / "two.yaml", pipe, tmp / "two", steps=1, guidance=two)])
    ev = cli.model.last
    assert torch.allclose(ev.total, ev.terms["symmetry"] + 0.5 * ev.terms["clip_text"], atol=1e-6)


def test_editing_inverts_the_source_and_regenerates_it(world, write_config):
    """The inverted pair regenerates the (sampled) source latent; exactness vs the official code is in
    test_official_parity.py."""
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "edit.yaml", pipe, tmp / "edit", steps=1, seeds=[0, 5], prompts=["a green square"],
                       source_image=str(tmp / "source.png"), guidance=[kinds["symmetry"]])
    cli = main(["--config", cfg], run=False)
    m = cli.model
    assert m.chain.start.renormalize is False  # editing: renormalisation off, as the official code
    m.setup("fit")
    m.double()  # what --trainer.precision 64-true does: float64 end to end for a tight check
    m.on_fit_start()
    eps = m.chain.denoiser([0, 1])
    x0, y0 = sample_edict(eps, m.latents[:, 0], m.latents[:, 1], m.chain.schedule, m.hparams.mix_weight)
    assert m.latents.dtype == torch.float64
    assert m.chain.start.round_trip_error < 1e-9
    assert (x0 - y0).norm() / y0.norm() < 1e-9  # both regenerate the same encoded source...
    assert not torch.allclose(x0[0], x0[1])  # ...a posterior sample drawn with each item's own seed
    assert not torch.allclose(m.latents[:, 0], m.latents[:, 1])  # the inverted pair is untied


@pytest.mark.parametrize("bad,match", [
    (dict(opt_t=2), "opt_t cannot be combined with source_image"),
    (dict(renormalize_latents=True), "renormalize_latents must be off"),
])
def test_editing_refuses_what_the_official_code_refuses(world, write_config, bad, match):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "editbad.yaml", pipe, tmp / "editbad", source_image=str(tmp / "source.png"),
                       guidance=[kinds["symmetry"]], **bad)
    with pytest.raises(ValueError, match=match):
        main(["--config", cfg], run=False)


# untied: the default-suite twin of the slow official-parity variant opt_t_untied
@pytest.mark.parametrize("sampler,tied", [("ddim", True), ("edict", True), ("edict", False)])
def test_opt_t_runs_the_prefix_once_and_optimises_the_tail(world, write_config, sampler, tied):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "optt.yaml", pipe, tmp / "optt", steps=1, opt_t=2, sampler=sampler,
                       guidance=[kinds["symmetry"]], tied_latents=tied)
    cli = main(["--config", cfg], run=False)
    m = cli.model
    m.setup("fit")
    z_T = m.latents.detach()[:, 0].clone()
    m.on_fit_start()
    full = Schedule.from_scheduler(m.backbone.scheduler, 4)
    assert m.chain.schedule.timesteps == full.timesteps[2:]
    eps = m.chain.denoiser(list(range(4)))
    if sampler == "ddim":
        expect = sample_ddim(eps, z_T, full.head(2))
        assert torch.allclose(m.latents[:, 0], expect, atol=1e-6)
    else:
        x, y = sample_edict(eps, z_T, z_T, full.head(2))
        if tied:  # tied_latents: the pair is tied after the prefix
            assert torch.allclose(m.latents[:, 0], (x + y) / 2, atol=1e-6) and torch.equal(m.latents[:, 0], m.latents[:, 1])
        else:  # untied: the prefix's own pair, (x, y) apart
            assert torch.allclose(m.latents[:, 0], x, atol=1e-6) and torch.allclose(m.latents[:, 1], y, atol=1e-6)
            assert not torch.allclose(x, y, atol=1e-6)
    # the renormalisation target stays the norm of x_T
    assert torch.allclose(m.initial_norm.float(), z_T.flatten(1).norm(dim=1))


@pytest.mark.parametrize("one_step_baseline", [True, False])
def test_guided_sampling_baselines_generate_without_optimising(world, write_config, one_step_baseline):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "os.yaml", pipe, tmp / "os", steps=1, guidance=[kinds["symmetry"]])
    m = main(["--config", cfg], run=False).model
    with pytest.raises(RuntimeError, match="prepare"):
        guided_sampling(m, grad_scale=2.0)
    m.prepare("cpu")
    before = m.latents.detach().clone()
    estimate = "one_step" if one_step_baseline else "chain"
    guided = guided_sampling(m, grad_scale=2.0, estimate=estimate)
    plain = guided_sampling(m, grad_scale=0.0, estimate=estimate)
    assert guided.images.shape == plain.images.shape == (4, 3, 16, 16)
    assert (guided.total < plain.total).float().mean() >= 0.5
    assert torch.equal(m.latents, before)  # nothing optimised
    with pytest.raises(ValueError, match="one_step, chain"):
        guided_sampling(m, grad_scale=2.0, estimate="two_step")
