"""Every guidance kind end to end through ``cli.py fit`` on a tiny pipeline; editing and opt_t."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cli import main
from doodl_lightning.sampling import Schedule, sample_ddim, sample_edict
from test_framework import write_config
from tiny import save_tiny_pipeline
from tiny_clip import save_tiny_clip, write_tiny_clip_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guided")
    pipe = save_tiny_pipeline(tmp / "pipe")
    clip_cfg = write_tiny_clip_config(tmp)
    save_tiny_clip(clip_cfg, tmp / "clip.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, str(tmp / "head.safetensors"))
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
    clip = {"model_config": str(clip_cfg), "pretrained": str(tmp / "clip.safetensors"), "num_cuts": 2}
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
def test_every_guidance_kind_runs_through_the_cli(world, kind):
    tmp, pipe, kinds = world
    out = tmp / kind
    cfg = write_config(tmp / f"{kind}.yaml", pipe, out, steps=2, guidance=[kinds[kind]], lr=1.0, clip=0.05)
    cli = main(["fit", "--config", cfg])
    records = [json.loads(x) for x in (out / "lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(set(r["final_terms"]) == {kind} for r in records)
    assert all(torch.isfinite(torch.tensor([r["initial_loss"], r["final_loss"]])).all() for r in records)
    assert cli.model.latents.grad is not None and cli.model.latents.grad.abs().sum() > 0


def test_weighted_sum_of_two_guidances_logs_each_term(world):
    tmp, pipe, kinds = world
    two = [kinds["symmetry"], {**kinds["clip_text"], "init_args": {**kinds["clip_text"]["init_args"], "weight": 0.5}}]
    cli = main(["fit", "--config", write_config(tmp / "two.yaml", pipe, tmp / "two", steps=1, guidance=two)])
    ev = cli.model.last
    assert torch.allclose(ev.total, ev.terms["symmetry"] + 0.5 * ev.terms["clip_text"], atol=1e-6)


def test_editing_inverts_the_source_and_regenerates_it(world):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "edit.yaml", pipe, tmp / "edit", steps=1, seeds=[0], prompts=["a green square"],
                       source_image=str(tmp / "source.png"), guidance=[kinds["symmetry"]])
    cli = main(["--config", cfg], run=False)
    m = cli.model
    assert m.renormalize is False  # editing: renormalisation off, as the official code
    m.setup("fit")
    m.double()  # what --trainer.precision 64-true does: float64 end to end for a tight check
    m.on_fit_start()
    img = torch.tensor(list(Image.open(tmp / "source.png").convert("RGB").getdata()), dtype=torch.float64)
    x = (img.view(16, 16, 3).permute(2, 0, 1) / 127.5 - 1).unsqueeze(0)
    z0 = m.backbone.encode_images(x)
    eps = m._denoiser([0])
    x0, y0 = sample_edict(eps, m.latents + m.pair_offset, m.latents - m.pair_offset, m.schedule, m.hparams.mix_weight)
    assert m.latents.dtype == torch.float64
    assert m.source_round_trip_error < 1e-9
    assert (x0 - z0).norm() / z0.norm() < 1e-9 and (y0 - z0).norm() / z0.norm() < 1e-9


@pytest.mark.parametrize("sampler", ["ddim", "edict"])
def test_opt_t_runs_the_prefix_once_and_optimises_the_tail(world, sampler):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "optt.yaml", pipe, tmp / "optt", steps=1, opt_t=2, sampler=sampler,
                       guidance=[kinds["symmetry"]])
    cli = main(["--config", cfg], run=False)
    m = cli.model
    m.setup("fit")
    z_T = m.latents.detach().clone()
    m.on_fit_start()
    full = Schedule.from_scheduler(m.backbone.scheduler, 3)
    assert m.schedule.timesteps == full.timesteps[1:]
    eps = m._denoiser(list(range(4)))
    head = Schedule(full.timesteps[:1], full.alphas_cumprod[:1], full.alphas_cumprod_prev[:1])
    if sampler == "ddim":
        expect = sample_ddim(eps, z_T, head)
        assert torch.allclose(m.latents, expect, atol=1e-6)
    else:
        x, y = sample_edict(eps, z_T, z_T, head)
        assert torch.allclose(m.latents + m.pair_offset, x, atol=1e-6)
        assert torch.allclose(m.latents - m.pair_offset, y, atol=1e-6)


def test_one_step_baseline_generates_without_optimising(world):
    tmp, pipe, kinds = world
    cfg = write_config(tmp / "os.yaml", pipe, tmp / "os", steps=1, one_step_scale=2.0, guidance=[kinds["symmetry"]])
    cli = main(["--config", cfg], run=False)
    m = cli.model
    m.setup("fit")
    m.on_fit_start()
    guided = m.one_step_images()
    m.hparams.one_step_scale = 0.0
    plain = m.one_step_images()
    assert guided.images.shape == plain.images.shape == (4, 3, 16, 16)
    assert (guided.total < plain.total).float().mean() >= 0.5
