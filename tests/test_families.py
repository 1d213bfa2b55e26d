"""Model families behind one ``Backbone`` interface: the family contract every registered family inherits, then the
UNet families' own cases (SD-1.x, SD-Turbo, SDXL, SDXL-Turbo, LCM, ControlNet: exact gradients, fits through
``cli.py``, bad input); the flow families' own cases (SD3, FLUX) are in test_flow_families.py.

The family contract (as diffusers' ``SchedulerCommonTest``): a family registers its pipeline class names in
``doodl_lightning.families.REGISTRY`` and a tiny model in ``doodl_lightning.testing.families.TINY_MODELS``, and then
every case below runs on it: the save / load round trip through the registry, parity of the unguided chain with
diffusers' own pipeline (a reference no one here wrote), the precision's dtype, determinism.

Every model is a tiny random pipeline in the released layout, saved with ``save_pretrained`` and loaded back
through the same code path as a downloaded one.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cli import main, run_cli
from doodl_lightning.backbone import Backbone, pipeline_class_name
from doodl_lightning.families import REGISTRY, FlowBackbone, PretrainedBackbone, PretrainedFlowBackbone, resolve_backbone
from doodl_lightning.families.flux_layout import pack_latents, unpack_latents
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import Schedule, sample, sample_ddim, sample_flow, sample_lcm
from doodl_lightning.testing import families as F
from doodl_lightning.testing.memory import saved_bytes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_pipeline_dir):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_flow_families too)
    paths = {name: tiny_pipeline_dir if name == "sd" else F.tiny_model(name, shared) for name in F.TINY_MODELS}
    tmp = tmp_path_factory.mktemp("families")
    rgb = (np.random.RandomState(0).rand(16, 32, 3) * 255).astype("uint8")
    Image.fromarray(rgb).save(tmp / "control.png")
    paths["control_image"] = str(tmp / "control.png")
    paths["tmp"] = tmp
    return paths


def family_config(write_config, path: Path, pipe, out: Path, iterations: int, chain_steps: int, **model) -> str:
    """``write_config`` (``iterations`` optimisation steps) with the model's chain of ``chain_steps`` steps."""
    cfg = write_config(path, pipe, out, steps=iterations, **model)
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = chain_steps
    Path(cfg).write_text(yaml.safe_dump(data))
    return cfg


def doodl(path, steps, guidance_scale, height=16, width=16, **kw) -> DOODL:
    """The module on a tiny model (a path, or a backbone object), set up without a Trainer."""
    m = DOODL(model=path, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=guidance_scale, height=height,
              width=width, guidance=[SymmetryGuidance()], **kw)
    return m.prepare()


@functools.lru_cache(maxsize=None)
def _pipeline(path: str, t5: bool = True):
    """The diffusers pipeline a saved tiny model's model_index.json names (the reference), loaded once."""
    import diffusers

    cls = getattr(diffusers, pipeline_class_name(path))
    pipe = cls.from_pretrained(path, **({} if t5 else dict(text_encoder_3=None, tokenizer_3=None)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def _backbone(path: str, t5: bool = True) -> Backbone:
    """Our backbone of a saved tiny model through the registry, loaded once (float32; its users do not cast it)."""
    return resolve_backbone(path) if t5 else PretrainedFlowBackbone(path, t5=False)


def _chain(bb: Backbone, dtype=torch.float32, steps: int = 2, size=(16, 16)) -> torch.Tensor:
    """x_0 of the model's own sampler on its own grid from fixed noise, guidance scale 3 (a ControlNet: a fixed
    random control image; LCM: fixed per-step noises)."""
    gen = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, *size, generator=gen) if bb.controlnet is not None else None
    eps = bb.denoiser(bb.encode_prompts([PROMPT], size), bb.encode_negative("", size), 3.0, control_image=control)
    x = torch.randn((1, *bb.latent_shape(*size)), generator=gen).to(dtype)
    lcm = bb.default_sampler == "lcm"
    noises = [torch.randn(x.shape, generator=gen).to(dtype) for _ in range(steps - 1)] if lcm else None
    with torch.no_grad():
        return sample(eps, x, bb.schedule(steps, "model", size), sampler=bb.default_sampler, noises=noises)[0]


# -- the family contract ------------------------------------------------------------------------------------------

def test_every_registered_pipeline_class_has_a_tiny_model(models):
    """A family that registers a pipeline class inherits the contract through its tiny model (``TINY_MODEL_OF``):
    none may be missing or be of another class, and every tiny model is one the registry serves (none falls through
    to the default loader)."""
    assert list(F.TINY_MODEL_OF) == list(REGISTRY)
    assert all(pipeline_class_name(models[name]) == cls for cls, name in F.TINY_MODEL_OF.items())
    assert all(pipeline_class_name(models[name]) in REGISTRY for name in F.TINY_MODELS)


@pytest.mark.parametrize("name", list(F.TINY_MODELS))
def test_a_saved_model_loads_back_through_the_registry(models, name):
    """save_pretrained, then the module's ``model: <path>`` shortcut: the class REGISTRY names for the model's
    pipeline, frozen, in float32, every component with exactly the weights diffusers' own from_pretrained reads."""
    path = models[name]
    bb = resolve_backbone(path)
    assert type(bb) is REGISTRY[pipeline_class_name(path)] and isinstance(bb, Backbone)
    assert bb.dtype == torch.float32 and not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.unet.training
    bb.check_sampler(bb.default_sampler)  # its default is one it runs
    assert bb.default_sampler in bb.samplers and bb.supports_cuda_graphs is not isinstance(bb, FlowBackbone)
    assert bb.latent_shape(None)[1:] == (bb.default_size // bb.vae_scale_factor,) * 2
    pipe = _pipeline(path)
    net = pipe.transformer if isinstance(bb, FlowBackbone) else pipe.unet
    for part, theirs in (("unet", net), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder),
                         ("controlnet", getattr(pipe, "controlnet", None))):
        ours = getattr(bb, part)
        assert (ours is None) == (theirs is None), part
        if ours is not None:
            a, b = ours.state_dict(), theirs.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# (tiny model, steps, the pipeline's guidance scale, (height, width), module keys beyond the defaults; ``t5``: the
# backbone's option). UNet families: DDIM on the model's grid is the pipelines' DDIM / Euler; the Turbo models with
# no sampler or grid given run their own (DDIM = Euler on the trailing grid), no CFG. Flow families: SD3 with batched
# CFG and without; FLUX.1-dev's guidance embedding with its resolution-dependent shift; FLUX.1-schnell unshifted
PARITY = {
    "sd-ddim": ("sd", 4, 7.5, (16, 16), dict(sampler="ddim", timestep_grid="model")),
    "turbo-sd-1step": ("sd-turbo", 1, 0.0, (16, 16), {}),
    "turbo-sd-4steps": ("sd-turbo", 4, 0.0, (16, 16), {}),
    "sdxl-ddim-nonsquare": ("sdxl-ddim", 4, 5.0, (16, 32), dict(sampler="ddim", timestep_grid="model")),
    "sdxl-euler-leading": ("sdxl", 4, 5.0, (16, 16), dict(sampler="ddim", timestep_grid="model")),
    "sdxl-turbo-1step": ("sdxl-turbo", 1, 0.0, (16, 16), {}),
    "controlnet-sd": ("controlnet-sd", 4, 5.0, (16, 32), dict(sampler="ddim", timestep_grid="model")),
    "controlnet-sdxl": ("controlnet-sdxl", 4, 5.0, (16, 32), dict(sampler="ddim", timestep_grid="model")),
    # controlnet_scale is the pipeline's controlnet_conditioning_scale (the residuals' weight)
    "controlnet-sd-scale": ("controlnet-sd", 4, 5.0, (16, 32),
                            dict(sampler="ddim", timestep_grid="model", controlnet_scale=0.4)),
    "sd3-cfg-nonsquare": ("sd3", 4, 5.0, (16, 32), {}),
    "sd3-unguided": ("sd3", 3, 1.0, (16, 16), {}),
    "sd3-without-t5": ("sd3", 2, 4.0, (16, 16), dict(t5=False)),  # loaded without its T5 (zeros), as the pipeline can
    "flux-dev-nonsquare": ("flux-dev", 4, 3.5, (32, 16), {}),
    "flux-schnell-1step": ("flux-schnell", 1, 0.0, (16, 16), {}),
    "flux-schnell-4steps": ("flux-schnell", 4, 0.0, (16, 32), {}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_unguided_chain_equals_the_diffusers_pipeline(models, case):
    """From the same initial noise, our chain (the module's latents, conditioning, model callable and schedule) ends
    where the diffusers pipeline that the model's model_index.json names ends (``output_type="latent"``; FLUX's
    latents come packed): DDIM for a UNet, Euler (``flow``) for a rectified-flow model."""
    name, steps, g, (h, w), keys = PARITY[case]
    keys = dict(keys)
    t5 = keys.pop("t5", True)
    bb = _backbone(models[name], t5)
    flow, control = isinstance(bb, FlowBackbone), bb.controlnet is not None
    # a UNet pipeline runs CFG only above scale 1 (the module: 1 = none); a flow model takes the scale as it is
    m = doodl(bb, steps, g if g > 1 or flow else 1.0, h, w,
              control_images=[models["control_image"]] if control else None, **keys)
    assert m.hparams.sampler == ("flow" if flow else "ddim")
    assert m.latent_shape == (16 if flow else 4, h // 2, w // 2)
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = (sample_flow if flow else sample_ddim)(m.chain.denoiser([0]), x, m.chain.schedule)
    extra = {"image": Image.open(models["control_image"])} if control else {}
    if "controlnet_scale" in keys:
        extra["controlnet_conditioning_scale"] = keys["controlnet_scale"]
    if flow:
        extra["max_sequence_length"] = m.backbone.max_sequence_length
    flux = bb.family == "flux"
    ref = _pipeline(models[name], t5)(PROMPT, latents=pack_latents(x) if flux else x.clone(), num_inference_steps=steps,
                                      guidance_scale=g, height=h, width=w, output_type="latent", **extra).images
    if flux:
        ref = unpack_latents(ref, h // 2, w // 2)
    assert ours.shape == ref.shape == (1, *m.latent_shape)
    # float32, the pipelines' own schedulers (Euler's sigmas from float32 abar): relative to the latents' scale
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    if control:  # the image matters: the ControlNet is really in the chain
        blank = m.backbone.denoiser(m.chain.cond, m.chain.uncond, g, control_image=torch.zeros(1, 3, h, w))
        assert (sample_ddim(blank, x, m.chain.schedule) - ours).abs().max() > 1e-3
        if "controlnet_scale" in keys:  # and its scale: at scale 1 the chain is another one (parity could not pass)
            one = m.backbone.denoiser(m.chain.cond, m.chain.uncond, g, control_image=m.chain.control([0]), control_scale=1.0)
            assert (sample_ddim(one, x, m.chain.schedule) - ours).abs().max() > 100 * 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", list(F.TINY_MODEL_OF.values()))
def test_the_model_runs_in_the_precisions_dtype_and_the_chain_in_the_latents(models, name):
    """Cast to a dtype (what the precision plugin does), the model computes in it and the chain in the latents'
    dtype: float64 throughout, or a bfloat16 model under float32 latents (the sampler's algebra stays float32)."""
    bb = resolve_backbone(models[name]).to(torch.float64)
    assert bb.dtype == torch.float64
    x0 = _chain(bb, torch.float64)
    assert x0.dtype == torch.float64 and torch.isfinite(x0).all() and bb.decode(x0).dtype == torch.float64
    bb.to(torch.bfloat16)
    assert bb.dtype == torch.bfloat16
    x0 = _chain(bb)
    assert x0.dtype == torch.float32 and torch.isfinite(x0).all()


@pytest.mark.parametrize("name", list(F.TINY_MODEL_OF.values()))
def test_the_chain_is_the_same_whatever_the_load(models, name):
    """No hidden randomness in a family's loading or model call: two loads of a model give its chain bit for bit
    (what resuming a run and splitting its items over processes rely on)."""
    assert torch.equal(_chain(_backbone(models[name])), _chain(resolve_backbone(models[name])))


# -- the UNet families' own cases ----------------------------------------------------------------------------------

def test_lcm_chain_equals_the_diffusers_pipeline_given_its_noise(models):
    """LCM re-noises between steps: with the pipeline's own draws (one generator, in step order) as the fixed
    per-step noises, our chain is its chain; the guidance-scale embedding replaces CFG."""
    import diffusers

    m = doodl(models["lcm"], 4, 8.5)
    assert m.hparams.sampler == "lcm" and m.chain.schedule.timesteps == (999, 759, 499, 259)
    x = m.latents.detach()[:, 0]
    gen = torch.Generator().manual_seed(5)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(3)]
    with torch.no_grad():
        ours = sample_lcm(m.chain.denoiser([0]), x, m.chain.schedule, noises)
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(models["lcm"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, latents=x.clone(), num_inference_steps=4, guidance_scale=8.5, height=16, width=16,
               output_type="latent", generator=torch.Generator().manual_seed(5)).images
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    # the module's own noises are fixed per (seed, step): the same chain every iteration
    assert all(torch.equal(a, b) for a, b in zip(m.chain.noises([0]), m.chain.noises([0])))


def test_sdxl_conditioning_is_both_towers_pooled_projection_and_micro_conditioning(models):
    bb = PretrainedBackbone(models["sdxl"])
    assert bb.family == "sdxl" and bb.default_size == 16 and bb.default_sampler == "edict"
    cond = bb.encode_prompts([PROMPT, "a blue square"], (16, 32))
    assert cond.hidden.shape == (2, 77, 32)  # 16 + 16: the penultimate layers of both towers
    assert cond.added["text_embeds"].shape == (2, 16)
    assert cond.added["time_ids"].tolist() == [[16, 32, 0, 0, 16, 32]] * 2
    neg = bb.encode_negative("", (16, 32))  # no negative prompt: zeros, as force_zeros_for_empty_prompt
    assert not neg.hidden.any() and not neg.added["text_embeds"].any()
    assert bb.encode_negative("blurry", (16, 32)).hidden.abs().sum() > 0
    # a float16 run keeps the force_upcast VAE in float32 (SDXL's VAE overflows in half precision)
    half = bb.to(torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32


def _family_denoiser(models, family, dtype=torch.float64):
    bb = PretrainedBackbone(models[family]).to(dtype)
    size = (16, 32) if "controlnet" in family else (16, 16)
    control = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)) if "controlnet" in family else None
    eps = bb.denoiser(bb.encode_prompts([PROMPT], size), bb.encode_negative("", size), 3.0, control_image=control)
    return bb, eps, bb.latent_shape(*size)


@pytest.mark.parametrize("family,sampler", [("sdxl-ddim", "ddim"), ("sdxl", "edict"), ("sdxl-turbo", "ddim"),
                                            ("sd-turbo", "ddim"), ("controlnet-sd", "ddim"),
                                            ("controlnet-sdxl", "edict"), ("lcm", "lcm")])
def test_checkpoint_and_reversible_equal_autograd_in_float64(models, family, sampler):
    bb, eps, shape = _family_denoiser(models, family)
    steps = 1 if "turbo" in family else 3
    schedule = Schedule.from_scheduler(bb.scheduler, steps, "model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    noises = [torch.randn_like(x) for _ in range(steps - 1)] if sampler == "lcm" else None
    w = torch.randn_like(x)

    def grad(backprop):
        z = x.clone().requires_grad_()
        finals = sample(eps, z, schedule, sampler=sampler, backprop=backprop, noises=noises)
        sum(((f * w).sum() + (f ** 2).sum()) for f in finals).backward()
        return z.grad

    ref = grad("autograd")
    modes = ["checkpoint"] + (["reversible"] if sampler == "edict" else [])
    for mode in modes:
        assert torch.allclose(grad(mode), ref, rtol=1e-9, atol=1e-12), mode


def test_sdxl_checkpoint_keeps_one_latent_per_step(models):
    bb, eps, shape = _family_denoiser(models, "sdxl-ddim", torch.float32)
    x = torch.randn((1, *shape)).requires_grad_()

    def saved(steps):
        schedule = Schedule.from_scheduler(bb.scheduler, steps, "model")
        return saved_bytes(lambda x: sample(eps, x, schedule, sampler="ddim"), x)

    latent = x.numel() * 4
    assert saved(4) - saved(2) == 2 * latent and saved(8) - saved(4) == 4 * latent


FITS = {
    "sdxl-nonsquare": ("sdxl", dict(steps=2, sampler="ddim", timestep_grid="model", height=16, width=32)),
    "sdxl-edict": ("sdxl", dict(steps=2)),
    "turbo-sd-1step": ("sd-turbo", dict(steps=1, guidance_scale=1.0)),
    "sdxl-turbo-1step": ("sdxl-turbo", dict(steps=1, guidance_scale=1.0)),
    "controlnet-sd": ("controlnet-sd", dict(steps=2, sampler="ddim", timestep_grid="model", height=16, width=32)),
    "lcm": ("lcm", dict(steps=2, guidance_scale=8.5)),
}


@pytest.mark.parametrize("case", [c if c in ("sdxl-nonsquare", "turbo-sd-1step", "controlnet-sd") else
                                  pytest.param(c, marks=pytest.mark.slow) for c in FITS])
def test_doodl_fit_through_the_cli_lowers_the_loss(models, write_config, case):
    family, keys = FITS[case]
    out = models["tmp"] / f"fit_{case}"
    if "controlnet" in case:
        keys = dict(keys, control_images=[models["control_image"]])
    keys = dict(keys)
    cfg = family_config(write_config, models["tmp"] / f"{case}.yaml", models[family], out, 4, keys.pop("steps"),
                        update_rule="adam", lr=0.1, **keys)
    cli = main(["fit", "--config", cfg])
    run = out / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert np.mean([r["final_loss"] for r in records]) < np.mean([r["initial_loss"] for r in records])
    h, w = keys.get("height", 16), keys.get("width", 16)
    assert cli.model.latent_shape == (4, h // 2, w // 2)
    with Image.open(run / records[0]["final_image"]) as im:
        assert im.size == (w, h)


@pytest.mark.parametrize("case", [c for c in FITS if c not in ("sdxl-nonsquare", "turbo-sd-1step", "controlnet-sd")])
def test_a_training_steps_evaluation_for_the_slow_fits(models, case):
    """The default-suite twin of the fits above marked slow (SDXL with EDICT, SDXL-Turbo at 1 step, LCM): the
    module's own evaluation with backward, what each training step runs, shows the image of its chain (sampler,
    schedule, the LCM's fixed noises) from the item's latents and sends a finite, nonzero gradient to them."""
    family, keys = FITS[case]
    keys = dict(keys)
    m = doodl(models[family], keys.pop("steps"), keys.pop("guidance_scale", 5.0), **keys)
    ev = m.evaluate_items(backward=True)
    grad = m.latents.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    pair = m.latents.detach()
    with torch.no_grad():
        finals = sample(m.chain.denoiser([0]), pair[:, 0], m.chain.schedule, sampler=m.hparams.sampler,
                        y=pair[:, 1] if pair.shape[1] == 2 else None, noises=m.chain.noises([0]))
        ref = m.backbone.decode(finals[0])
    assert ev.images.shape == (1, 3, 16, 16) and torch.allclose(ev.images, ref, atol=1e-5)


def test_sdxl_turbo_rank_items_are_conditioned_as_in_one_process(models):
    """The default-suite twin of the two-process SDXL-Turbo test (``test_ddp`` runs two processes on SD): a rank's
    items bound alone get exactly the rows of the one-process batch's conditioning, SDXL's added embeddings
    (pooled text, size and crop ids) included, and the same initial noise; so they start and step alike."""
    from doodl_lightning.data import shard
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.module import DOODL

    m = DOODL(model=models["sdxl-turbo"], prompts=["a red circle", "a blue square"], seeds=[0, 1, 2], steps=1,
              guidance_scale=1.0, guidance=[SymmetryGuidance()]).prepare("cpu")
    whole, noise = m.chain.cond, m.latents.detach().clone()
    assert whole.added, "SDXL's added conditioning is what this test is for"
    for rank in (0, 1):
        mine = shard(m.items, rank, 2)
        rows = [m.items.index(it) for it in mine]
        m.chain.bind(mine)
        assert torch.equal(m.chain.cond.hidden, whole.hidden[rows])
        assert all(torch.equal(m.chain.cond.added[k], v[rows]) for k, v in whole.added.items())
        assert torch.equal(m.chain.start.noise(mine, m.latent_shape)[0], noise[rows])


@pytest.mark.slow  # fast twin: test_sdxl_turbo_rank_items_are_conditioned_as_in_one_process
def test_sdxl_turbo_two_processes_equal_one_process(models, write_config):
    """DDP over seeds for a new family: every item ends exactly where a one-process run leaves it."""
    tmp = models["tmp"]
    keys = dict(guidance_scale=1.0, micro_batch=1, seeds=[0, 1, 2])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = main(["fit", "--config", family_config(write_config, tmp / "one.yaml", models["sdxl-turbo"],
                                                     tmp / "ddp_one", 2, 1, **keys)])
    finally:
        torch.set_num_threads(threads)
    ref = {it.index: one.model.latents.detach()[j] for j, it in enumerate(one.model.local_items)}
    cfg = family_config(write_config, tmp / "two.yaml", models["sdxl-turbo"], tmp / "ddp_two", 2, 1, **keys)
    r = subprocess.run([sys.executable, "cli.py", "fit", "--config", cfg, "--trainer.devices", "2",
                        "--trainer.strategy", "seed_parallel"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = {}
    for ckpt in sorted((tmp / "ddp_two/lightning_logs/version_0/checkpoints").glob("last.ckpt*")):
        c = torch.load(ckpt, weights_only=True)
        for j, item in enumerate(c["doodl_items"]):
            got[item["index"]] = c["state_dict"]["latents"][j]
    assert sorted(got) == sorted(ref) == list(range(6))
    assert all(torch.equal(got[i], ref[i]) for i in ref)


@pytest.mark.parametrize("case", ["controlnet-base-mismatch", "controlnet-image-missing", "controlnet-no-images",
                                  "sdxl-size-not-dividing", "turbo-opt-t-lcm"])
def test_bad_family_input_is_one_line_and_writes_nothing(models, write_config, capsys, case):
    tmp = models["tmp"]
    out = tmp / f"bad_{case}"
    sd_controlnet = str(Path(models["controlnet-sd"]) / "controlnet")
    keys, expected = {
        "controlnet-base-mismatch": (dict(model=models["sdxl"], controlnet=sd_controlnet,
                                          control_images=[models["control_image"]]),
                                     "error: the ControlNet does not match the base model: its cross_attention_dim is 16, "
                                     "the UNet's is 32; use a ControlNet trained for this base (SD-1.x ControlNets for "
                                     "SD-1.x, SDXL ones for SDXL)"),
        "controlnet-image-missing": (dict(model=models["controlnet-sd"], control_images=[str(tmp / "nope.png")]),
                                     f"error: control image {tmp / 'nope.png'} does not exist: give a PNG or JPEG per "
                                     "prompt in model.control_images"),
        "controlnet-no-images": (dict(model=models["controlnet-sd"]),
                                 "error: the model has a ControlNet but no control_images were given: add "
                                 "model.control_images: [path] (one for all items, or one per prompt)"),
        "sdxl-size-not-dividing": (dict(model=models["sdxl"], height=16, width=18),
                                   "error: width 18 gives 9-pixel latents, which the UNet's 1 down-samplings cannot "
                                   "halve evenly: use a multiple of 4"),
        "turbo-opt-t-lcm": (dict(model=models["lcm"], opt_t=1),
                            "error: opt_t needs a DDIM-like sampler (ddim or edict); the lcm sampler re-noises between "
                            "steps: drop opt_t or set sampler: ddim"),
    }[case]
    model = keys.pop("model")
    cfg = write_config(tmp / f"bad_{case}.yaml", model, out, **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == expected
    assert not out.exists()


def test_a_standalone_controlnet_directory_loads_with_its_base(models):
    from doodl_lightning.testing.architectures import build_unet  # noqa: F401  (import check of the builders)

    base = PretrainedBackbone(models["sd"])
    cn_dir = F.save_tiny_controlnet(models["tmp"] / "standalone_cn", base.unet)
    bb = PretrainedBackbone(models["sd"], controlnet=cn_dir)
    assert bb.controlnet is not None and bb.family == "sd"


def test_sdxl_unet_and_vae_gradient_checkpointing_leave_the_gradient_unchanged(models):
    """The memory options at 1024 px (the UNet's own checkpointing inside the chain's with-grad recomputation, the
    decoder's) recompute, they do not approximate: the same gradient in float64."""
    from doodl_lightning.objective import evaluate, weighted_guidance

    def grad(**kw):
        bb = PretrainedBackbone(models["sdxl-ddim"], **kw).double()
        eps = bb.denoiser(bb.encode_prompts([PROMPT]), bb.encode_negative(""), 3.0)
        z = torch.randn((1, *bb.latent_shape(16)), generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64).requires_grad_()
        loss = weighted_guidance([SymmetryGuidance()], [PROMPT], [torch.Generator().manual_seed(0)])
        evaluate(eps, z, Schedule.from_scheduler(bb.scheduler, 2, "model"), bb.decode, loss, sampler="ddim")
        return z.grad, bb

    ref, _ = grad()
    ckpt, bb = grad(unet_checkpointing=True, vae_checkpointing=True)
    assert bb.unet.is_gradient_checkpointing and bb.vae.decoder.gradient_checkpointing
    assert torch.allclose(ckpt, ref, rtol=1e-10, atol=1e-14)


def test_apply_memory_options_keeps_float32_unless_load_dtype_and_refuses_a_vae_without_checkpointing():
    """The transformer families' shared loading tail: weights read without ``load_dtype`` are kept in float32 (the
    module's precision casts them later), with it they stay as read; ``vae_checkpointing`` on a VAE this diffusers
    cannot checkpoint is one line naming it and the fix."""
    import torch

    from doodl_lightning.backbone import apply_memory_options

    class NoCheckpointing(torch.nn.Module):
        _supports_gradient_checkpointing = False

    def backbone():
        bb = torch.nn.Module()
        bb.transformer, bb.vae = torch.nn.Linear(2, 2).to(torch.bfloat16), NoCheckpointing()
        return bb

    bb = backbone()
    apply_memory_options(bb)
    assert bb.transformer.weight.dtype == torch.float32
    bb = backbone()
    apply_memory_options(bb, load_dtype="bfloat16")
    assert bb.transformer.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^vae_checkpointing: diffusers' NoCheckpointing has no gradient checkpointing: "
                                         r"drop vae_checkpointing \(vae_tiling lowers the decoder's memory instead\)$"):
        apply_memory_options(backbone(), vae_checkpointing=True)
