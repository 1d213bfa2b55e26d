"""The contract every registered sampler inherits (after diffusers' ``SchedulerCommonTest``): a sampler that registers
itself (``sampling.register_sampler``) is run here with no test of its own to write.

Each case runs in float64 on a small deterministic model callable (a fixed random convolution and a tanh, with the
timestep mixed in), so the cases are about the sampler and its gradients, not a network. The samplers' parity with
the libraries' own schedulers and pipelines is in test_sampling.py, test_flow_sampling.py, test_families.py and
test_official_parity.py.
"""
from __future__ import annotations

import pytest
import torch

from doodl_lightning.sampling import BACKPROPS, SAMPLERS, FlowSchedule, Schedule, get_sampler, relative_error, sample
from doodl_lightning.sampling.registry import Sampler, check_sampler
from doodl_lightning.testing import memory
from doodl_lightning.testing.flow_models import build_flow_scheduler
from doodl_lightning.testing.tiny import sd_scheduler

NAMES = sorted(SAMPLERS)
SHAPE = (2, 4, 6, 6)


class ToyModel:
    """eps(x, t) (or a velocity): tanh of a fixed random 3x3 convolution of x, shifted by the timestep. Smooth and
    contracting enough that EDICT's inverse is well conditioned at float64."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.3 * torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.tanh(torch.nn.functional.conv2d(x, self.weight.to(x.dtype), padding=1) + float(t) / 1000.0)


def schedule_for(s: Sampler, steps: int):
    if s.schedule_type is FlowSchedule:
        return FlowSchedule.from_scheduler(build_flow_scheduler("tiny-sd3"), steps)
    return Schedule.from_scheduler(sd_scheduler(), steps, "model")


def extras(s: Sampler, schedule, seed: int = 3) -> dict:
    """The keyword extras of the one signature: LCM's fixed per-step noises (the others ignore them)."""
    g = torch.Generator().manual_seed(seed)
    return {"mix_weight": 0.93, "noises": [torch.randn(SHAPE, generator=g, dtype=torch.float64)
                                           for _ in range(len(schedule) - 1)]}


def x_T(seed: int = 1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def backprops(s: Sampler) -> list[str]:
    return [b for b in BACKPROPS if b != "reversible" or s.invertible]


def loss_of(outs):
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return sum(((o * w).sin() + 0.1 * o**2).sum() for o in outs)


def run(s: Sampler, backprop: str, steps: int = 4):
    schedule = schedule_for(s, steps)
    x = x_T().requires_grad_()
    out = sample(ToyModel(), x, schedule, sampler=s.name, backprop=backprop, **extras(s, schedule))
    loss_of(out).backward()
    return out, x.grad


@pytest.fixture(params=NAMES)
def sampler(request) -> Sampler:
    return get_sampler(request.param)


def test_declares_itself(sampler):
    assert sampler.name in SAMPLERS and SAMPLERS[sampler.name] is sampler
    assert sampler.schedule_type in (Schedule, FlowSchedule)
    assert sampler.latents in (1, 2)
    assert sampler.paper, f"sampler {sampler.name} must cite the algorithm it implements (Sampler.paper)"
    assert type(sampler).__doc__, f"sampler {sampler.name} needs a docstring"


def test_forward_is_the_plain_sample_whatever_the_gradient(sampler):
    schedule = schedule_for(sampler, 4)
    plain = sampler.sample(ToyModel(), x_T(), schedule, **extras(sampler, schedule))
    assert isinstance(plain, tuple) and len(plain) == sampler.latents
    for backprop in backprops(sampler):
        out, _ = run(sampler, backprop)
        assert all(torch.equal(a.detach(), b) for a, b in zip(out, plain)), backprop


@pytest.mark.parametrize("steps", [1, 4])
def test_gradients_equal_autograd(sampler, steps):
    _, ref = run(sampler, "autograd", steps)
    assert ref.abs().max() > 0
    for backprop in backprops(sampler):
        _, got = run(sampler, backprop, steps)
        assert relative_error(got, ref) < 1e-10, f"{sampler.name}/{backprop}: {relative_error(got, ref):.2e}"


def test_deterministic(sampler):
    for backprop in backprops(sampler):
        (a, ga), (b, gb) = run(sampler, backprop), run(sampler, backprop)
        assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(ga, gb), backprop


def test_checkpoint_keeps_one_latent_per_step_and_reversible_none(sampler):
    """The memory claims: ``checkpoint`` saves exactly one latent (pair) per step; ``reversible`` a constant."""
    one = x_T().numel() * x_T().element_size()
    for steps in (2, 6):
        schedule = schedule_for(sampler, steps)
        kw = extras(sampler, schedule)

        def chain(backprop):
            return lambda x: sample(ToyModel(), x, schedule, sampler=sampler.name, backprop=backprop, **kw)

        x = x_T().requires_grad_()
        assert memory.saved_bytes(chain("checkpoint"), x) == steps * sampler.latents * one
        if sampler.invertible:
            assert memory.saved_bytes(chain("reversible"), x) == 4 * one  # x_T, y_T, x_0, y_0: not the steps


def test_refuses_the_other_schedule_type(sampler):
    other = FlowSchedule.from_scheduler(build_flow_scheduler("tiny-sd3"), 2) if sampler.schedule_type is Schedule \
        else Schedule.from_scheduler(sd_scheduler(), 2, "model")
    with pytest.raises(ValueError, match=f"sampler '{sampler.name}' runs on a {sampler.schedule_type.__name__}"):
        sample(ToyModel(), x_T(), other, sampler=sampler.name, **extras(sampler, other))


def test_inversion_or_its_refusal(sampler):
    schedule = schedule_for(sampler, 4)
    if not sampler.invertible:
        with pytest.raises(ValueError, match="reversible' needs an exactly invertible sampler"):
            check_sampler(sampler.name, "reversible")
        with pytest.raises(ValueError, match="not exactly invertible"):
            sampler.invert(ToyModel(), x_T(), schedule)
        return
    x0 = x_T(5)
    inv = sampler.invert(ToyModel(), x0, schedule)
    back = sampler.sample(ToyModel(), inv.x, schedule, y=inv.y)
    assert max(relative_error(b, x0) for b in back) < 1e-9


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'; choose one of " + ", ".join(SAMPLERS)):
        get_sampler("euler_a")
    with pytest.raises(ValueError, match="unknown backprop 'adjoint'"):
        check_sampler("ddim", "adjoint")
