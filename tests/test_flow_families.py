"""SD3 / SD3.5 and FLUX.1 (rectified-flow transformers) behind the same module, CLI and guarantees as the UNet
families: their own cases (the pipelines' prompt encoding, exact gradients, fits and resumes through ``cli.py``, bad
input). The family contract they inherit by being registered (the save / load round trip, parity with
StableDiffusion3Pipeline / FluxPipeline, dtype, determinism) is in test_families.py.

Every model is a tiny random pipeline in the released layout (transformer, CLIP towers, T5 with an offline
tokenizer, 16-channel VAE with scaling and shift factor), saved with ``save_pretrained`` and loaded back through
the code path of a downloaded one (``doodl_lightning.testing.flow_models``).
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
from doodl_lightning.backbone import Backbone
from doodl_lightning.families import PretrainedFlowBackbone, resolve_backbone
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.data import load_source_image
from doodl_lightning.sampling import FlowSchedule, relative_error, sample, sample_flow, sample_flow_edict
from doodl_lightning.testing import families as F

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_families too)
    return {**{name: F.tiny_model(name, shared) for name in ("sd3", "flux-dev", "flux-schnell")},
            "tmp": tmp_path_factory.mktemp("flow_families")}


def doodl(path, steps, guidance_scale, height=16, width=16, **kw) -> DOODL:
    """The module on a tiny model (a path, or a backbone object), set up without a Trainer."""
    m = DOODL(model=path, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=guidance_scale, height=height,
              width=width, guidance=[SymmetryGuidance()], **kw)
    return m.prepare()


@functools.lru_cache(maxsize=None)
def _pipeline(path, t5: bool = True):
    """The diffusers pipeline of a saved tiny model (the reference), loaded once per test session."""
    import diffusers

    cls = diffusers.FluxPipeline if "flux" in Path(path).name else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(path, **({} if t5 else dict(text_encoder_3=None, tokenizer_3=None)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _backbone(path, t5: bool = True) -> PretrainedFlowBackbone:
    """Our backbone of a saved tiny model, loaded once (float32; the modules that share it do not cast it)."""
    return PretrainedFlowBackbone(path, t5=t5)


def test_sd3_flux_conditioning_is_the_pipelines_encode_prompt(flow_models):
    """The joint sequence (CLIP-L | CLIP-G penultimate states zero-padded to T5's width, then T5) and the pooled
    projections (SD3), T5 states and CLIP pooled output (FLUX), exactly as the pipelines' encode_prompt."""
    bb = PretrainedFlowBackbone(flow_models["sd3"], max_sequence_length=12)
    cond, neg = bb.encode_prompts([PROMPT]), bb.encode_negative("blurry")
    pipe = _pipeline(flow_models["sd3"])
    with torch.no_grad():  # as in the pipeline's __call__ (T5 rounds differently with grad recording)
        ref, ref_neg, pooled, pooled_neg = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="blurry",
                                                              max_sequence_length=12)
    assert cond.hidden.shape == (1, 77 + 12, 16) and cond.added["pooled_projections"].shape == (1, 16)
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.added["pooled_projections"], pooled)
    assert torch.equal(neg.hidden, ref_neg) and torch.equal(neg.added["pooled_projections"], pooled_neg)
    assert not cond.hidden[:, :77, 12:].any()  # CLIP's 8 + 4 channels, zero-padded to T5's 16
    two = bb.encode_prompts([PROMPT, "a blue square"])  # a batch: row by row the same (up to the batch's rounding)
    assert torch.allclose(two.hidden[:1], ref, atol=1e-6) and not torch.allclose(two.hidden[1:], ref)
    bb = PretrainedFlowBackbone(flow_models["flux-dev"])
    assert bb.family == "flux" and bb.max_sequence_length == 512  # FLUX.1-dev's default; schnell's is 256
    assert PretrainedFlowBackbone(flow_models["flux-schnell"]).max_sequence_length == 256
    cond = bb.encode_prompts([PROMPT])
    with torch.no_grad():
        ref, pooled, _ = _pipeline(flow_models["flux-dev"]).encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.added["pooled_projections"], pooled)


def test_sd3_flux_text_encoders_stay_out_of_the_module_and_follow_the_transformer_dtype(flow_models):
    """The text encoders are no submodules: the backbone's parameters, state dict, device moves and precision
    casts leave them alone; ``encode_prompts`` runs them in the transformer's dtype; the module's checkpoints hold
    the latents only. ``resolve_backbone`` picks the flow backbone from model_index.json by itself."""
    bb = resolve_backbone(flow_models["flux-dev"])
    assert type(bb) is PretrainedFlowBackbone and isinstance(bb, Backbone)
    n_text = sum(p.numel() for enc in bb.text_encoders for p in enc.parameters())
    assert n_text > 0 and not any(p is q for enc in bb.text_encoders for p in enc.parameters() for q in bb.parameters())
    bb.to(torch.float64)
    assert bb.transformer.dtype == torch.float64 and all(enc.dtype == torch.float32 for enc in bb.text_encoders)
    cond = bb.encode_prompts([PROMPT])
    assert cond.hidden.dtype == torch.float64 and all(enc.dtype == torch.float64 for enc in bb.text_encoders)
    assert not any(k.startswith(("text_encoder", "_text")) for k in bb.state_dict())
    m = doodl(flow_models["sd3"], 2, 3.0)
    assert list(m.state_dict()) == ["latents", "initial_norm", "active"]


def _grad_case(flow_models, family, dtype=torch.float64, **backbone):
    bb = PretrainedFlowBackbone(flow_models[family], max_sequence_length=8, **backbone).to(dtype)
    cond, uncond = bb.encode_prompts([PROMPT, "a blue square"]), bb.encode_negative("")
    eps = bb.denoiser(cond, uncond, 3.0)
    return bb, eps, bb.schedule(3, size=(16, 16)), bb.latent_shape(16)


@pytest.mark.parametrize("family,sampler", [("sd3", "flow"), ("sd3", "flow_edict"), ("flux-dev", "flow"),
                                            ("flux-schnell", "flow_edict")])
def test_sd3_flux_checkpoint_and_reversible_equal_autograd_in_float64(flow_models, family, sampler):
    """Through the backbone's velocity (SD3 with batched CFG, FLUX's packing and guidance embedding), ``sample``'s
    checkpoint (and, for the coupled chain, reversible) gradients equal plain autograd's in float64."""
    bb, v, schedule, shape = _grad_case(flow_models, family)
    assert isinstance(schedule, FlowSchedule)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    w = torch.randn_like(x)

    def grad(backprop):
        z = x.clone().requires_grad_()
        finals = sample(v, z, schedule, sampler=sampler, backprop=backprop)
        sum(((f * w).sum() + (f ** 2).sum()) for f in finals).backward()
        return z.grad

    ref = grad("autograd")
    assert torch.allclose(grad("checkpoint"), ref, rtol=1e-12, atol=1e-14)  # the same operations: exact
    if sampler == "flow_edict":
        # the VJPs at the inputs rebuilt by the exact inverse (drift ~6e-16): float64 rounding, amplified by the
        # random tiny transformer's curvature and CFG (measured 1.4e-9 relative for SD3 at scale 3, 3e-10 at 1)
        assert relative_error(grad("reversible"), ref) < 1e-8


def test_sd3_flux_transformer_checkpointing_changes_memory_not_the_gradient(flow_models):
    """``transformer_checkpointing`` (diffusers' gradient checkpointing inside the chain's with-grad recomputation)
    gives the same gradient; the VAE's checkpointing likewise through the decode."""
    grads = []
    for on in (False, True):
        bb, v, schedule, shape = _grad_case(flow_models, "flux-dev", transformer_checkpointing=on, vae_checkpointing=on)
        assert bb.transformer.gradient_checkpointing is on
        z = torch.randn((2, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
        (x0,) = sample(v, z, schedule, sampler="flow", backprop="checkpoint")
        bb.decode(x0).square().mean().backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_flux_opt_t_optimises_the_tail_of_the_same_chain(flow_models):
    """opt_t: the first steps run once without gradient (start.prepare), the rest is the optimised chain; together
    they are the whole chain (FlowSchedule head / tail)."""
    full = doodl(_backbone(flow_models["flux-dev"]), 4, 3.5)
    part = doodl(_backbone(flow_models["flux-dev"]), 4, 3.5, opt_t=2)
    assert len(part.chain.schedule) == 2 and part.chain.schedule.sigmas == full.chain.schedule.sigmas[2:]
    with torch.no_grad():
        a = sample_flow(full.chain.denoiser([0]), full.latents[:, 0], full.chain.schedule)
        b = sample_flow(part.chain.denoiser([0]), part.latents[:, 0], part.chain.schedule)
    assert torch.equal(a, b)
    pair = doodl(_backbone(flow_models["sd3"]), 3, 3.0, sampler="flow_edict", opt_t=1)  # the coupled chain: a tied pair
    assert pair.latents.shape[1] == 2 and torch.equal(pair.latents[:, 0], pair.latents[:, 1])


def test_sd3_flow_edict_edits_a_source_image_from_its_exact_inversion(flow_models):
    """Editing (``source_image``) on a flow model: the coupled chain's exact inverse (``flow_edict_invert``) of the
    VAE-encoded image is the untied starting pair, and the chain maps it back to that latent."""
    from PIL import Image

    path = flow_models["tmp"] / "source.png"
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(path)
    m = doodl(_backbone(flow_models["sd3"]), 4, 3.0, sampler="flow_edict", source_image=str(path))
    assert m.chain.start.round_trip_error < 1e-4 and not m.chain.start.renormalize
    x, y = m.latents[:, 0].detach(), m.latents[:, 1].detach()
    assert not torch.equal(x, y)  # an inverted pair is untied
    with torch.no_grad():
        x0, _ = sample_flow_edict(m.chain.denoiser([0]), x, y, m.chain.schedule, m.hparams.mix_weight)
    gen = [torch.Generator().manual_seed(0)]  # the item's seed draws the posterior sample, as the module does
    z0 = m.backbone.encode_images(load_source_image(str(path), (16, 16)).float(), generators=gen)
    assert relative_error(x0, z0) < 1e-4


def flow_config(write_config, path: Path, model, out: Path, iterations: int, chain_steps: int, **keys) -> str:
    """``write_config`` for a tiny flow model: ``iterations`` optimisation steps of a ``chain_steps``-step chain at
    16 x 16 px, adam at lr 0.1 (the UNet families' fit tests' update)."""
    cfg = write_config(path, model, out, steps=iterations, **{"height": 16, "width": 16, "update_rule": "adam",
                                                               "lr": 0.1, **keys})
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = chain_steps
    Path(cfg).write_text(yaml.safe_dump(data))
    return cfg


FITS = {  # the model: key as a path (the shortcut) or a class_path backbone with its own options
    "sd3-cfg": ("sd3", dict(guidance_scale=4.0)),
    "flux-dev-class-path": ("flux-dev", dict(guidance_scale=3.5, transformer_checkpointing=True)),
    "flux-schnell-flow-edict-reversible": ("flux-schnell", dict(guidance_scale=1.0, sampler="flow_edict",
                                                                backprop="reversible")),
}


@pytest.mark.parametrize("case", [c if c != "flux-dev-class-path" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in FITS])
def test_sd3_flux_doodl_fit_through_the_cli_lowers_the_loss(flow_models, write_config, case):
    family, keys = FITS[case]
    keys = dict(keys)
    model = flow_models[family]
    if keys.pop("transformer_checkpointing", False):
        model = {"class_path": "doodl_lightning.families.PretrainedFlowBackbone",
                 "init_args": {"path": model, "transformer_checkpointing": True, "max_sequence_length": 16}}
    out = flow_models["tmp"] / f"fit_{case}"
    cfg = flow_config(write_config, flow_models["tmp"] / f"{case}.yaml", model, out, 4, 2, **keys)
    cli = main(["fit", "--config", cfg])
    run = out / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])
    assert cli.model.latent_shape == (16, 8, 8) and cli.model.hparams.sampler == keys.get("sampler", "flow")
    # the transformer's calls per image, counted by the compute meter (rows / (2 with SD3's batched CFG, else 1)):
    # 4 iterations x 2 steps x (forward + checkpoint recomputation) + the final evaluation's 2; x2 for the pair
    compute = json.loads((run / "compute.json").read_text())
    chains = 2 if keys.get("sampler") == "flow_edict" else 1
    assert compute["unet_evaluations_per_image"] == chains * (4 * 2 * 2 + 2), compute


def test_flux_resume_from_last_checkpoint_is_bit_identical(flow_models, write_config):
    """2 steps with checkpoints, then resumed from last.ckpt to 4, ends bit for bit where an uninterrupted
    4-step run ends (latents, Adam state, per-step generators: everything a step depends on is in the checkpoint
    or a function of (seed, step))."""
    tmp = flow_models["tmp"]

    def cfg(name, iterations):
        return flow_config(write_config, tmp / f"{name}.yaml", flow_models["flux-dev"], tmp / name, iterations, 2,
                           guidance_scale=3.5, prompts=[PROMPT], seeds=[0, 1])

    first = main(["fit", "--config", cfg("resume", 2)])
    ckpt = tmp / "resume/lightning_logs/version_0/checkpoints/last.ckpt"
    assert first.trainer.global_step == 2 and ckpt.is_file()
    resumed = main(["fit", "--config", cfg("resume", 4), "--ckpt_path", str(ckpt)])
    full = main(["fit", "--config", cfg("full", 4)])
    assert resumed.trainer.global_step == full.trainer.global_step == 4
    assert torch.equal(resumed.model.latents, full.model.latents)
    assert not torch.equal(first.model.latents, full.model.latents)


@pytest.mark.parametrize("case", ["sd3-sampler-ddim", "flux-timestep-grid", "flux-size-not-packing", "sd3-too-large",
                                  "flux-controlnet", "unet-sampler-flow", "flux-as-unet-class-path"])
def test_sd3_flux_bad_input_is_one_line_and_writes_nothing(flow_models, write_config, tiny_pipeline_dir, capsys, case):
    tmp = flow_models["tmp"]
    out = tmp / f"bad_{case}"
    keys, expected = {
        "sd3-sampler-ddim": (dict(model=flow_models["sd3"], sampler="ddim"),
                             "error: sampler 'ddim' needs a diffusion (noise-prediction) model; SD3 is a rectified-flow "
                             "model: use sampler flow (Euler, its pipeline's) or flow_edict (exactly invertible), or "
                             "leave sampler unset"),
        "flux-timestep-grid": (dict(model=flow_models["flux-dev"], timestep_grid="official", height=16, width=16),
                               "error: timestep_grid 'official' is a DDIM grid; FLUX samples on its pipeline's "
                               "flow-matching grid: drop timestep_grid (or set it to model)"),
        "flux-size-not-packing": (dict(model=flow_models["flux-dev"], height=16, width=18),
                                  "error: width 18 is not a positive multiple of 4: the VAE downsamples by 2 and FLUX "
                                  "packs 2x2 latent patches; use e.g. 16"),
        "sd3-too-large": (dict(model=flow_models["sd3"], resolution=64),
                          "error: resolution 64 is larger than this SD3 model's position table allows (8 patches = "
                          "32 px): use at most 32"),
        "flux-controlnet": (dict(model=flow_models["flux-dev"], controlnet=str(tmp), height=16, width=16),
                            "error: controlnet is for the UNet families (SD-1.x/2.x, SDXL); this SD3 / FLUX model has "
                            "none here: drop controlnet"),
        "unet-sampler-flow": (dict(model=tiny_pipeline_dir, sampler="flow"),
                              "error: sampler 'flow' is for rectified-flow models (SD3, FLUX); this is a diffusion UNet "
                              "model: use ddim, edict, lcm, or leave sampler unset"),
        "flux-as-unet-class-path": (dict(model={"class_path": "doodl_lightning.families.PretrainedBackbone",
                                                "init_args": {"path": flow_models["flux-dev"]}}),
                                    f"error: {flow_models['flux-dev']} is an SD3 / FLUX (rectified-flow transformer) "
                                    "model: use doodl_lightning.families.PretrainedFlowBackbone (or model: <path>)"),
    }[case]
    model = keys.pop("model")
    cfg = write_config(tmp / f"bad_{case}.yaml", model, out, **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == expected
    assert not out.exists()


@pytest.mark.slow
def test_sd3_flux_benchmark_records_flow_samplers(tmp_path):
    """``experiments/benchmarks/backprop.py --sd-config tiny-sd3 | tiny-flux-*`` (the same code as sd35-medium,
    flux-dev, flux-schnell) times the flow samplers' records: exact checkpoint gradients, one latent (pair) per step,
    the transformer's calls counted."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments/benchmarks/backprop.py"
    spec = importlib.util.spec_from_file_location("backprop_benchmark_flow", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = bench.main(["--sd-config", "tiny-flux-schnell", "--quick", "--steps", "2", "--guidance-scale", "1.0",
                          "--json", str(tmp_path / "flux.json")])
    by = {(r["sampler"], r["backprop"]): r for r in records}
    assert set(by) == {("flow", "autograd"), ("flow", "checkpoint"), ("flow_edict", "autograd"),
                       ("flow_edict", "checkpoint"), ("flow_edict", "reversible")}
    assert all(r["status"] == "ok" and r["resolution"] == 16 for r in records)
    assert by["flow", "checkpoint"]["grad_rel_error_vs_autograd"] < 1e-6
    assert by["flow", "checkpoint"]["unet_calls"] == 4 and by["flow_edict", "reversible"]["unet_calls"] == 8
    assert by["flow", "checkpoint"]["saved_bytes"] == 2 * 16 * 8 * 8 * 4  # one float32 latent per step


def test_flux_refuses_cuda_graphs_in_one_line(flow_models):
    """CUDA graphs replay a UNet; on a flow transformer the key would silently do nothing, so it is refused."""
    with pytest.raises(ValueError, match="cuda_graphs replays a UNet; this model is a flow transformer"):
        DOODL(model=flow_models["flux-schnell"], prompts=[PROMPT], seeds=[0], steps=1, guidance_scale=1.0,
              cuda_graphs=True, guidance=[SymmetryGuidance()])
