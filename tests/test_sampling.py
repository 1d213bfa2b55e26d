"""Samplers and their three gradients on tiny random UNets (float64 and float32)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from doodl_lightning.sampling import (
    Denoiser, GuidedEps, OneStepGradient, ReversibleDriftWarning, Schedule, edict_invert, edict_step, edict_step_inverse,
    relative_error, sample, sample_ddim, sample_edict,
)
from doodl_lightning.testing import memory
from doodl_lightning.testing.tiny import CROSS_DIM, sd_scheduler, tiny_unconditional_unet, tiny_unet


def make_denoiser(dtype, guidance_scale=3.0, n=2, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    cond = torch.randn(n, 5, CROSS_DIM, generator=g, dtype=dtype)
    uncond = torch.randn(1, 5, CROSS_DIM, generator=g, dtype=dtype)
    return Denoiser(tiny_unet(dtype, seed), cond=cond, uncond=uncond, guidance_scale=guidance_scale)


def latents(dtype, n=2, seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def loss_of(outputs, dtype, seed=2):
    outs = outputs
    w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return sum(((o * w).sin() + 0.1 * o**2).sum() for o in outs)


def grad_of(backprop, sampler, eps, x_T, schedule, mix_weight=0.93, info=None, tol=1e-3):
    x = x_T.clone().requires_grad_()
    out = sample(eps, x, schedule, sampler=sampler, backprop=backprop, mix_weight=mix_weight,
                 info=info, drift_tolerance=tol)
    loss_of(out, x_T.dtype).backward()
    return x.grad, out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("steps", [1, 3, 6])
@pytest.mark.parametrize("sampler,backprop,mix_weight", [
    ("ddim", "checkpoint", 0.93),
    ("edict", "checkpoint", 0.93),
    ("edict", "reversible", 0.93),
    ("edict", "reversible", 0.7),
    ("edict", "checkpoint", 1.0),
    ("edict", "reversible", 1.0),
])
def test_gradients_equal_autograd(dtype, tol, steps, sampler, backprop, mix_weight):
    eps = make_denoiser(dtype)
    schedule = Schedule.from_scheduler(sd_scheduler(), steps, "model")
    x_T = latents(dtype)
    ref, ref_out = grad_of("autograd", sampler, eps, x_T, schedule, mix_weight)
    info = {}
    got, out = grad_of(backprop, sampler, eps, x_T, schedule, mix_weight, info)
    assert isinstance(out, tuple) and len(out) == (2 if sampler == "edict" else 1)
    assert all(torch.equal(a, b) for a, b in zip(ref_out, out)), "the forward pass must not depend on backprop"
    assert torch.isfinite(got).all() and ref.abs().max() > 0
    assert relative_error(got, ref) < tol
    if backprop == "reversible":
        assert info["reversible_fallback"] is False and info["reversible_drift"] < tol


def test_partial_chain_and_distinct_pair_gradients():
    """Starting later (opt_t) and a pair x_T != y_T (editing) give autograd's gradient for both."""
    dtype = torch.float64
    eps = make_denoiser(dtype)
    schedule = Schedule.from_scheduler(sd_scheduler(), 8, "model").tail(5)
    assert len(schedule) == 3
    x_T, y_T = latents(dtype, seed=3), latents(dtype, seed=4)
    grads = {}
    for mode in ("autograd", "checkpoint", "reversible"):
        x, y = x_T.clone().requires_grad_(), y_T.clone().requires_grad_()
        loss_of(sample(eps, x, schedule, sampler="edict", backprop=mode, y=y), dtype).backward()
        grads[mode] = torch.cat([x.grad, y.grad])
    assert relative_error(grads["checkpoint"], grads["autograd"]) < 1e-9
    assert relative_error(grads["reversible"], grads["autograd"]) < 1e-9


def saved_bytes(sampler, backprop, steps):
    eps = make_denoiser(torch.float32)
    schedule = Schedule.from_scheduler(sd_scheduler(), steps, "model")
    x = latents(torch.float32).requires_grad_()
    return memory.saved_bytes(lambda x: sample(eps, x, schedule, sampler=sampler, backprop=backprop), x)


def test_saved_bytes_scale_with_steps():
    latent_bytes = 2 * 4 * 8 * 8 * 4  # one latent batch in float32
    rev = [saved_bytes("edict", "reversible", s) for s in (2, 4, 8)]
    assert rev[0] == rev[1] == rev[2] == 4 * latent_bytes  # x_T, y_T, x_0, y_0 whatever the steps
    for sampler, per_step in (("ddim", latent_bytes), ("edict", 2 * latent_bytes)):
        ck = [saved_bytes(sampler, "checkpoint", s) for s in (2, 4, 8)]
        assert ck[1] - ck[0] == 2 * per_step and ck[2] - ck[1] == 4 * per_step  # one latent (pair) a step
        ag = [saved_bytes(sampler, "autograd", s) for s in (2, 4)]
        assert (ag[1] - ag[0]) / 2 > 20 * per_step  # autograd stores every UNet activation


def test_edict_inversion_round_trip_float64():
    dtype = torch.float64
    eps = make_denoiser(dtype)
    schedule = Schedule.from_scheduler(sd_scheduler(), 10, "model")
    x0 = latents(dtype, seed=5)
    inv = edict_invert(eps, x0, schedule)
    assert inv.round_trip_error < 1e-9
    rx, ry = sample_edict(eps, inv.x, inv.y, schedule)
    assert relative_error(rx, x0) < 1e-9 and relative_error(ry, x0) < 1e-9
    # one step and its inverse
    x, y = latents(dtype, seed=6), latents(dtype, seed=7)
    for i in (0, 1):
        u, v = edict_step(eps, x, y, schedule, i, 0.93)
        bx, by = edict_step_inverse(eps, u, v, schedule, i, 0.93)
        assert relative_error(bx, x) < 1e-12 and relative_error(by, y) < 1e-12


def test_leapfrog_alternates_which_latent_goes_first():
    """Even steps update x from eps(y) first; odd steps update y from eps(x) first."""
    schedule = Schedule.from_scheduler(sd_scheduler(), 2, "model")
    seen = []

    def eps(z, t):
        seen.append(z.clone())
        return torch.zeros_like(z)

    x, y = torch.zeros(1, 1), torch.ones(1, 1)
    edict_step(eps, x, y, schedule, 0, 0.93)
    assert torch.equal(seen[0], y)  # step 0: first eps is taken from y, to update x
    seen.clear()
    edict_step(eps, x, y, schedule, 1, 0.93)
    assert torch.equal(seen[0], x)  # step 1: first eps is taken from x, to update y


def test_ill_conditioned_model_drift_is_detected_and_gradient_still_exact():
    dtype = torch.float32
    eps = make_denoiser(dtype, guidance_scale=7.5)
    with torch.no_grad():
        for p in eps.unet.parameters():
            p.mul_(2.0)  # large weights: the inverse amplifies rounding error step after step
    schedule = Schedule.from_scheduler(sd_scheduler(), 12, "model")
    x_T = latents(dtype)
    x64 = x_T.double().clone().requires_grad_()
    eps64 = make_denoiser(torch.float64, guidance_scale=7.5)
    eps64.unet.load_state_dict({k: v.double() for k, v in eps.unet.state_dict().items()})
    loss_of(sample(eps64, x64, schedule, sampler="edict", backprop="autograd"), torch.float64).backward()
    ref = x64.grad.float()
    # the drift of each latent, from the exact inverse run independently of the reversible backward
    with torch.no_grad():
        x, y = sample_edict(eps, x_T, x_T, schedule)
        for i in reversed(range(len(schedule))):
            x, y = edict_step_inverse(eps, x, y, schedule, i, 0.93)
    drift_x, drift_y = relative_error(x, x_T), relative_error(y, x_T)
    # a tolerance between the two drifts (their geometric mean: float32 rounding, and so each drift,
    # depends on the thread count): only a drift measured on BOTH latents (their max) exceeds it
    assert max(drift_x, drift_y) > 10 * min(drift_x, drift_y), (drift_x, drift_y)
    tol = (drift_x * drift_y) ** 0.5
    info = {}
    with pytest.warns(ReversibleDriftWarning, match="drift"):
        got, _ = grad_of("reversible", "edict", eps, x_T, schedule, info=info, tol=tol)
    assert info["reversible_fallback"] is True
    assert info["reversible_drift"] == pytest.approx(max(drift_x, drift_y), rel=1e-3)
    ag, _ = grad_of("autograd", "edict", eps, x_T, schedule)
    assert relative_error(got, ag) < 1e-4
    assert relative_error(got, ref) < 10 * relative_error(ag, ref) + 1e-4


class _KickedEps:
    """eps(z, t) = shift_t + k tanh(z): depends weakly on z, so an error in one rebuilt latent barely
    reaches the other. The ``kick_call``-th call at t = timesteps[0] gets ``delta * kick`` added."""

    def __init__(self, schedule, dtype, k=0.02, delta=1e-3, kick_call=None):
        g = torch.Generator().manual_seed(21)
        self.shift = {t: torch.randn(2, 4, 8, 8, generator=g, dtype=dtype) for t in schedule.timesteps}
        self.kick = delta * torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
        self.k, self.t0, self.kick_call, self.calls_at_t0 = k, schedule.timesteps[0], kick_call, 0

    def __call__(self, z, t):
        e = self.shift[t] + self.k * torch.tanh(z)
        if t == self.t0:
            self.calls_at_t0 += 1
            if self.calls_at_t0 == self.kick_call:
                e = e + self.kick
        return e


def test_reversible_drift_of_y_alone_falls_back_to_the_exact_gradient():
    """The rebuilt y_T is wrong, the rebuilt x_T nearly exact: the drift must count y, fall back, and
    return autograd's gradient.

    EDICT's forward makes 2 calls at t_0 (step 0). The reversible backward ends with step 0 (even: x
    went first), whose first call, eps(x1, t_0) -- the 3rd call at t_0 -- rebuilds y_T; only that one
    is kicked. The fallback's own calls (5th on) are clean.
    """
    dtype = torch.float64
    schedule = Schedule.from_scheduler(sd_scheduler(), 4, "model")
    x_T = latents(dtype)
    # the premise, checked with the exact inverse (step 0's inverse also rebuilds y first, from eps(x1))
    eps = _KickedEps(schedule, dtype, kick_call=3)
    with torch.no_grad():
        x, y = sample_edict(eps, x_T, x_T, schedule)
        for i in reversed(range(len(schedule))):
            x, y = edict_step_inverse(eps, x, y, schedule, i, 0.93)
    assert eps.calls_at_t0 == 4
    drift_x, drift_y = relative_error(x, x_T), relative_error(y, x_T)
    tol = 5e-5
    assert drift_x < tol / 5 and drift_y > 5 * tol, (drift_x, drift_y)

    ref, _ = grad_of("autograd", "edict", _KickedEps(schedule, dtype), x_T, schedule)
    eps = _KickedEps(schedule, dtype, kick_call=3)
    info = {}
    with pytest.warns(ReversibleDriftWarning, match="drift"):
        got, _ = grad_of("reversible", "edict", eps, x_T, schedule, info=info, tol=tol)
    assert eps.calls_at_t0 > 4  # the fallback ran the chain again
    assert info["reversible_fallback"] is True
    assert info["reversible_drift"] == pytest.approx(drift_y, rel=1e-6)
    assert relative_error(got, ref) < 1e-12
    # without the kick the same chain needs no fallback
    info = {}
    got, _ = grad_of("reversible", "edict", _KickedEps(schedule, dtype), x_T, schedule, info=info, tol=tol)
    assert info["reversible_fallback"] is False and info["reversible_drift"] < 1e-12
    assert relative_error(got, ref) < 1e-12


def test_cfg_is_one_batched_call_equal_to_two_calls():
    dtype = torch.float64
    eps = make_denoiser(dtype, guidance_scale=7.5)
    x = latents(dtype)
    out = eps(x, 500)
    assert eps.calls == 1
    unet = eps.unet
    e_u = unet(x, 500, encoder_hidden_states=eps.uncond.hidden.expand(2, -1, -1)).sample
    e_c = unet(x, 500, encoder_hidden_states=eps.cond.hidden).sample
    assert torch.allclose(out, e_u + 7.5 * (e_c - e_u), rtol=0, atol=1e-12)
    one = Denoiser(unet, cond=eps.cond, uncond=eps.uncond, guidance_scale=1.0)
    assert torch.allclose(one(x, 500), e_c, atol=1e-12) and one.calls == 1


def test_unconditional_unet_and_float32_latents_with_half_model():
    eps = Denoiser(tiny_unconditional_unet(torch.float64))
    x = latents(torch.float64)
    assert torch.equal(eps(x, 10), eps.unet(x, 10).sample)
    half = Denoiser(tiny_unet(torch.bfloat16), cond=torch.randn(1, 5, CROSS_DIM), guidance_scale=1.0)
    assert half(latents(torch.float32), 10).dtype == torch.float32


def test_v_prediction_is_converted_to_eps():
    abar = sd_scheduler().alphas_cumprod
    t = 700
    x0, noise = latents(torch.float64, seed=8), latents(torch.float64, seed=9)
    a = abar[t].double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0

    class VNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, t, encoder_hidden_states=None):
            return SimpleNamespace(sample=v)

    eps = Denoiser(VNet(), prediction_type="v_prediction", alphas_cumprod=abar)
    assert torch.allclose(eps(x_t, t), noise, atol=1e-6)


def test_one_step_baseline_moves_prediction_downhill_and_reduces_to_unguided():
    dtype = torch.float64
    eps = make_denoiser(dtype)
    eps_uncond = make_denoiser(dtype, guidance_scale=0.0)
    schedule = Schedule.from_scheduler(sd_scheduler(), 5)
    target = latents(dtype, seed=11)
    loss_fn = lambda z: ((z - target) ** 2).flatten(1).sum(1)  # noqa: E731

    def guided(scale):
        return GuidedEps(eps, OneStepGradient(eps_uncond, loss_fn, schedule, scale), schedule)

    x_T = latents(dtype)
    with torch.no_grad():
        plain = sample_ddim(eps, x_T, schedule)
        same = sample_ddim(guided(0.0), x_T, schedule)
        down = sample_ddim(guided(0.05), x_T, schedule)
        gx, gy = sample_edict(guided(0.05), x_T, x_T, schedule)
        px, _ = sample_edict(eps, x_T, x_T, schedule)
    assert torch.allclose(same, plain, atol=1e-12)
    assert (loss_fn(down) < loss_fn(plain)).all()
    assert (loss_fn(gx) < loss_fn(px)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="dpm"), "ddim, edict"),
    (dict(backprop="adjoint"), "autograd, checkpoint, reversible"),
    (dict(sampler="ddim", backprop="reversible"), "needs an exactly invertible sampler"),
    (dict(sampler="edict", mix_weight=0.0), r"\(0, 1\]"),
    (dict(sampler="edict", mix_weight=1.5), r"\(0, 1\]"),
])
def test_bad_sampler_arguments(kwargs, match):
    eps = make_denoiser(torch.float32)
    schedule = Schedule.from_scheduler(sd_scheduler(), 2, "model")
    with pytest.raises(ValueError, match=match):
        sample(eps, latents(torch.float32), schedule, **kwargs)


def test_bad_steps_and_guidance_scale():
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            Schedule.from_scheduler(sd_scheduler(), steps, "model")
    with pytest.raises(ValueError, match=">= 0"):
        Denoiser(tiny_unet(), cond=torch.zeros(1, 5, CROSS_DIM), uncond=torch.zeros(1, 5, CROSS_DIM), guidance_scale=-1)
