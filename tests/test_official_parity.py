"""Parity with the official DOODL, run through the LightningModule, in float64 on a tiny SD pipeline.

The reference is ``official_doodl.py``: the official equations transcribed from salesforce/DOODL.
Everything is compared to <= 1e-8 relative (the two implementations differ only in rounding).
DDIM, which the official code has no optimisation loop for, is checked against diffusers'
``DDIMScheduler.step`` instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cli import main
from doodl_lightning.baselines import guided_sampling
from doodl_lightning.data import step_generator
from doodl_lightning.sampling import Schedule, sample_ddim, sample_edict
from official_doodl import Official, OfficialScheduler, relative, mirror_loss_fn
from official_doodl import baseline_edit, guided_sample_single_variable
from doodl_lightning.testing.tiny import save_tiny_pipeline, sd_scheduler
import official_doodl as od  # the official guidance losses (section at the end)

TOL = 1e-8
CFG = 3.0
PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3]  # items: (prompt 0, seed 3), (prompt 1, seed 3) -- two items, so batching is exercised too


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    pipe = save_tiny_pipeline(tmp / "pipe", seed=1)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()  # not square: centre-cropped
    Image.fromarray(pixels).save(tmp / "source.png")
    return tmp, pipe


def config(tmp: Path, name: str, pipe: str, max_steps: int = 3, **model) -> str:
    cfg = {
        "trainer": {"max_steps": max_steps, "default_root_dir": str(tmp / name), "accelerator": "cpu", "devices": 1,
                    "precision": "64-true", "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "logger": False, "callbacks": []},
        "model": {"model": pipe, "prompts": PROMPTS, "seeds": SEEDS, "steps": 4, "guidance_scale": CFG,
                  "guidance": [{"class_path": "doodl_lightning.guidance.SymmetryGuidance"}], **model},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def prepared(tmp, name, pipe, **model):
    """A module set up as ``fit`` does (float64), without optimising."""
    cli = main(["--config", config(tmp, name, pipe, **model)], run=False)
    m = cli.model
    m.setup("fit")
    m.double()
    m.on_fit_start()
    return m


def official_for(m, item) -> Official:
    """The transcription over the module's own frozen UNet / VAE, with independently encoded prompts."""
    bb = m.backbone
    hp = m.hparams

    def encode(text):
        ids = bb.tokenizer(text, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        return bb.text_encoder(ids).last_hidden_state

    assert bb.vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        e_uc, e_c = encode(hp.negative_prompt), encode(item.prompt)
    return Official(bb.unet, bb.vae, e_uc, e_c, steps=hp.steps, guidance_scale=hp.guidance_scale,
                    mix_weight=hp.mix_weight)


def x_T(item, m) -> torch.Tensor:
    g = torch.Generator().manual_seed(item.seed)
    return torch.randn((1, *m.latent_shape), generator=g, dtype=torch.float32).double()


def perturbation_draws(item, m):
    # our RNG is per (item, step), by design; the official one is global: the draws are handed over
    return lambda k: torch.randn(m.latent_shape, generator=step_generator(item, k, stream=2), dtype=torch.float32).double()


# -- the grid -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 10, 20, 50])
def test_official_grid_is_offset_zero_and_ends_with_the_identity(steps):
    ours = Schedule.from_scheduler(sd_scheduler(), steps, "official")
    ref = OfficialScheduler(steps)
    assert list(ours.timesteps) == ref.timesteps
    k = 1000 // steps
    for i, t in enumerate(ref.timesteps):
        assert ours.alphas_cumprod[i] == pytest.approx(float(ref.alphas_cumprod[t]), rel=1e-14)
        prev = float(ref.alphas_cumprod[t - k]) if t - k >= 0 else float(ref.final_alpha_cumprod)
        assert ours.alphas_cumprod_prev[i] == pytest.approx(prev, rel=1e-14)
    assert ours.ddim_coefficients(steps - 1) == (1.0, 0.0)  # t = 0 -> abar_0: the identity
    model = Schedule.from_scheduler(sd_scheduler(), steps, "model")
    assert model.timesteps[-1] == 1 and model.timesteps[0] == ref.timesteps[0] + 1  # SD's steps_offset 1


def test_official_grid_refuses_steps_not_dividing_1000():
    with pytest.raises(ValueError, match="steps dividing 1000"):
        Schedule.from_scheduler(sd_scheduler(), 30, "official")


# -- sampling ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 20])
def test_edict_sampling_matches_official(world, steps):
    tmp, pipe = world
    m = prepared(tmp, f"edict{steps}", pipe, steps=steps)
    with torch.no_grad():
        ev = m.evaluate_items(backward=False)
        for j, item in enumerate(m.local_items):
            off = official_for(m, item)
            z = x_T(item, m)
            ref_pair = off.run(torch.cat([z, z]), off.scheduler.timesteps)
            x, y = sample_edict(m.chain.denoiser([j]), m.latents[j:j + 1, 0], m.latents[j:j + 1, 1], m.chain.schedule, 0.93)
            assert relative(torch.cat([x, y]), ref_pair) < TOL
            assert relative(ev.images[j:j + 1], off.decode(ref_pair[:1])) < TOL


@pytest.mark.parametrize("grid", ["official", "model"])
def test_ddim_sampling_matches_diffusers_scheduler_step(world, grid):
    from diffusers import DDIMScheduler

    tmp, pipe = world
    m = prepared(tmp, f"ddim_{grid}", pipe, sampler="ddim", steps=10, timestep_grid=grid)
    # official grid = diffusers' DDIM with offset 0 and set_alpha_to_one off; model grid = its own config
    sched = DDIMScheduler.from_config(m.backbone.scheduler.config, **({"steps_offset": 0} if grid == "official" else {}))
    sched.set_timesteps(10)
    assert [int(t) for t in sched.timesteps] == list(m.chain.schedule.timesteps)
    # diffusers keeps abar in float32 (2e-8 off); the official numpy scheduler, and we, in float64
    sched.alphas_cumprod = OfficialScheduler(10).alphas_cumprod
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    with torch.no_grad():
        ev = m.evaluate_items(backward=False)
        eps = m.chain.denoiser([0, 1])
        ref = m.latents[:, 0].clone()
        for t in sched.timesteps:
            ref = sched.step(eps(ref, int(t)), t, ref).prev_sample
        ours = sample_ddim(eps, m.latents[:, 0], m.chain.schedule)
    assert relative(ours, ref) < TOL
    assert relative(ev.images, m.backbone.decode(ref)) < TOL


def test_edict_inversion_for_editing_matches_official(world):
    tmp, pipe = world
    m = prepared(tmp, "invert", pipe, steps=10, source_image=str(tmp / "source.png"))
    # the official preparation: centre crop, PIL's default resize filter, [-1, 1]; posterior sample
    im = Image.open(tmp / "source.png")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)).resize((16, 16))
    x = torch.tensor(np.asarray(im), dtype=torch.float64).permute(2, 0, 1)[None] / 255.0 * 2.0 - 1.0
    assert m.chain.start.renormalize is False
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        with torch.no_grad():
            post = m.backbone.vae.encode(x).latent_dist
            noise = torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(item.seed)).double()
            init_latent = (post.mean + post.std * noise) * 0.18215
            ref = off.invert(init_latent)
        assert relative(m.latents[j].detach(), ref) < TOL
    assert m.chain.start.round_trip_error < 1e-9


# -- the DOODL update, through Trainer.fit ------------------------------------------------------------

UPDATES = {
    "tied": dict(),
    "tied_nesterov": dict(use_nesterov=True),
    "untied": dict(tied_latents=False),
    "untied_nesterov": dict(tied_latents=False, use_nesterov=True),
    "no_momentum": dict(use_momentum=False),
    "first_image_only": dict(optimize_first_edict_image_only=True),
    "no_clip_no_renormalize": dict(clip_grad_val=None, renormalize_latents=False, grad_scale=2.0),
    "opt_t": dict(opt_t=2),
    "opt_t_untied": dict(opt_t=3, tied_latents=False),
}


# the spine (tied, untied, first image only) in the default suite; the other update variants with -m slow
FAST_UPDATES = ("tied", "untied", "first_image_only")


@pytest.mark.parametrize("name", [n if n in FAST_UPDATES else pytest.param(n, marks=pytest.mark.slow) for n in UPDATES])
def test_three_doodl_updates_match_official(world, name):
    tmp, pipe = world
    kw = dict(grad_scale=4.0, clip_grad_val=2e-3, perturb_grad_scale=1e-3)
    kw.update(UPDATES[name])
    cli = main(["fit", "--config", config(tmp, f"upd_{name}", pipe, **kw)])
    m = cli.model
    assert m.latents.dtype == torch.float64 and cli.trainer.global_step == 3
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        official_kw = {k: v for k, v in kw.items() if k != "grad_scale"}
        ref = off.doodl(mirror_loss_fn(kw["grad_scale"]), x_T(item, m), 3, perturbation_draws(item, m),
                        **official_kw)
        assert relative(m.latents[j].detach(), ref) < TOL, name
        assert relative(m.latents[j].detach(), x_T(item, m).expand(2, -1, -1, -1)) > 1e-4  # it did move


def test_clipping_is_active_in_the_update_tests(world):
    """The settings above clip some elements and not others, so scale-then-clip vs clip-then-scale differ."""
    tmp, pipe = world
    m = prepared(tmp, "clipcheck", pipe)
    m.latents.grad = None
    m.evaluate_items(backward=True)
    g = (-0.5 * 4.0 * m.latents.grad).mean(dim=1)
    frac = float((g.abs() > 2e-3).double().mean())
    assert 0.05 < frac < 0.95, frac


def test_editing_doodl_updates_match_official(world):
    """The notebook's editing run: untied latents, no renormalisation, from the inverted pair."""
    tmp, pipe = world
    kw = dict(grad_scale=4.0, clip_grad_val=2e-3, perturb_grad_scale=1e-3, tied_latents=False)
    cli = main(["fit", "--config", config(tmp, "edit_upd", pipe, source_image=str(tmp / "source.png"), **kw)])
    m = cli.model
    start = prepared(tmp, "edit_start", pipe, source_image=str(tmp / "source.png"), **kw)
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        ref = off.doodl(mirror_loss_fn(4.0), None, 3, perturbation_draws(item, m), renormalize_latents=False,
                        latent_pair=start.latents[j].detach().clone(),
                        **{k: v for k, v in kw.items() if k != "grad_scale"})
        assert relative(m.latents[j].detach(), ref) < TOL


# -- latent_traversal=False: the official guided-sampling baselines -----------------------------------

@pytest.mark.parametrize("one_step_baseline", [True, False])
def test_guided_sampling_baselines_match_official(world, one_step_baseline):
    tmp, pipe = world
    m = prepared(tmp, f"guided{one_step_baseline}", pipe, steps=4 if one_step_baseline else 2)
    ev = guided_sampling(m, grad_scale=30.0, estimate="one_step" if one_step_baseline else "chain")
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        ref = off.guided_sample(mirror_loss_fn(30.0), x_T(item, m), one_step_baseline)
        plain = off.guided_sample(mirror_loss_fn(0.0), x_T(item, m), one_step_baseline)
        assert relative(ev.images[j:j + 1], ref) < TOL
        assert relative(ref, plain) > 1e-6  # the guidance did something


# -- the baselines on DDIM (single_variable), and the combinations they refuse -----------------

@pytest.mark.parametrize("one_step_baseline", [True, False])
def test_guided_sampling_on_ddim_matches_official_single_variable(world, one_step_baseline):
    """``sampler: ddim`` is the official ``single_variable=True``: DDIM sampling, but the chain estimate still
    differentiates through EDICT from (x_t, x_t), both images scored (not through the DDIM chain)."""
    tmp, pipe = world
    m = prepared(tmp, f"guided_ddim{one_step_baseline}", pipe, sampler="ddim", steps=4 if one_step_baseline else 2)
    ev = guided_sampling(m, grad_scale=30.0, estimate="one_step" if one_step_baseline else "chain")
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        ref = guided_sample_single_variable(off, mirror_loss_fn(30.0), x_T(item, m), one_step_baseline)
        plain = guided_sample_single_variable(off, mirror_loss_fn(0.0), x_T(item, m), one_step_baseline)
        assert relative(ev.images[j:j + 1], ref) < TOL
        assert relative(ref, plain) > 1e-6  # the guidance did something


def test_guided_sampling_refuses_opt_t_and_source_image(world):
    """The official baseline ignores opt_t without a source image, and its editing branch does not invert
    its own sampler (no mixing inverse): both are refused, and the latter is shown here on the transcription."""
    tmp, pipe = world
    m = prepared(tmp, "guided_opt_t", pipe, opt_t=2)
    with pytest.raises(ValueError, match="opt_t"):
        guided_sampling(m, grad_scale=1.0)
    m = prepared(tmp, "guided_edit", pipe, source_image=str(tmp / "source.png"))
    with pytest.raises(ValueError, match="source_image"):
        guided_sampling(m, grad_scale=1.0)
    off = official_for(m, m.local_items[0])
    z0 = m.backbone.encode_images(torch.zeros(1, 3, *m.image_size, dtype=torch.float64))  # a grey image's latent
    source = off.decode(z0)
    with torch.no_grad():  # EDICT's own inverse (mixing inverse included) gives the source back, unguided
        exact = off.decode(off.run(off.invert(z0), off.scheduler.timesteps)[:1])
    assert relative(exact, source) < TOL
    for opt_t in (None, 1):  # the official baseline's branch does not, with or without its opt_t
        assert relative(baseline_edit(off, z0, opt_t), source) > 1e-2, opt_t


def test_official_result_image_is_one_update_behind_our_final(world):
    """The official loop decodes and saves x's image BEFORE each update (doodl.py l. 911-926), so its last
    saved image is the latents after max_steps - 1 updates: our last step's evaluation (``module.last``, the
    ImageLogger's step max_steps - 1). Our final evaluation is the latents after all max_steps updates."""
    tmp, pipe = world
    kw = dict(grad_scale=4.0, clip_grad_val=2e-3, perturb_grad_scale=1e-3)
    m = main(["fit", "--config", config(tmp, "result_image", pipe, max_steps=2, **kw)]).model
    last, final = m.last.images, m.final_evaluation().images
    official_kw = {k: v for k, v in kw.items() if k != "grad_scale"}
    for j, item in enumerate(m.local_items):
        off = official_for(m, item)
        pairs = [off.doodl(mirror_loss_fn(4.0), x_T(item, m), n, perturbation_draws(item, m), **official_kw)
                 for n in (1, 2)]  # the pair (x_T, y_T) after 1 and after 2 updates
        with torch.no_grad():
            saved, after = (off.decode(off.run(p, off.scheduler.timesteps)[:1]) for p in pairs)
        assert relative(last[j:j + 1], saved) < TOL
        assert relative(final[j:j + 1], after) < TOL
        assert relative(saved, after) > 1e-6  # one update apart: the two are different images


# -- guidance losses (doodl.py's clip / aesthetic / fgvc loss functions), float64 --------------------------------

GUIDE_SEEDS = [5, 6]  # the two items' cutout generators


class ReplayRNG:
    """MakeCutouts' global-RNG calls answered from our per-item cutout stream (3 uniforms per cut: size, x, y),
    as the perturbation draws are handed over above: the same crops, so only the loss code is compared."""

    def __init__(self, seed: int, num_cuts: int):
        u = torch.rand(num_cuts, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.draws = iter(u.flatten().tolist())

    def rand(self) -> float:
        return next(self.draws)

    def randint(self, lo: int, hi: int) -> int:
        return lo + int(next(self.draws) * (hi - lo))


def guide_images() -> torch.Tensor:
    """Two non-square images, partly outside [-1, 1] (as VAE decodes are), so the official clamp matters."""
    g = torch.Generator().manual_seed(11)
    return (torch.rand(2, 3, 48, 40, generator=g, dtype=torch.float64) * 2.8 - 1.4).requires_grad_(True)


def ours_vs_official(guide, official_fn, num_cuts: int, prompts=None):
    """(our per-item losses, their gradient, the official losses, their gradient): item i's official loss is
    ``official_fn(i, rng)(image i)``, the official batch of one."""
    x = guide_images()
    gens = [torch.Generator().manual_seed(s) for s in GUIDE_SEEDS]
    ours = guide(x, prompts=prompts, generators=gens)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.stack([official_fn(i, ReplayRNG(s, num_cuts))(x_ref[i:i + 1]) for i, s in enumerate(GUIDE_SEEDS)])
    (g_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    assert ours.dtype == torch.float64
    return ours.detach(), g_ours, ref.detach(), g_ref


@pytest.fixture(scope="module")
def clip_kw(tiny_clip):
    return dict(pretrained=str(tiny_clip.weights), model_config=str(tiny_clip.config))


def _encoder_args(guide):
    enc = guide.encoder
    return dict(target_size=enc.input_size, mean=enc.mean, std=enc.std)


@pytest.mark.parametrize("num_cuts", [16, 3])
def test_clip_text_loss_matches_official(clip_kw, num_cuts):
    from doodl_lightning.guidance import CLIPTextGuidance

    prompts = ["a red circle", "a blue square"]
    guide = CLIPTextGuidance(num_cuts=num_cuts, **clip_kw)
    guide(guide_images().float(), prompts)  # a float32 call first (as a sanity check before a 64-true run would)
    guide.double()  # the text embeddings are then re-embedded in float64, not the float32 ones reused
    assert guide.cutout_reduction == "min" and guide.encoder.cutouts.resample == "pool"  # the defaults are official
    with torch.no_grad():
        targets = [od.clip_text_target(guide.model.encode_text, guide.tokenizer([p])) for p in prompts]

    def official(i, rng):
        return od.clip_loss_fn(guide.model.encode_image, targets[i], num_cuts=num_cuts, cut_power=0.3, rng=rng,
                               **_encoder_args(guide))

    ours, g_ours, ref, g_ref = ours_vs_official(guide, official, num_cuts, prompts)
    assert relative(ours, ref) < TOL and relative(g_ours, g_ref) < TOL
    # the test can tell: our earlier mean over cutouts, and bilinear cutouts, are other losses
    for kw in (dict(cutout_reduction="mean"), dict(resample="bilinear")):
        other = CLIPTextGuidance(num_cuts=num_cuts, **kw, **clip_kw).double()
        assert relative(ours_vs_official(other, official, num_cuts, prompts)[0], ref) > 1e-4, kw


def test_clip_image_loss_and_target_match_official(clip_kw, tmp_path):
    """Visual personalisation: the official reference transform (a 71x61 and a 20x50 image; a grayscale one
    skipped) and the official loss."""
    from doodl_lightning.guidance import CLIPImageGuidance

    g = torch.Generator().manual_seed(2)
    for name, (h, w) in {"a.png": (71, 61), "b.png": (20, 50)}.items():
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / name)
    Image.fromarray((torch.rand(30, 30, generator=g) * 255).to(torch.uint8).numpy(), "L").save(tmp_path / "gray.png")
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "gray.png")]
    with pytest.warns(UserWarning, match="skipping grayscale"):
        guide = CLIPImageGuidance(references=paths, num_cuts=16, **clip_kw).double()
    with torch.no_grad():
        target = od.clip_image_target(guide.encoder.visual, paths, **_encoder_args(guide))

    def official(i, rng):
        return od.clip_loss_fn(guide.encoder.visual, target, num_cuts=16, cut_power=0.3, rng=rng,
                               **_encoder_args(guide))

    ours, g_ours, ref, g_ref = ours_vs_official(guide, official, 16)
    assert guide.targets.dtype == torch.float64 and relative(guide.target, target[0]) < TOL  # re-embedded in float64
    assert relative(ours, ref) < TOL and relative(g_ours, g_ref) < TOL
    # the test can tell: open_clip's PIL preprocessing (our earlier reference transform) gives another target
    with torch.no_grad():
        pil = torch.stack([guide.preprocess(Image.open(p).convert("RGB")) for p in paths[:2]]).double()
        earlier = torch.nn.functional.normalize(
            torch.nn.functional.normalize(guide.encoder.visual(pil), dim=-1).mean(0), dim=-1)
    assert relative(earlier, target[0]) > 1e-4


@pytest.mark.parametrize("aesthetic_target", [None, 6.5])
def test_aesthetic_loss_matches_official(clip_kw, tmp_path, aesthetic_target):
    """The [1, 10] clip of each cutout's score is active: the head puts 10 amid the cutouts' scores."""
    from doodl_lightning.guidance import AestheticGuidance

    dim = json_embed_dim(clip_kw)
    w = torch.linspace(-3, 3, dim)[None]
    torch.save({"weight": w, "bias": torch.tensor([0.0])}, tmp_path / "probe.pth")
    probe = AestheticGuidance(head=str(tmp_path / "probe.pth"), num_cuts=16, **clip_kw).double()
    with torch.no_grad():
        raw = probe.cutout_scores(guide_images(), [torch.Generator().manual_seed(s) for s in GUIDE_SEEDS])
    torch.save({"weight": w, "bias": torch.tensor([10.0 - float(raw.median())])}, tmp_path / "head.pth")
    guide = AestheticGuidance(head=str(tmp_path / "head.pth"), target=aesthetic_target, num_cuts=16,
                              **clip_kw).double()
    scores = guide.cutout_scores(guide_images(), [torch.Generator().manual_seed(s) for s in GUIDE_SEEDS])
    assert bool((scores > 10).any()) and bool((scores < 10).any())

    def official(i, rng):
        return od.aesthetic_loss_fn(guide.encoder.visual, guide.head, aesthetic_target=aesthetic_target,
                                    num_cuts=16, cut_power=0.3, rng=rng, **_encoder_args(guide))

    ours, g_ours, ref, g_ref = ours_vs_official(guide, official, 16)
    assert relative(ours, ref) < TOL and relative(g_ours, g_ref) < TOL
    unclipped = AestheticGuidance(head=str(tmp_path / "head.pth"), target=aesthetic_target, num_cuts=16,
                                  score_clip=None, **clip_kw).double()
    assert relative(ours_vs_official(unclipped, official, 16)[1], g_ref) > 1e-3  # the test can tell


def json_embed_dim(clip_kw) -> int:
    import json

    return json.loads(Path(clip_kw["model_config"]).read_text())["embed_dim"]


class _WSDANLike(torch.nn.Module):
    """A tiny classifier with WS-DAN's output convention: (attention maps, feature matrix, logits)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, classes)

    def forward(self, x):
        maps = torch.tanh(self.conv(x))
        features = maps.mean((-2, -1))
        return maps, features, self.fc(features)


def test_classifier_loss_matches_official_wsdan_output(tmp_path):
    import warnings
    from doodl_lightning.guidance import ClassifierGuidance

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_WSDANLike().eval(), torch.rand(1, 3, 24, 24)).save(str(tmp_path / "wsdan.ts"))
    kw = dict(arch="torchscript", checkpoint=str(tmp_path / "wsdan.ts"), input_size=24)
    guide = ClassifierGuidance(target={"a": 3, "b": 1}, output=2, **kw).double()
    assert guide.cutouts.num_cuts == 16 and guide.cutouts.cut_power == 0.3  # gen()'s defaults
    classes = {0: 3, 1: 1}

    def official(i, rng):
        return od.fgvc_loss_fn(guide.model, class_idx=classes[i], num_cuts=16, cut_power=0.3, target_size=24, rng=rng)

    ours, g_ours, ref, g_ref = ours_vs_official(guide, official, 16, prompts=["a", "b"])
    assert relative(ours, ref) < TOL and relative(g_ours, g_ref) < TOL
    with pytest.raises(ValueError, match="returns 3 outputs.*set output.*output: 2"):
        ClassifierGuidance(target=3, **kw)(guide_images().float().detach())
