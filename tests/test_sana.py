"""SANA and SANA-Sprint behind the module, CLI and guarantees of the other families: the pipelines' prompt encoding
(Gemma-2 with the complex human instruction), parity of the unguided chain with SanaPipeline (DPM-Solver++ on flow
sigmas, true CFG) and SanaSprintPipeline (sCM steps, guidance embedding, the pipeline's own re-noising draws),
exact gradients, a DOODL fit and a bit-identical resume through ``cli.py``, bad input. The family contract they
inherit by being registered (load round trip, dtype, determinism) runs in test_families.py.

Every model is a tiny random pipeline in the released layout (``doodl_lightning.testing.sana_models``), saved with
``save_pretrained`` and loaded back through the code path of a downloaded one.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli import main, run_cli
from doodl_lightning.families import REGISTRY, PretrainedSanaBackbone, PretrainedSanaSprintBackbone, resolve_backbone
from doodl_lightning.families.sana import pipeline_complex_human_instruction
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import FlowSchedule, relative_error, sample, sample_flow_dpm, sample_scm
from doodl_lightning.testing import families as F

PROMPT = "A red Circle"  # upper case: the pipelines lower-case it


@pytest.fixture(scope="module")
def sana_models(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_families too)
    return {**{name: F.tiny_model(name, shared) for name in ("sana", "sana-sprint")},
            "tmp": tmp_path_factory.mktemp("sana")}


@functools.lru_cache(maxsize=None)
def _pipeline(path):
    """The diffusers pipeline of a saved tiny model (the reference), loaded once per test session."""
    import diffusers

    cls = diffusers.SanaSprintPipeline if "sprint" in Path(path).name else diffusers.SanaPipeline
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _backbone(path):
    return resolve_backbone(path)


def doodl(path, steps, guidance_scale, height=32, width=32, **kw) -> DOODL:
    m = DOODL(model=path, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=guidance_scale, height=height,
              width=width, guidance=[SymmetryGuidance()], **kw)
    return m.prepare()


def test_sana_registry_and_conditioning_are_the_pipelines(sana_models):
    """model_index.json picks the backbone; the caption states and mask are exactly the pipelines' encode_prompt with
    their default complex human instruction (the negative prompt without it), and the instruction really is in them."""
    sana, sprint = sana_models["sana"], sana_models["sana-sprint"]
    assert type(_backbone(sana)) is PretrainedSanaBackbone is REGISTRY["SanaPipeline"]
    assert type(_backbone(sprint)) is PretrainedSanaSprintBackbone is REGISTRY["SanaSprintPipeline"]
    bb = _backbone(sana)
    chi = pipeline_complex_human_instruction("SanaPipeline")
    assert chi == pipeline_complex_human_instruction("SanaSprintPipeline") and len(chi) == 8
    cond, neg = bb.encode_prompts([PROMPT]), bb.encode_negative("blurry")
    with torch.no_grad():
        ref, mask, ref_neg, mask_neg = _pipeline(sana).encode_prompt(PROMPT, True, negative_prompt="blurry",
                                                                     complex_human_instruction=chi)
    assert cond.hidden.shape == (1, 300, 16) and torch.equal(cond.hidden, ref)
    assert torch.equal(cond.added["encoder_attention_mask"], mask)
    assert torch.equal(neg.hidden, ref_neg) and torch.equal(neg.added["encoder_attention_mask"], mask_neg)
    plain = PretrainedSanaBackbone(sana, complex_human_instruction=[]).encode_prompts([PROMPT])
    assert not torch.allclose(plain.hidden, cond.hidden)  # the instruction changes the caption (causal Gemma)
    bb = _backbone(sprint)
    with torch.no_grad():
        ref, mask = _pipeline(sprint).encode_prompt(PROMPT, complex_human_instruction=chi)
    cond = bb.encode_prompts([PROMPT])
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.added["encoder_attention_mask"], mask)


@pytest.mark.parametrize("case", [(4, 4.5, (32, 32)), (3, 1.0, (32, 64))])
def test_sana_chain_equals_the_diffusers_pipeline(sana_models, case):
    """SANA: the module's chain (latents, conditioning, batched-CFG velocity, flow_dpm on its scheduler's grid) ends
    where SanaPipeline (DPMSolverMultistepScheduler on flow sigmas) ends from the same noise."""
    steps, g, (h, w) = case
    path = sana_models["sana"]
    m = doodl(_backbone(path), steps, g, h, w)
    assert m.hparams.sampler == "flow_dpm" and m.latent_shape == (8, h // 4, w // 4)
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = sample_flow_dpm(m.chain.denoiser([0]), x, m.chain.schedule)
    ref = _pipeline(path)(PROMPT, latents=x.clone(), num_inference_steps=steps, guidance_scale=g, height=h, width=w,
                          output_type="latent", use_resolution_binning=False).images
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    # the sampler matters: Euler on the same grid is another chain (so parity could not pass by accident)
    with torch.no_grad():
        euler = sample(m.chain.denoiser([0]), x, m.chain.schedule, sampler="flow")[0]
    assert (euler - ref).abs().max() > 100 * 1e-5 * ref.abs().max()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sana_sprint_chain_equals_the_diffusers_pipeline(sana_models, steps):
    """SANA-Sprint: the sCM chain on the SCMScheduler's angles, given the pipeline's own re-noising draws (one
    generator, in step order) as its fixed noises, ends where SanaSprintPipeline ends (the guidance embedding at 4.5)."""
    path = sana_models["sana-sprint"]
    m = doodl(_backbone(path), steps, 4.5, 32, 64 if steps == 2 else 32)
    assert m.hparams.sampler == "scm" and isinstance(m.chain.schedule, FlowSchedule)
    x = m.latents.detach()[:, 0]
    gen = torch.Generator().manual_seed(5)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(steps - 1)]
    with torch.no_grad():
        ours = sample_scm(m.chain.denoiser([0]), x, m.chain.schedule, noises)
        own = sample_scm(m.chain.denoiser([0]), x, m.chain.schedule)  # the chain's own noise estimate instead
    ref = _pipeline(path)(PROMPT, latents=x.clone(), num_inference_steps=steps, guidance_scale=4.5, height=32,
                          width=x.shape[-1] * 4, intermediate_timesteps=1.3 if steps == 2 else None,
                          output_type="latent", use_resolution_binning=False,
                          generator=torch.Generator().manual_seed(5)).images
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    # one step re-noises nothing; more steps: the draws matter (the deterministic estimate is another chain)
    assert torch.equal(own, ours) if steps == 1 else (own - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("family,sampler,noises", [("sana", "flow_dpm", False), ("sana-sprint", "scm", True),
                                                   ("sana-sprint", "scm", False)])
def test_sana_checkpoint_equals_autograd_in_float64(sana_models, family, sampler, noises):
    """Through the backbone's velocity (SANA's batched CFG, Sprint's guidance embedding), the checkpointed chain's
    gradient equals plain autograd's in float64."""
    bb = (PretrainedSanaSprintBackbone if family == "sana-sprint" else PretrainedSanaBackbone)(
        sana_models[family], max_sequence_length=8, complex_human_instruction=[]).to(torch.float64)
    v = bb.denoiser(bb.encode_prompts([PROMPT, "a blue square"]), bb.encode_negative(""), 3.0)
    schedule = bb.schedule(3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *bb.latent_shape(32)), generator=gen, dtype=torch.float64)
    w = torch.randn_like(x)
    zs = [torch.randn_like(x) for _ in range(2)] if noises else None

    def grad(backprop):
        z = x.clone().requires_grad_()
        (f,) = sample(v, z, schedule, sampler=sampler, backprop=backprop, noises=zs)
        ((f * w).sum() + (f ** 2).sum()).backward()
        return z.grad

    ref = grad("autograd")
    assert ref.abs().max() > 0 and relative_error(grad("checkpoint"), ref) < 1e-10


def _config(write_config, tmp, name, model, iterations, chain_steps, **keys) -> str:
    cfg = write_config(tmp / f"{name}.yaml", model, tmp / name, steps=iterations,
                       **{"height": 32, "width": 32, "update_rule": "adam", "lr": 0.1, **keys})
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = chain_steps
    Path(cfg).write_text(yaml.safe_dump(data))
    return cfg


def test_sana_sprint_doodl_fit_through_the_cli_lowers_the_loss(sana_models, write_config):
    """One DOODL fit on SANA-Sprint (2 sCM steps, the checkpointed chain, guidance embedding 4.5) through cli.py: the
    loss goes down; the transformer's calls per image are what the chain costs."""
    tmp = sana_models["tmp"]
    cfg = _config(write_config, tmp, "fit_sprint", sana_models["sana-sprint"], 4, 2, guidance_scale=4.5)
    cli = main(["fit", "--config", cfg])
    run = tmp / "fit_sprint/lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and cli.model.hparams.sampler == "scm" and cli.model.latent_shape == (8, 8, 8)
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])
    compute = json.loads((run / "compute.json").read_text())
    assert compute["unet_evaluations_per_image"] == 4 * 2 * 2 + 2, compute  # forward + recomputation, + final


@pytest.mark.slow
def test_sana_resume_from_last_checkpoint_is_bit_identical(sana_models, write_config):
    """SANA with CFG on flow_dpm: 2 steps with checkpoints, resumed from last.ckpt to 3, ends bit for bit where an
    uninterrupted 3-step run ends (8 s: slow; its fast twins are test_families' same-chain-whatever-the-load on the
    tiny SANA models and test_flow_families' FLUX resume, the same module path)."""
    tmp = sana_models["tmp"]

    def cfg(name, iterations):
        return _config(write_config, tmp, name, sana_models["sana"], iterations, 2, guidance_scale=4.5,
                       prompts=[PROMPT], seeds=[0])

    first = main(["fit", "--config", cfg("resume", 2)])
    ckpt = tmp / "resume/lightning_logs/version_0/checkpoints/last.ckpt"
    assert first.trainer.global_step == 2 and ckpt.is_file()
    resumed = main(["fit", "--config", cfg("resume", 3), "--ckpt_path", str(ckpt)])
    full = main(["fit", "--config", cfg("full", 3)])
    assert resumed.trainer.global_step == full.trainer.global_step == 3
    assert torch.equal(resumed.model.latents, full.model.latents)
    assert not torch.equal(first.model.latents, full.model.latents)


@pytest.mark.parametrize("case", ["sana-sampler-ddim", "sprint-as-sana-class-path"])
def test_sana_bad_input_is_one_line_and_writes_nothing(sana_models, write_config, capsys, case):
    tmp = sana_models["tmp"]
    out = tmp / f"bad_{case}"
    keys, expected = {
        "sana-sampler-ddim": (dict(model=sana_models["sana"], sampler="ddim", height=32, width=32),
                              "error: sampler 'ddim' needs a diffusion (noise-prediction) model; SANA is a flow-matching "
                              "model: use sampler flow_dpm (its pipeline's) or one of flow, flow_edict, scm, or leave "
                              "sampler unset"),
        "sprint-as-sana-class-path": (dict(model={"class_path": "doodl_lightning.families.PretrainedSanaBackbone",
                                                  "init_args": {"path": sana_models["sana-sprint"]}}),
                                      f"error: {sana_models['sana-sprint']} is a SanaSprintPipeline, not a SanaPipeline: "
                                      "use doodl_lightning.families.PretrainedSanaSprintBackbone (or model: <path>)"),
    }[case]
    model = keys.pop("model")
    cfg = write_config(tmp / f"bad_{case}.yaml", model, out, **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == expected
    assert not out.exists()
