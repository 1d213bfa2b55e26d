"""Flow-matching (SD3 / FLUX) chains: grids equal to diffusers', Euler equal to the scheduler and the pipelines,
checkpointed and reversible gradients equal to autograd's, FLUX latent packing, tiny transformers."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from doodl_lightning.families.flux_layout import FluxVelocity, latent_image_ids, pack_latents, text_ids, unpack_latents
from doodl_lightning.sampling import relative_error
from doodl_lightning.sampling import (
    FlowSchedule, flow_edict_invert, flow_edict_step, flow_edict_step_inverse, flow_euler_step, flow_shift_mu,
    flux_sigmas, sample_flow, sample_flow_differentiable, sample_flow_edict, sample_flow_edict_differentiable,
)
from doodl_lightning.testing.flow_models import (
    build_flow_scheduler, flow_scheduler_config, flow_transformer_config, flow_vae_config, sd3_velocity,
    tiny_flux_transformer, tiny_sd3_transformer,
)
from doodl_lightning.testing.memory import saved_bytes

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


def _diffusers_flux():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    return calculate_shift, retrieve_timesteps


def sd3_scheduler():
    return build_flow_scheduler("sd35-medium")  # static shift 3.0


def flux_dev_scheduler():
    return build_flow_scheduler("flux-dev")  # dynamic shifting, mu from the image sequence length


def assert_same_grid(schedule: FlowSchedule, sigmas: torch.Tensor, timesteps: torch.Tensor):
    # the scheduler's own float32 numbers, bit for bit
    assert torch.equal(torch.tensor(schedule.sigmas, dtype=torch.float32), sigmas)
    assert torch.equal(torch.tensor(schedule.timesteps, dtype=torch.float32), timesteps)
    assert len(schedule.sigmas) == len(schedule) + 1 and schedule.sigmas[-1] == 0.0


# -- grids -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_schedule_equals_diffusers_set_timesteps(steps):
    """StableDiffusion3Pipeline: retrieve_timesteps(scheduler, steps) (no sigmas, no mu) on shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, retrieve_timesteps = _diffusers_flux()
    scheduler = sd3_scheduler()
    schedule = FlowSchedule.from_scheduler(scheduler, steps)
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    timesteps, n = retrieve_timesteps(ref, steps)
    assert n == steps == len(schedule)
    assert_same_grid(schedule, ref.sigmas, timesteps)
    assert scheduler.timesteps.numel() == 1000  # the caller's scheduler is left as it was
    # the grid in closed form (float64): the shifted sigma = shift s / (1 + (shift - 1) s) of the linear grid
    # between the (already shifted) sigma_max = 1 and sigma_min, as diffusers builds it
    s_min = 3.0 * 1e-3 / (1 + 2.0 * 1e-3)
    lin = np.linspace(1.0, s_min, steps)
    expected = 3.0 * lin / (1 + 2.0 * lin)
    assert np.allclose(schedule.sigmas[:-1], expected, rtol=0, atol=1e-6)
    assert np.allclose(schedule.timesteps, 1000 * np.asarray(schedule.sigmas[:-1]), rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_flux_schedule_equals_diffusers_set_timesteps(steps, image_seq_len):
    """FluxPipeline: sigmas linspace(1, 1/steps, steps), mu = calculate_shift(image_seq_len, config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    calculate_shift, retrieve_timesteps = _diffusers_flux()
    scheduler = flux_dev_scheduler()
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert flow_shift_mu(image_seq_len, cfg) == mu
    schedule = FlowSchedule.flux(scheduler, steps, image_seq_len)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    timesteps, _ = retrieve_timesteps(ref, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert_same_grid(schedule, ref.sigmas, timesteps)
    # the same through from_scheduler with FLUX's sigmas
    assert FlowSchedule.from_scheduler(scheduler, steps, image_seq_len, sigmas=flux_sigmas(steps)) == schedule
    # exponential time shift: sigma = e^mu / (e^mu + 1/s - 1)
    s = np.linspace(1.0, 1 / steps, steps)
    assert np.allclose(schedule.sigmas[:-1], np.exp(mu) / (np.exp(mu) + 1 / s - 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_schnell_schedule_is_unshifted(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, retrieve_timesteps = _diffusers_flux()
    scheduler = build_flow_scheduler("flux-schnell")
    schedule = FlowSchedule.flux(scheduler, steps, 4096)  # schnell ignores the resolution
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    timesteps, _ = retrieve_timesteps(ref, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=1.15)
    assert_same_grid(schedule, ref.sigmas, timesteps)
    assert np.allclose(schedule.sigmas[:-1], np.linspace(1.0, 1 / steps, steps), atol=1e-7)


def test_flux_schedule_needs_the_resolution_and_flow_schedule_tail_head():
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowSchedule.flux(flux_dev_scheduler(), 4)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            FlowSchedule.from_scheduler(sd3_scheduler(), steps)
    with pytest.raises(ValueError, match="sigmas"):
        FlowSchedule((1.0, 0.0), (1000.0, 500.0))
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), 5)
    head, tail = schedule.head(2), schedule.tail(2)
    assert len(head) == 2 and len(tail) == 3
    assert head.sigmas == schedule.sigmas[:3] and tail.sigmas == schedule.sigmas[2:]
    assert head.timesteps + tail.timesteps == schedule.timesteps
    v = smooth_velocity(torch.float64)
    x = latents(torch.float64)
    assert torch.equal(sample_flow(v, sample_flow(v, x, head), tail), sample_flow(v, x, schedule))
    for bad in (lambda: schedule.tail(5), lambda: schedule.head(0), lambda: schedule.head(6)):
        with pytest.raises(ValueError):
            bad()


# -- Euler equals diffusers --------------------------------------------------------------------------

def latents(dtype, n=2, c=4, size=8, seed=1):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def smooth_velocity(dtype, c=4, seed=0):
    """v(x, t) = tanh(W x) (1 + sigma) - sigma b: nonlinear in x, depends on t."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g, dtype=dtype) / c**0.5
    b = torch.randn(1, c, 1, 1, generator=g, dtype=dtype)

    def v(x, t):
        s = t / 1000
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + s) - s * b

    return v


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_flux_flow_euler_equals_scheduler_step(family, steps):
    """sample_flow == FlowMatchEulerDiscreteScheduler.step by hand with the same velocity (float32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, retrieve_timesteps = _diffusers_flux()
    dtype = torch.float32
    v = smooth_velocity(dtype)
    x = latents(dtype)
    if family == "sd3":
        scheduler = sd3_scheduler()
        schedule, kw = FlowSchedule.from_scheduler(scheduler, steps), {}
    else:
        scheduler = flux_dev_scheduler()
        schedule = FlowSchedule.flux(scheduler, steps, 1024)
        kw = dict(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flow_shift_mu(1024, scheduler.config))
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    timesteps, _ = retrieve_timesteps(ref, steps, **kw)
    ref.set_begin_index(0)
    y = x
    for t in timesteps:
        y = ref.step(v(y, float(t)), t, y, return_dict=False)[0]
    got = sample_flow(v, x, schedule)
    assert (got - y).abs().max() <= 1e-6 * y.abs().max()
    # one step by hand: x + (sigma' - sigma) v
    e = v(x, schedule.timesteps[0])
    assert torch.equal(flow_euler_step(e, x, schedule.sigmas[0], schedule.sigmas[1]),
                       x + (schedule.sigmas[1] - schedule.sigmas[0]) * e)


def test_flux_pipeline_latents_equal_sample_flow():
    """FluxPipeline (tiny transformer, guidance embedding, output_type='latent') == sample_flow with
    FluxVelocity on the unpacked latents, bit for bit."""
    from diffusers import FluxPipeline

    tr = tiny_flux_transformer()
    scheduler = build_flow_scheduler("tiny-flux-dev")
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    cond, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 16, generator=g)
    x = latents(torch.float32, c=16)
    side = 8 * pipe.vae_scale_factor  # pixels for an 8x8 latent
    out = pipe(prompt_embeds=cond.expand(2, -1, -1), pooled_prompt_embeds=pooled.expand(2, -1), latents=pack_latents(x),
               height=side, width=side, num_inference_steps=4, guidance_scale=3.5, output_type="latent").images
    velocity = FluxVelocity(tr, cond, pooled, guidance_scale=3.5)
    ours = sample_flow(velocity, x, FlowSchedule.flux(scheduler, 4, image_seq_len=(8 // 2) * (8 // 2)))
    assert velocity.calls == 4
    assert torch.equal(unpack_latents(out, 8, 8), ours)


def test_sd3_pipeline_latents_equal_sample_flow():
    """StableDiffusion3Pipeline (tiny transformer, no CFG, output_type='latent') == sample_flow, bit for bit."""
    from diffusers import StableDiffusion3Pipeline

    tr = tiny_sd3_transformer()
    scheduler = build_flow_scheduler("tiny-sd3")
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    cond, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    x = latents(torch.float32, c=16)
    side = 8 * pipe.vae_scale_factor
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, latents=x, height=side, width=side,
               num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
    ours = sample_flow(sd3_velocity(tr, cond, pooled), x, FlowSchedule.from_scheduler(scheduler, 4))
    assert torch.equal(out, ours)


# -- gradients -------------------------------------------------------------------------------------

class ConvVelocity:
    """A tiny frozen conv net v(x, t) = conv2(tanh(conv1(x) (1 + sigma))) + sigma x."""

    def __init__(self, dtype, c=4, seed=0):
        torch.manual_seed(seed)
        self.c1 = torch.nn.Conv2d(c, 8, 3, padding=1).to(dtype).requires_grad_(False)
        self.c2 = torch.nn.Conv2d(8, c, 3, padding=1).to(dtype).requires_grad_(False)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        s = t / 1000
        return self.c2(torch.tanh(self.c1(x) * (1 + s))) + s * x


def loss_of(outputs, dtype, seed=2):
    w = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return sum(((o * w).sin() + 0.1 * o**2).sum() for o in outputs)


def flow_grad(backprop, velocity, x_T, schedule):
    x = x_T.clone().requires_grad_()
    out = sample_flow_differentiable(velocity, x, schedule, backprop=backprop)
    loss_of((out,), x_T.dtype).backward()
    return x.grad, out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_flow_checkpoint_gradient_equals_autograd(dtype, tol, steps):
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), steps)
    v = ConvVelocity(dtype)
    x_T = latents(dtype)
    ref, ref_out = flow_grad("autograd", v, x_T, schedule)
    calls = v.calls
    got, out = flow_grad("checkpoint", v, x_T, schedule)
    assert v.calls - calls == 2 * steps  # forward + one recomputation per step
    assert torch.equal(out, ref_out), "the forward pass must not depend on backprop"
    assert torch.isfinite(got).all() and ref.abs().max() > 0
    assert relative_error(got, ref) < tol


def test_sd3_flux_tiny_transformer_checkpoint_gradient_equals_autograd_float64():
    dtype = torch.float64
    g = torch.Generator().manual_seed(3)
    sd3 = sd3_velocity(tiny_sd3_transformer(dtype), torch.randn(2, 5, 16, generator=g, dtype=dtype),
                       torch.randn(2, 16, generator=g, dtype=dtype))
    flux = FluxVelocity(tiny_flux_transformer(dtype), torch.randn(1, 5, 16, generator=g, dtype=dtype),
                        torch.randn(1, 16, generator=g, dtype=dtype))
    x_T = latents(dtype, c=16)
    for velocity, schedule in ((sd3, FlowSchedule.from_scheduler(sd3_scheduler(), 3)),
                               (flux, FlowSchedule.flux(flux_dev_scheduler(), 3, 16))):
        ref, _ = flow_grad("autograd", velocity, x_T, schedule)
        got, _ = flow_grad("checkpoint", velocity, x_T, schedule)
        assert relative_error(got, ref) < 1e-12


def test_flow_half_precision_gradient_survives_tiny_cotangents():
    """A float16 velocity's VJP on a cotangent of 1e-9 (below float16's smallest subnormal, 6e-8): the
    power-of-two cotangent scaling keeps the checkpointed gradient equal to float64's."""
    w64 = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 2

    def velocity(dtype):
        w = w64.to(dtype)
        return lambda x, t: torch.tanh(torch.einsum("ij,bjhw->bihw", w, x.to(dtype))) * (1 + t / 1000)

    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), 4)
    x_T = latents(torch.float64)
    target = latents(torch.float64, seed=9)
    grads = {}
    for name, dtype, backprop in (("ref", torch.float64, "autograd"), ("half", torch.float16, "checkpoint"),
                                  ("half_autograd", torch.float16, "autograd")):
        x = x_T.float().clone().requires_grad_() if dtype == torch.float16 else x_T.clone().requires_grad_()
        out = sample_flow_differentiable(velocity(dtype), x, schedule, backprop=backprop)
        (1e-9 * (out.double() * target).sum()).backward()
        grads[name] = x.grad.double()
    for name in ("half", "half_autograd"):
        assert relative_error(grads[name], grads["ref"]) < 2e-2, name




def test_flow_saved_bytes_flat_in_steps():
    dtype = torch.float32
    v = ConvVelocity(dtype)
    latent_bytes = 2 * 4 * 8 * 8 * 4

    def measure(backprop, steps, edict=False):
        schedule = FlowSchedule.from_scheduler(sd3_scheduler(), steps)
        x = latents(dtype).requires_grad_()
        if edict:
            return saved_bytes(lambda x: sample_flow_edict_differentiable(v, x, schedule, backprop=backprop), x)
        return saved_bytes(lambda x: sample_flow_differentiable(v, x, schedule, backprop=backprop), x)

    ck = [measure("checkpoint", s) for s in (2, 4, 8)]
    assert ck[1] - ck[0] == 2 * latent_bytes and ck[2] - ck[1] == 4 * latent_bytes  # one latent a step
    ag = [measure("autograd", s) for s in (2, 4)]
    assert (ag[1] - ag[0]) / 2 > 5 * latent_bytes  # autograd keeps every activation of every call
    eck = [measure("checkpoint", s, edict=True) for s in (2, 4)]
    assert eck[1] - eck[0] == 2 * 2 * latent_bytes  # one latent pair a step
    rev = [measure("reversible", s, edict=True) for s in (2, 4, 8)]
    assert rev[0] == rev[1] == rev[2] == 4 * latent_bytes  # x_1, y_1, x_0, y_0 whatever the steps


def test_flow_bad_backprop():
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), 2)
    v, x = smooth_velocity(torch.float32), latents(torch.float32)
    with pytest.raises(ValueError, match="autograd, checkpoint"):
        sample_flow_differentiable(v, x, schedule, backprop="reversible")
    with pytest.raises(ValueError, match="reversible"):
        sample_flow_edict_differentiable(v, x, schedule, backprop="adjoint")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sample_flow_edict_differentiable(v, x, schedule, mix_weight=0)


# -- the exactly invertible coupled chain ----------------------------------------------------------

def round_trip_error(velocity, x_T, schedule, p=0.93):
    """sample (x_1, x_1) -> (x_0, y_0), then the exact inverse back to x_1: max relative error."""
    with torch.no_grad():
        x, y = sample_flow_edict(velocity, x_T, x_T, schedule, p)
        for i in reversed(range(len(schedule))):
            x, y = flow_edict_step_inverse(velocity, x, y, schedule, i, p)
    return max(relative_error(x, x_T), relative_error(y, x_T))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_flow_edict_round_trip_smooth_field_and_tiny_transformers(dtype, tol):
    """28 steps (the SD3 default) there and back on a smooth field, tiny SD3 and tiny FLUX transformers.

    Measured: float64 ~1e-14, float32 ~5e-6 (the mixing layer's inverse amplifies the x - y difference
    by 1/p^2 per step: (1/0.93^2)^28 ~ 60 times float32's rounding)."""
    g = torch.Generator().manual_seed(3)
    sd3 = sd3_velocity(tiny_sd3_transformer(dtype), torch.randn(2, 5, 16, generator=g, dtype=dtype),
                       torch.randn(2, 16, generator=g, dtype=dtype))
    flux = FluxVelocity(tiny_flux_transformer(dtype), torch.randn(1, 5, 16, generator=g, dtype=dtype),
                        torch.randn(1, 16, generator=g, dtype=dtype))
    x16 = latents(dtype, c=16, seed=5)
    cases = [
        (smooth_velocity(dtype, c=16), x16, FlowSchedule.from_scheduler(sd3_scheduler(), 28)),
        (sd3, x16, FlowSchedule.from_scheduler(sd3_scheduler(), 28)),
        (flux, x16, FlowSchedule.flux(flux_dev_scheduler(), 28, 16)),
    ]
    for velocity, x_T, schedule in cases:
        assert round_trip_error(velocity, x_T, schedule) < tol
    # inverting a clean latent and sampling it back contracts the error instead
    inv = flow_edict_invert(sd3, x16, FlowSchedule.from_scheduler(sd3_scheduler(), 28))
    assert inv.round_trip_error < (1e-15 if dtype == torch.float64 else 1e-6) * 10
    # one step and its inverse, both orders of the leapfrog
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), 4)
    x, y = latents(dtype, c=16, seed=6), latents(dtype, c=16, seed=7)
    for i in (0, 1):
        u, w = flow_edict_step(sd3, x, y, schedule, i)
        bx, by = flow_edict_step_inverse(sd3, u, w, schedule, i)
        eps = 1e3 * torch.finfo(dtype).eps
        assert relative_error(bx, x) < eps and relative_error(by, y) < eps


def test_flow_edict_with_p_one_starts_as_euler_and_stays_close():
    """The coupled chain's first half-step is the Euler step; its output stays O(h) from Euler's."""
    dtype = torch.float64
    v = smooth_velocity(dtype)
    x = latents(dtype)
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), 28)
    one = schedule.head(1)
    u, _ = sample_flow_edict(v, x, x, one, mix_weight=1.0)
    assert torch.equal(u, sample_flow(v, x, one))
    x0, y0 = sample_flow_edict(v, x, x, schedule)
    euler = sample_flow(v, x, schedule)
    assert relative_error(x0, euler) < 0.05 and relative_error(y0, euler) < 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("steps,mix_weight", [(1, 0.93), (4, 0.93), (6, 0.7), (4, 1.0)])
def test_flow_edict_gradients_equal_autograd(dtype, tol, steps, mix_weight):
    schedule = FlowSchedule.from_scheduler(sd3_scheduler(), steps)
    v = ConvVelocity(dtype)
    x_T, y_T = latents(dtype, seed=3), latents(dtype, seed=4)
    grads, outs = {}, {}
    for mode in ("autograd", "checkpoint", "reversible"):
        x, y = x_T.clone().requires_grad_(), y_T.clone().requires_grad_()
        info = {}
        outs[mode] = sample_flow_edict_differentiable(v, x, schedule, backprop=mode, y=y, mix_weight=mix_weight,
                                                      info=info)
        loss_of(outs[mode], dtype).backward()
        grads[mode] = torch.cat([x.grad, y.grad])
        if mode == "reversible":
            assert info["reversible_fallback"] is False and info["reversible_drift"] < tol
    assert all(torch.equal(a, b) for a, b in zip(outs["autograd"], outs["reversible"]))
    assert grads["autograd"].abs().max() > 0
    assert relative_error(grads["checkpoint"], grads["autograd"]) < tol
    assert relative_error(grads["reversible"], grads["autograd"]) < tol


# -- FLUX latent layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(8, 8), (4, 10), (16, 6)])
def test_flux_pack_unpack_equal_diffusers(height, width):
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, height, width, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (3, (height // 2) * (width // 2), 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, height, width))
    assert torch.equal(unpack_latents(packed, height, width), x)  # a permutation: exactly invertible
    f = 8  # FluxPipeline._unpack_latents takes pixel sizes and the VAE factor
    assert torch.equal(FluxPipeline._unpack_latents(packed, height * f, width * f, f), x)
    ids = FluxPipeline._prepare_latent_image_ids(3, height // 2, width // 2, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(height, width), ids)
    assert torch.equal(text_ids(7), torch.zeros(7, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    with pytest.raises(ValueError, match="do not fit"):
        unpack_latents(packed, height + 2, width)


# -- tiny and real transformers --------------------------------------------------------------------

def test_sd3_tiny_transformer_forward_shape():
    tr = tiny_sd3_transformer()
    cfg = tr.config
    assert cfg.in_channels == 16 and cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0,)
    x = latents(torch.float32, c=16)
    v = sd3_velocity(tr, torch.randn(2, 5, 16), torch.randn(2, 16))(x, 1000.0)
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_tiny_transformer_forward_shape(guidance_embeds):
    tr = tiny_flux_transformer(guidance_embeds=guidance_embeds)
    assert tr.config.guidance_embeds is guidance_embeds and tr.config.in_channels == 64
    x = latents(torch.float32, c=16, size=6)
    velocity = FluxVelocity(tr, torch.randn(1, 5, 16), torch.randn(1, 16))
    v = velocity(x, 1000.0)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the packed call directly
    guidance = torch.full((2,), 3.5) if guidance_embeds else None
    out = tr(hidden_states=pack_latents(x), timestep=torch.ones(2), guidance=guidance,
             pooled_projections=torch.randn(2, 16), encoder_hidden_states=torch.randn(2, 5, 16),
             txt_ids=text_ids(5), img_ids=latent_image_ids(6, 6), return_dict=False)[0]
    assert out.shape == (2, 9, 64)


@pytest.mark.parametrize("name,low,high", [
    ("sd35-medium", 2.40e9, 2.55e9),   # "2.5B": 2.24B weights + the 384^2 x 1536 positional table it stores
    ("flux-dev", 11.85e9, 11.95e9),    # "12B"
    ("flux-schnell", 11.85e9, 11.95e9),
])
def test_sd3_flux_real_configs_build_at_published_size(name, low, high):
    """The real configs, built on the meta device (no memory): parameter counts of the released models."""
    import diffusers

    cls, cfg = flow_transformer_config(name)
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**cfg)
        vae = diffusers.AutoencoderKL(**flow_vae_config(name))
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert low < n < high, n
    assert vae.config.latent_channels == 16 and not vae.config.use_quant_conv
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 85e6
    scheduler = build_flow_scheduler(name)
    assert scheduler.config.shift == flow_scheduler_config(name)["shift"]
    if name == "flux-dev":
        assert model.config.guidance_embeds and scheduler.config.use_dynamic_shifting
