"""FLUX.2 klein (``Flux2KleinPipeline``) behind the same module, CLI and guarantees as the other flow families: its
own cases (the pipeline's Qwen3 prompt encoding, grid, latent space and decoding; exact gradients; a fit and a resume
through ``cli.py``; bad input). The family contract it inherits by being registered (save / load round trip, dtype,
determinism) is in test_families.py; the parity of the whole chain with the pipeline is here, for both klein
variants (distilled: no CFG; base: CFG, which the pipeline runs as two calls and we batch into one).

Every model is a tiny random pipeline in the released layout (``doodl_lightning.testing.flux2_models``: Flux2
transformer, 28-layer Qwen3 with an offline tokenizer and Qwen3's chat template, AutoencoderKLFlux2 with random
batch-norm statistics), saved with ``save_pretrained`` and loaded back through the code path of a downloaded one.
"""
from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli import main, run_cli
from doodl_lightning.families import FlowBackbone, PretrainedFlux2Backbone, resolve_backbone
from doodl_lightning.families.flux2 import empirical_mu, patchify, unpatchify
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import FlowSchedule, relative_error, sample, sample_flow
from doodl_lightning.testing import families as F

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def flux2_models(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_families too)
    tmp = tmp_path_factory.mktemp("flux2")
    klein = F.tiny_model("flux2-klein", shared)
    # klein base: the same architecture without the distillation flag (model_index.json's is_distilled false), which
    # is all the pipeline and the backbone read of it; copied, not rebuilt (building the 28-layer Qwen3 costs seconds)
    base = tmp / "klein_base"
    shutil.copytree(klein, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    return {"klein": klein, "klein-base": str(base), "tmp": tmp}


@functools.lru_cache(maxsize=None)
def _pipeline(path: str):
    """The diffusers pipeline of a saved tiny model (the reference), loaded once."""
    import diffusers

    pipe = diffusers.Flux2KleinPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _backbone(path: str) -> PretrainedFlux2Backbone:
    """Our backbone of a saved tiny model through the registry, loaded once (float32; its users do not cast it)."""
    return resolve_backbone(path)


def doodl(path, steps, guidance_scale, height=16, width=16, **kw) -> DOODL:
    m = DOODL(model=path, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=guidance_scale, height=height,
              width=width, guidance=[SymmetryGuidance()], **kw)
    return m.prepare()


def test_flux2_klein_conditioning_is_the_pipelines_encode_prompt(flux2_models):
    """Qwen3's states of layers 9, 18, 27 stacked per token over the chat-templated prompt padded to 512 tokens,
    exactly as Flux2KleinPipeline.encode_prompt (and at a shorter max_sequence_length); the registry picks the
    backbone from model_index.json, a FlowBackbone with its text encoder outside the module."""
    bb = _backbone(flux2_models["klein"])
    assert type(bb) is PretrainedFlux2Backbone and isinstance(bb, FlowBackbone) and bb.is_distilled
    assert not _backbone(flux2_models["klein-base"]).is_distilled  # model_index.json's is_distilled
    assert not any(k.startswith(("text_encoder", "_text")) for k in bb.state_dict())
    pipe = _pipeline(flux2_models["klein"])
    cond = bb.encode_prompts([PROMPT])
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPT)
        short, _ = pipe.encode_prompt(PROMPT, max_sequence_length=40)
    assert cond.hidden.shape == (1, 512, 24) and not cond.added and torch.equal(cond.hidden, ref)
    assert torch.equal(PretrainedFlux2Backbone(flux2_models["klein"], max_sequence_length=40)
                       .encode_prompts([PROMPT]).hidden, short)
    two = bb.encode_prompts([PROMPT, "a blue square"])  # row by row the same (up to the batch's rounding)
    assert torch.allclose(two.hidden[:1], ref, atol=1e-6) and not torch.allclose(two.hidden[1:], ref)


def test_flux2_klein_grid_and_latent_space_are_the_pipelines():
    """The grid's shift is compute_empirical_mu of (tokens, steps) (transcribed; checked against diffusers' own
    on both branches), the latents' 2x2 patchify is the pipeline's, and at 1024 px the backbone's 4-step grid is
    the one the pipeline hands its scheduler (no model call)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2 import pipeline_flux2_klein as P

    from doodl_lightning.testing.flux2_models import FLUX2_SCHEDULER

    for tokens, steps in ((1, 1), (16, 4), (4096, 4), (4301, 50), (16384, 28)):
        assert empirical_mu(tokens, steps) == P.compute_empirical_mu(tokens, steps)
    z = torch.randn(2, 32, 8, 12)
    assert torch.equal(patchify(z), P.Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER)
    ref = copy.deepcopy(scheduler)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=P.compute_empirical_mu(64 * 64, 4))
    ours = FlowSchedule.from_scheduler(scheduler, 4, sigmas=list(np.linspace(1.0, 1 / 4, 4)), mu=empirical_mu(4096, 4))
    assert ours.timesteps == tuple(float(t) for t in ref.timesteps) and ours.sigmas[-1] == 0.0


# (tiny model, steps, guidance scale, (height, width)): klein distilled (the scale is ignored, as its pipeline), one
# step and four; klein base with CFG batched in one call (the pipeline: two calls) and at scale 1 (no CFG)
PARITY = {
    "klein-4steps-nonsquare": ("klein", 4, 4.0, (16, 32)),
    "klein-1step": ("klein", 1, 1.0, (16, 16)),
    "klein-base-cfg": ("klein-base", 3, 4.0, (32, 16)),
    "klein-base-unguided": ("klein-base", 2, 1.0, (16, 16)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_flux2_klein_chain_equals_the_diffusers_pipeline(flux2_models, case):
    """The module's chain (its seed's latents, conditioning, velocity and grid) ends where Flux2KleinPipeline ends
    from its own noise (``generator`` with the item's seed: the module's latents ARE the pipeline's noise): the
    final packed latents (read by the pipeline's step-end callback) within 1e-5 relative, and our decoding (batch-norm
    denormalisation, un-patchify, VAE) gives the pipeline's images."""
    name, steps, g, (h, w) = PARITY[case]
    bb = _backbone(flux2_models[name])
    m = doodl(bb, steps, g, h, w)
    assert m.hparams.sampler == "flow" and m.latent_shape == (128, h // 4, w // 4)
    assert m.backbone.rows_per_evaluation(g) == (2 if case == "klein-base-cfg" else 1)
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = sample_flow(m.chain.denoiser([0]), x, m.chain.schedule)
        image = (m.backbone.decode(ours) / 2 + 0.5).clamp(0, 1)
    seen = {}

    def last_latents(pipe, i, t, kw):
        seen["latents"] = kw["latents"]
        return {}

    ref_image = _pipeline(flux2_models[name])(
        prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, guidance_scale=g,
        height=h, width=w, output_type="pt", callback_on_step_end=last_latents).images
    ref = seen["latents"]  # (1, h*w, 128): the pipeline's packed tokens
    packed = ours.flatten(2).transpose(1, 2)
    assert packed.shape == ref.shape
    assert (packed - ref).abs().max() <= 1e-5 * ref.abs().max(), (packed - ref).abs().max()
    assert image.shape == ref_image.shape == (1, 3, h, w)
    assert (image - ref_image).abs().max() <= 1e-5, (image - ref_image).abs().max()


def test_flux2_klein_base_cfg_and_encoding_images_are_the_pipelines(flux2_models):
    """CFG matters on klein base (scale 4 is another chain than scale 1, so the parity above could not pass by
    ignoring it) and is ignored by the distilled klein; the negative prompt's velocity alone is the pipeline's chain
    of the negative prompt; ``encode_images`` (the editing start) is the pipeline's _encode_vae_image (posterior mode,
    patchified, normalised) and ``vae_latents`` inverts the normalisation."""
    base, klein = _backbone(flux2_models["klein-base"]), _backbone(flux2_models["klein"])
    x = torch.randn((1, *base.latent_shape(16)), generator=torch.Generator().manual_seed(1))
    for bb, differs in ((base, True), (klein, False)):
        cond, uncond = bb.encode_prompts([PROMPT]), bb.encode_negative("")
        schedule = bb.schedule(2, size=(16, 16))
        with torch.no_grad():
            a, b = (sample_flow(bb.denoiser(cond, uncond, s), x, schedule) for s in (4.0, 1.0))
        assert (not torch.equal(a, b)) is differs
    # the negative prompt's velocity alone (the flow one-step baseline's estimate) is the pipeline's chain of that prompt
    pipe = _pipeline(flux2_models["klein-base"])
    with torch.no_grad():
        ours = sample_flow(base.unconditional_velocity(base.encode_negative(""), 4.0), x, base.schedule(2, size=(16, 16)))
    ref = pipe(prompt="", latents=x.clone(), num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
               output_type="latent").images
    ours = base.vae_latents(ours)  # the pipeline's output_type="latent": denormalised, un-patchified
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = pipe._encode_vae_image(images, generator=None)
        z = base.encode_images(images)
    assert torch.allclose(z, ref, rtol=1e-6, atol=1e-6)
    bn = pipe.vae.bn
    assert torch.allclose(base.vae_latents(z), unpatchify(patchify(pipe.vae.encode(images).latent_dist.mode())),
                          rtol=1e-5, atol=1e-5) and bn.running_mean.abs().max() > 0.1


def test_flux2_klein_flow_edict_edits_a_source_image_from_its_exact_inversion(flux2_models):
    """Editing (``source_image``): the image loaded at 16 px per latent cell, encoded into the pipeline's latent space
    (the parity above), inverted exactly by the coupled chain, and mapped back to that latent."""
    from PIL import Image

    from doodl_lightning.data import load_source_image
    from doodl_lightning.sampling import sample_flow_edict

    path = flux2_models["tmp"] / "source.png"
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(path)
    m = doodl(_backbone(flux2_models["klein"]), 4, 1.0, sampler="flow_edict", source_image=str(path))
    assert m.chain.start.round_trip_error < 1e-4 and m.latent_shape == (128, 4, 4)
    x, y = m.latents[:, 0].detach(), m.latents[:, 1].detach()
    with torch.no_grad():
        x0, _ = sample_flow_edict(m.chain.denoiser([0]), x, y, m.chain.schedule, m.hparams.mix_weight)
    z0 = m.backbone.encode_images(load_source_image(str(path), (16, 16)).float(), generators=[torch.Generator().manual_seed(0)])
    assert relative_error(x0, z0) < 1e-4


@pytest.mark.parametrize("family,sampler", [("klein", "flow"), ("klein-base", "flow_edict")])
def test_flux2_klein_checkpoint_and_reversible_equal_autograd_in_float64(flux2_models, family, sampler):
    """Through the backbone's velocity (the pipeline's token layout; klein base's batched CFG), ``sample``'s
    checkpoint (and, for the coupled chain, reversible) gradients equal plain autograd's in float64."""
    bb = PretrainedFlux2Backbone(flux2_models[family], max_sequence_length=32).to(torch.float64)
    v = bb.denoiser(bb.encode_prompts([PROMPT, "a blue square"]), bb.encode_negative(""), 3.0)
    schedule = bb.schedule(2, size=(16, 16))
    x = torch.randn((2, *bb.latent_shape(16)), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn_like(x)

    def grad(backprop):
        z = x.clone().requires_grad_()
        finals = sample(v, z, schedule, sampler=sampler, backprop=backprop)
        sum(((f * w).sum() + (f ** 2).sum()) for f in finals).backward()
        return z.grad

    ref = grad("autograd")
    assert ref.abs().max() > 0 and torch.allclose(grad("checkpoint"), ref, rtol=1e-12, atol=1e-14)
    if sampler == "flow_edict":
        assert relative_error(grad("reversible"), ref) < 1e-8


def _config(write_config, tmp: Path, name: str, model, iterations: int, **keys) -> str:
    cfg = write_config(tmp / f"{name}.yaml", model, tmp / name, steps=iterations,
                       **{"height": 16, "width": 16, "update_rule": "adam", "lr": 0.1, "guidance_scale": 1.0, **keys})
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = 2  # the chain's steps
    Path(cfg).write_text(yaml.safe_dump(data))
    return cfg


def test_flux2_klein_doodl_fit_through_the_cli_lowers_the_loss_and_resumes_bit_identically(flux2_models, write_config):
    """A DOODL fit on klein base with CFG through ``cli.py`` (the ``class_path`` form, 32 text tokens) lowers the
    loss, its compute meter counting the batched CFG rows as one evaluation; 2 iterations, then resumed from
    last.ckpt to 4, end bit for bit where an uninterrupted 4-iteration run ends."""
    tmp = flux2_models["tmp"]
    model = {"class_path": "doodl_lightning.families.PretrainedFlux2Backbone",
             "init_args": {"path": flux2_models["klein-base"], "max_sequence_length": 32}}

    def cfg(name, iterations):
        return _config(write_config, tmp, name, model, iterations, guidance_scale=3.0, prompts=[PROMPT], seeds=[0, 1])

    first = main(["fit", "--config", cfg("resume", 2)])
    ckpt = tmp / "resume/lightning_logs/version_0/checkpoints/last.ckpt"
    assert first.trainer.global_step == 2 and ckpt.is_file()
    resumed = main(["fit", "--config", cfg("resume", 4), "--ckpt_path", str(ckpt)])
    full = main(["fit", "--config", cfg("full", 4)])
    assert type(full.model.backbone) is PretrainedFlux2Backbone and full.model.backbone.max_sequence_length == 32
    assert resumed.trainer.global_step == full.trainer.global_step == 4
    assert torch.equal(resumed.model.latents, full.model.latents)
    assert not torch.equal(first.model.latents, full.model.latents)
    run = tmp / "full/lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and full.model.latent_shape == (128, 4, 4)
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])
    # 4 iterations x 2 steps x (forward + checkpoint recomputation) + the final evaluation's 2, per image
    compute = json.loads((run / "compute.json").read_text())
    assert compute["unet_evaluations_per_image"] == 4 * 2 * 2 + 2, compute


@pytest.mark.slow
def test_flux2_klein_flow_edict_reversible_fit_through_the_cli(flux2_models, write_config):
    """The coupled chain on distilled klein with the reversible gradient, through ``cli.py`` (the default suite's
    twin: the float64 reversible == autograd test above, and the fit on the Euler chain)."""
    tmp = flux2_models["tmp"]
    cli = main(["fit", "--config", _config(write_config, tmp, "edict", flux2_models["klein"], 4, sampler="flow_edict",
                                           backprop="reversible", prompts=[PROMPT], seeds=[0, 1])])
    records = [json.loads(x) for x in (tmp / "edict/lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert cli.model.hparams.sampler == "flow_edict" and len(records) == 2
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])


@pytest.mark.parametrize("case", ["size-not-patch", "controlnet",
                                  # FlowBackbone's own message (tested on SD3 in test_flow_families): slow here
                                  pytest.param("sampler-ddim", marks=pytest.mark.slow)])
def test_flux2_klein_bad_input_is_one_line_and_writes_nothing(flux2_models, write_config, capsys, case):
    """Bad keys for a FLUX.2 model end in one line naming the fix, before any file is written."""
    tmp = flux2_models["tmp"]
    out = tmp / f"bad_{case}"
    keys, expected = {
        "size-not-patch": (dict(height=16, width=18),
                           "error: width 18 is not a positive multiple of 4: the VAE downsamples by 2 and FLUX.2 "
                           "patchifies 2x2 latent patches; use e.g. 16"),
        "sampler-ddim": (dict(sampler="ddim"),
                         "error: sampler 'ddim' needs a diffusion (noise-prediction) model; FLUX2 is a rectified-flow "
                         "model: use sampler flow (Euler, its pipeline's) or flow_edict (exactly invertible), or leave "
                         "sampler unset"),
        "controlnet": (dict(controlnet=str(tmp)),
                       "error: controlnet is for the UNet families (SD-1.x/2.x, SDXL); this FLUX.2 model has none "
                       "here: drop controlnet"),
    }[case]
    cfg = write_config(tmp / f"bad_{case}.yaml", flux2_models["klein"], out, **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == expected
    assert not out.exists()
