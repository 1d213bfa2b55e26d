"""Expectation over transformations (robust guidance): what it averages, its determinism per item, and that it is
the wrapped guide when every transformation is off."""
from __future__ import annotations

import pytest
import torch

from doodl_lightning.guidance import ExpectationOverTransforms, Guidance, SymmetryGuidance


class LeftBright(Guidance):
    """Loss = minus the mean of the left half's first channel: not invariant to flips or shifts."""

    def loss(self, images, prompts, generators):
        return -images[:, 0, :, : images.shape[-1] // 2].mean(dim=(1, 2))


def _images(n=3, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_eot_with_every_transformation_off_is_the_guide():
    x = _images()
    eot = ExpectationOverTransforms(LeftBright(), samples=1, flip=False, translate=0.0, min_scale=1.0, noise=0.0)
    torch.testing.assert_close(eot(x), LeftBright()(x), rtol=1e-6, atol=1e-6)


def test_eot_averages_flips():
    """Flips only, many samples: about half the copies are mirrored, so the left-half loss tends to the mean of the
    left and right halves' losses; a guide invariant to flips (symmetry) is unchanged."""
    x = _images()
    eot = ExpectationOverTransforms(LeftBright(), samples=400, flip=True, translate=0.0, min_scale=1.0, noise=0.0)
    left = LeftBright()(x)
    right = -x[:, 0, :, 8:].mean(dim=(1, 2))
    torch.testing.assert_close(eot(x), (left + right) / 2, rtol=0, atol=0.03)
    assert float((eot(x) - left).abs().max()) > 0.05 or float((left - right).abs().max()) < 0.1
    sym = ExpectationOverTransforms(SymmetryGuidance(), samples=8, flip=True, translate=0.0, min_scale=1.0, noise=0.0)
    torch.testing.assert_close(sym(x), SymmetryGuidance()(x), rtol=1e-5, atol=1e-6)


def test_eot_is_deterministic_per_item_and_differentiable():
    x = _images(n=3).requires_grad_()
    eot = ExpectationOverTransforms(LeftBright(), samples=4)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    a = eot(x, generators=gens([1, 2, 3]))
    b = eot(x, generators=gens([1, 2, 3]))
    assert torch.equal(a, b)
    alone = eot(x[1:2], generators=gens([2]))
    torch.testing.assert_close(alone, a[1:2], rtol=0, atol=0)
    other = eot(x, generators=gens([7, 8, 9]))
    assert not torch.equal(other, a)
    a.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_eot_refuses_bad_settings():
    from doodl_lightning.guidance import NoiseNormRegularizer

    with pytest.raises(ValueError, match="must be a Guidance"):
        ExpectationOverTransforms(torch.nn.Identity())
    with pytest.raises(ValueError, match="not an image reward"):
        ExpectationOverTransforms(NoiseNormRegularizer())
    for kw, msg in ((dict(samples=0), "samples must be"), (dict(translate=0.7), "translate must be"),
                    (dict(min_scale=0.0), "min_scale must be"), (dict(noise=-1.0), "noise must be")):
        with pytest.raises(ValueError, match=msg):
            ExpectationOverTransforms(LeftBright(), **kw)
