"""The flow pipelines' guidance options and the flow one-step baseline: FLUX.1's true CFG (FluxPipeline's
``true_cfg_scale`` + ``negative_prompt``), SD3's skip-layer guidance (StableDiffusion3Pipeline's
``skip_guidance_layers`` and window) and the one-step x0_hat = x - sigma v guidance of ``baselines.guided_sampling``.

The options are checked against the diffusers pipelines themselves from the same noise (tiny random models saved in
the released layout and loaded back, ``doodl_lightning.testing.flow_models``); the baseline against a hand-written
loop over the raw transformer with ``torch.autograd.grad`` on x0_hat.
"""
from __future__ import annotations

import functools

import pytest
import torch

from doodl_lightning.baselines import guided_sampling
from doodl_lightning.families import PretrainedFlowBackbone
from doodl_lightning.families.flow import FlowBackbone
from doodl_lightning.families.flux_layout import pack_latents, unpack_latents
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import relative_error, sample, sample_flow
from doodl_lightning.testing import families as F
from doodl_lightning.testing.flow_models import sd3_velocity

PROMPT, NEGATIVE = "a red circle", "blurry"
TOKENS = 16  # T5 tokens: short sequences keep the tiny transformers' attention small


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"  # built once per session (test_families too)
    return {name: F.tiny_model(name, shared) for name in ("sd3", "flux-dev")}


@functools.lru_cache(maxsize=None)
def _pipeline(path):
    """The diffusers pipeline of a saved tiny model (the reference), loaded once."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def doodl(bb, steps, guidance_scale, **kw) -> DOODL:
    m = DOODL(model=bb, prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=guidance_scale, height=16, width=16,
              guidance=[SymmetryGuidance()], **kw)
    return m.prepare()


def _final(m: DOODL) -> torch.Tensor:
    with torch.no_grad():
        return sample_flow(m.chain.denoiser([0]), m.latents.detach()[:, 0], m.chain.schedule)


def _close(ours, ref) -> bool:
    return bool((ours - ref).abs().max() <= 1e-5 * ref.abs().max())


def test_flux_true_cfg_equals_flux_pipeline(flow_models):
    """``true_cfg_scale`` > 1: our unguided chain (cond and negative rows batched in one call) ends where
    FluxPipeline(true_cfg_scale=..., negative_prompt=...) ends from the same noise; the scale and the negative prompt
    both change the chain far beyond the tolerance (the option is really in it)."""
    path = flow_models["flux-dev"]
    bb = PretrainedFlowBackbone(path, max_sequence_length=TOKENS, true_cfg_scale=4.0)
    m = doodl(bb, 3, 3.5, negative_prompt=NEGATIVE)
    assert bb.rows_per_evaluation(3.5) == 2
    x = m.latents.detach()[:, 0]
    ours = _final(m)

    def ref(negative, scale):
        out = _pipeline(path)(PROMPT, negative_prompt=negative, true_cfg_scale=scale, latents=pack_latents(x),
                              num_inference_steps=3, guidance_scale=3.5, height=16, width=16, output_type="latent",
                              max_sequence_length=TOKENS).images
        return unpack_latents(out, 8, 8)

    expected = ref(NEGATIVE, 4.0)
    assert ours.shape == expected.shape and _close(ours, expected), (ours - expected).abs().max()
    tol = 1e-5 * expected.abs().max()
    assert (ref(NEGATIVE, 1.0) - expected).abs().max() > 100 * tol  # off (the default): another chain
    assert (ref("a blue square", 4.0) - expected).abs().max() > 100 * tol  # the negative prompt is used
    off = doodl(PretrainedFlowBackbone(path, max_sequence_length=TOKENS), 3, 3.5, negative_prompt=NEGATIVE)
    assert _close(_final(off), ref(NEGATIVE, 1.0))  # and at 1 ours is the plain chain again


def test_sd3_skip_layer_guidance_equals_sd3_pipeline(flow_models):
    """Skip-layer guidance: our chain == StableDiffusion3Pipeline(skip_guidance_layers=..., _scale, _start, _stop)
    from the same noise, with a window (n * start < i < n * stop, strict) that leaves steps out: on its edges here,
    4 * 0.25 = 1 and 4 * 0.75 = 3, so step 2 of 0..3 alone."""
    path = flow_models["sd3"]
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.25,
               skip_layer_guidance_stop=0.75)
    bb = PretrainedFlowBackbone(path, max_sequence_length=TOKENS, **slg)
    m = doodl(bb, 4, 4.0, negative_prompt=NEGATIVE)
    steps = m.chain.full_schedule.timesteps
    assert bb.skip_layer_guidance.window(m.chain.full_schedule) == {steps[2]}
    x = m.latents.detach()[:, 0]
    ours = _final(m)

    def ref(**keys):
        return _pipeline(path)(PROMPT, negative_prompt=NEGATIVE, latents=x.clone(), num_inference_steps=4,
                               guidance_scale=4.0, height=16, width=16, output_type="latent",
                               max_sequence_length=TOKENS, **keys).images

    expected = ref(**slg)
    assert ours.shape == expected.shape and _close(ours, expected), (ours - expected).abs().max()
    tol = 1e-5 * expected.abs().max()
    assert (ref() - expected).abs().max() > 100 * tol  # without SLG: another chain
    wider = dict(slg, skip_layer_guidance_start=0.2)  # steps 1 and 2: the window matters
    assert (ref(**wider) - expected).abs().max() > 100 * tol


def test_flux_sd3_guidance_options_checkpoint_gradient_equals_autograd(flow_models):
    """Through the true-CFG and skip-layer velocities, the checkpointed chain's gradient (each step recomputed with
    grad in backward, the skip-layer window read again at the recomputation) equals plain autograd's in float64."""
    cases = [(flow_models["flux-dev"], dict(true_cfg_scale=3.0), 3.5),
             (flow_models["sd3"], dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                                       skip_layer_guidance_stop=1.0), 3.0)]
    for path, keys, scale in cases:
        bb = PretrainedFlowBackbone(path, max_sequence_length=8, **keys).to(torch.float64)
        v = bb.denoiser(bb.encode_prompts([PROMPT]), bb.encode_negative(NEGATIVE), scale)
        schedule = bb.schedule(2, size=(16, 16))
        x = torch.randn((1, *bb.latent_shape(16)), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        w = torch.randn_like(x)

        def grad(backprop):
            z = x.clone().requires_grad_()
            (x0,) = sample(v, z, schedule, sampler="flow", backprop=backprop)
            ((x0 * w).sum() + x0.square().sum()).backward()
            return z.grad

        assert torch.allclose(grad("checkpoint"), grad("autograd"), rtol=1e-12, atol=1e-14)


def test_flow_one_step_baseline_equals_a_hand_written_loop(flow_models):
    """``guided_sampling(estimate="one_step")`` on SD3: at each Euler step x0_hat = x - sigma v_u(x) from the
    negative prompt's velocity, g = d(grad_scale * loss(decode(x0_hat)))/dx by torch.autograd.grad, and the step
    takes v_cfg + sigma g -- written here over the raw transformer with the pipeline's own prompt encoding."""
    path = flow_models["sd3"]
    m = doodl(PretrainedFlowBackbone(path, max_sequence_length=TOKENS), 3, 4.0, negative_prompt=NEGATIVE)
    ev = guided_sampling(m, grad_scale=50.0)
    pipe = _pipeline(path)
    with torch.no_grad():
        cond, neg, pooled, pooled_neg = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt=NEGATIVE,
                                                           max_sequence_length=TOKENS)
    v_cond = sd3_velocity(pipe.transformer, cond, pooled)
    v_neg = sd3_velocity(pipe.transformer, neg, pooled_neg)
    loss = m.loss_fn([0], 0)  # symmetry: no cutouts, the same function at every call
    schedule = m.chain.schedule
    x = m.latents.detach()[:, 0]
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        xr = x.detach().requires_grad_()
        x0_hat = xr - sigma * v_neg(xr, t)
        (g,) = torch.autograd.grad(50.0 * loss(pipe.vae.decode(x0_hat / pipe.vae.config.scaling_factor
                                                                + pipe.vae.config.shift_factor).sample)[0].sum(), xr)
        with torch.no_grad():
            vu, vc = v_neg(x, t), v_cond(x, t)
            x = x + (sigma_next - sigma) * (vu + 4.0 * (vc - vu) + sigma * g)
    assert g.abs().max() > 0
    images = m.backbone.decode(x)
    assert relative_error(ev.images, images) < 1e-5, relative_error(ev.images, images)


def test_flow_one_step_baseline_lowers_the_guide_loss(flow_models):
    """On the tiny FLUX.1-dev and SD3 models (Euler, and the coupled flow_edict chain) the guided chain's images
    score better than the unguided chain's (grad scale 0, which is exactly the plain chain: the same images as
    sampling without the baseline), nothing is optimised, and the DDIM-only estimate is refused in one line."""
    for path, scale, sampler in ((flow_models["flux-dev"], 3.5, "flow"), (flow_models["sd3"], 4.0, "flow"),
                                 (flow_models["sd3"], 4.0, "flow_edict")):
        m = doodl(PretrainedFlowBackbone(path, max_sequence_length=TOKENS), 3, scale, sampler=sampler)
        before = m.latents.detach().clone()
        plain, guided = guided_sampling(m, grad_scale=0.0), guided_sampling(m, grad_scale=200.0)
        assert torch.equal(plain.images, m.backbone.decode(m.chain.sample(m.latents.detach(), [0])))
        assert (guided.total < plain.total).all(), (guided.total, plain.total)
        assert torch.equal(m.latents, before)
        with pytest.raises(ValueError, match="use estimate one_step") as e:
            guided_sampling(m, grad_scale=1.0, estimate="chain")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("family,keys,match", [
    ("sd3", dict(true_cfg_scale=2.0), "true_cfg_scale is FluxPipeline's"),
    ("flux-dev", dict(true_cfg_scale=0.5), "true_cfg_scale must be >= 1"),
    ("flux-dev", dict(skip_guidance_layers=[0]), "skip_guidance_layers is StableDiffusion3Pipeline's"),
    ("sd3", dict(skip_guidance_layers=[1, 2]), r"skip_guidance_layers \[2\] out of range: .* 0 to 1"),
    ("sd3", dict(skip_guidance_layers=[]), "distinct block indices"),
    ("sd3", dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2), "start < "),
])
def test_flux_sd3_bad_guidance_options_are_one_line(flow_models, family, keys, match):
    """A guidance option the family has no such thing for, or out of range: one line naming the fix."""
    pipe = _pipeline(flow_models[family])
    with pytest.raises(ValueError, match=match) as e:
        FlowBackbone(pipe.transformer, pipe.vae, pipe.scheduler, **keys)
    assert "\n" not in str(e.value)
