"""Black-box rewards (``guidance.BlackBoxReward``) and DNO's zeroth-order / hybrid noise optimisation
(``zeroth_order.DNO``): the estimator against hand-written central differences on known functions, a DNO step against
the same estimate rebuilt from a plain DOODL module's evaluations, the hybrid's exact part, determinism per item,
resume, exact compute counts, bad input, and one fit through ``cli.py``."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from test_noise_search import StopAfter
from test_particles import _trainer

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def backbone(tiny_pipeline_dir):
    """The tiny pipeline loaded once for this file's modules (loading it per module cost more than their steps)."""
    from doodl_lightning.families import PretrainedBackbone

    return PretrainedBackbone(tiny_pipeline_dir)


# -- black-box callables the tests name by dotted path (``test_blackbox.<name>``) ---------------------------------
def brightness(images, prompts):
    """A reward: mean brightness of the left half, the prompt's length x 1e-3 added (so the prompts reach it)."""
    w = images.shape[-1] // 2
    return images[..., :w].mean(dim=(1, 2, 3)) + torch.tensor([1e-3 * len(p) for p in prompts])


def thresholded(images, level: float = 0.0):
    """A step function of the image: 1 where its mean is above ``level`` (no gradient anywhere useful)."""
    return (images.mean(dim=(1, 2, 3)) > level).float().tolist()


class Judge:
    """A class-form reward: instantiated once with its arguments, called per batch; draws from the generators."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, images, generators):
        noise = torch.stack([torch.rand((), generator=g) for g in generators])
        return self.scale * images.std(dim=(1, 2, 3)) + 0.0 * noise


def wrong_shape(images):
    return torch.zeros(len(images), 2)


def not_finite(images):
    return torch.tensor([0.0] + [float("nan")] * (len(images) - 1))


def not_numbers(images):
    return {"score": 1.0}


# -- the estimator ------------------------------------------------------------------------------------------------
def _hand_estimate(f_one, z, u, mu):
    """1/q sum_i (f(z + mu u_i) - f(z - mu u_i)) / (2 mu) u_i, one point and one direction at a time."""
    out = torch.zeros_like(z)
    for n in range(z.shape[0]):
        for i in range(u.shape[1]):
            slope = (f_one(z[n] + mu * u[n, i]) - f_one(z[n] - mu * u[n, i])) / (2 * mu)
            out[n] += slope * u[n, i] / u.shape[1]
    return out


def test_blackbox_antithetic_estimate_equals_central_differences_and_the_gradient_on_average():
    """On a quadratic f(z) = 1/2 z'Az + b'z: the estimate equals hand-written central differences (layout, pairing,
    1/q, 1/(2 mu)); each difference is exactly grad f . u (curvature cancels in antithetic pairs, so the result does
    not depend on mu); averaged over many directions it is grad f = Az + b. On a cubic the error shrinks as mu^2."""
    from doodl_lightning.zeroth_order import antithetic_gradient

    g = torch.Generator().manual_seed(0)
    d = 6
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(d, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    quad = lambda x: 0.5 * (x @ a * x).sum(-1) + x @ b  # noqa: E731  (M, d) -> (M,)
    z = torch.randn(3, d, generator=g, dtype=torch.float64)
    u = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    calls = []
    est = antithetic_gradient(lambda rows: calls.append(len(rows)) or quad(rows), z, u, mu=0.3)
    assert calls == [2 * 5 * 3], "all 2 q N probes in one call"
    torch.testing.assert_close(est, _hand_estimate(lambda x: quad(x[None])[0], z, u, 0.3), rtol=1e-12, atol=1e-12)
    grad = z @ a + b
    exact_directional = torch.einsum("nd,nqd->nq", grad, u)
    torch.testing.assert_close(est, torch.einsum("nq,nqd->nd", exact_directional, u) / 5, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(antithetic_gradient(quad, z, u, mu=3.0), est, rtol=1e-9, atol=1e-9)
    # E[g] = grad f: many directions (Monte Carlo error ~ |grad| sqrt(d / q))
    many = torch.randn(3, 40_000, d, generator=g, dtype=torch.float64)
    est = antithetic_gradient(quad, z, many, mu=0.1)
    assert float(((est - grad).norm(dim=1) / grad.norm(dim=1)).max()) < 0.05
    # a one-sided difference (f(z + mu u) - f(z)) / mu would carry mu/2 u'Au: the antithetic form does not
    cubic = lambda x: (x ** 3).sum(-1)  # noqa: E731
    few = u[:, :2]
    exact = torch.einsum("nq,nqd->nd", torch.einsum("nd,nqd->nq", 3 * z ** 2, few), few) / 2
    err = [float((antithetic_gradient(cubic, z, few, mu) - exact).abs().max()) for mu in (0.1, 0.05)]
    assert err[0] > 0 and err[1] == pytest.approx(err[0] / 4, rel=0.01)


# -- the black-box reward -----------------------------------------------------------------------------------------
def test_blackbox_reward_calls_its_callable_and_refuses_bad_output():
    from doodl_lightning.guidance import BlackBoxReward

    images = torch.rand(3, 3, 8, 8) * 2 - 1
    prompts = ["a", "bb", "ccc"]
    r = BlackBoxReward("test_blackbox.brightness")
    assert r.name == "blackbox" and not r.differentiable
    torch.testing.assert_close(r(images, prompts=prompts), -brightness(images, prompts))  # maximised: loss = -reward
    low = BlackBoxReward("test_blackbox.thresholded", reward_args={"level": -2.0}, maximize=False, name="t")
    assert low(images).tolist() == [1.0, 1.0, 1.0]  # the function's keyword bound; a loss as returned
    judge = BlackBoxReward("test_blackbox.Judge", reward_args={"scale": 2.0})
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    torch.testing.assert_close(judge(images, prompts, gens), -2.0 * images.std(dim=(1, 2, 3)))
    assert BlackBoxReward(lambda x: x.mean(dim=(1, 2, 3)))(images).shape == (3,)  # a callable from Python
    module = BlackBoxReward(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 1), torch.nn.Flatten(0)))
    assert not any(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(module(images, prompts, gens), -module.reward(images))  # forward(images) only
    holder = torch.nn.ModuleList([module])
    assert holder.state_dict() == {}, "the reward's model stays out of the search's checkpoints"
    with pytest.raises(ValueError, match="has no gradient.*zeroth_order.DNO"):
        r(images.requires_grad_(), prompts=prompts)  # DOODL would back-propagate a silent zero
    images = images.detach()
    for path, msg in (("test_blackbox.wrong_shape", r"returned shape \(3, 2\) for 3 images: return one number per "
                                                    r"image, shape \(3,\)"),
                      ("test_blackbox.not_finite", "returned nan for image 1: return a finite score"),
                      ("test_blackbox.not_numbers", "returned a dict, not numbers")):
        with pytest.raises(ValueError, match=msg):
            BlackBoxReward(path)(images)
    for kw, msg in ((dict(reward="no_such_module_xyz.score"), "no module of 'no_such_module_xyz.score' can be imported"),
                    (dict(reward="test_blackbox.no_such_fn"), "test_blackbox has no 'no_such_fn'"),
                    (dict(reward="not a path"), "reward must be a dotted name"),
                    (dict(reward="test_blackbox.PROMPTS"), "is a list, not a callable"),
                    (dict(reward="test_blackbox.Judge"), r"Judge\(\*\*reward_args\) failed.*scale"),
                    (dict(reward="test_blackbox.brightness", reward_args=[1]), "reward_args must be a mapping"),
                    (dict(reward="test_blackbox.brightness", weight=float("nan")), "weight must be a finite")):
        with pytest.raises(ValueError, match=msg):
            BlackBoxReward(**kw)


def test_blackbox_evaluator_verdict_is_the_evaluators_argmax():
    """The shapes demo's reward: 1 exactly where the shipped evaluator's most likely shape is the prompt's target
    (and its probability reaches the threshold)."""
    from doodl_lightning.shapes import ShapesWeights
    from doodl_lightning.shapes.data import SHAPES
    from doodl_lightning.shapes.verdict import EvaluatorVerdict

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["p", "q"] * 3
    targets = {"p": "triangle", "q": "circle"}
    out = ShapesWeights().evaluator()(images)
    want = torch.tensor([SHAPES.index(targets[p]) for p in prompts])
    torch.testing.assert_close(EvaluatorVerdict(targets)(images, prompts), (out["shape"] == want).float())
    prob = out["shape_probs"][torch.arange(6), want]
    torch.testing.assert_close(EvaluatorVerdict(targets, threshold=0.6)(images, prompts),
                               ((out["shape"] == want) & (prob >= 0.6)).float())
    for kw, msg in ((dict(targets={"p": "blob"}), "unknown target shape 'blob'"), (dict(targets={}), "targets must"),
                    (dict(targets=targets, threshold=1.5), "threshold must be in")):
        with pytest.raises(ValueError, match=msg):
            EvaluatorVerdict(**kw)
    with pytest.raises(ValueError, match="prompt 'r' has no target"):
        EvaluatorVerdict(targets)(images[:1], ["r"])


# -- DNO ----------------------------------------------------------------------------------------------------------
def _dno(pipe, guidance=None, **kw):
    from doodl_lightning.guidance import BlackBoxReward
    from doodl_lightning.zeroth_order import DNO

    return DNO(**{**dict(model=pipe, prompts=PROMPTS, seeds=[1, 2], steps=2, guidance_scale=3.0, sampler="ddim",
                         directions=2, mu=0.5, guidance=guidance or [BlackBoxReward("test_blackbox.brightness")]),
                  **kw})


def test_blackbox_dno_step_is_the_estimate_rebuilt_from_plain_evaluations(backbone, tmp_path):
    """One SGD step (lr, no momentum, no clipping, no renormalisation) moves each item's noise by -lr x the central
    differences of the reward over its own directions (stream 8 of its (seed, step) generator), each probe scored
    by a plain DOODL module; the hybrid adds hybrid_weight x the exact gradient of the differentiable
    term (DOODL's checkpointed backward on that term alone)."""
    from doodl_lightning.data import step_generator
    from doodl_lightning.guidance import BlackBoxReward, SymmetryGuidance
    from doodl_lightning.module import DOODL

    lr, mu, q = 0.1, 0.5, 2
    sgd = dict(update_rule="sgd", lr=lr, momentum=0.0, max_grad_norm=None, renormalize_latents=False)
    reward = BlackBoxReward("test_blackbox.brightness")
    common = dict(model=backbone, prompts=PROMPTS, seeds=[1, 2], steps=2, guidance_scale=3.0, sampler="ddim")
    plain = DOODL(**common, guidance=[reward]).prepare("cpu")
    z0 = plain.latents.detach().clone()

    def score(latents):
        return plain.evaluate_items(backward=False, latents=latents, step=0).total.double()

    u = torch.stack([torch.randn((q, *plain.latent_shape), generator=step_generator(it, 0, stream=8))
                     for it in plain.local_items])  # (items, q, C, h, w): each item's own directions
    expected = torch.zeros_like(z0)
    for i in range(q):  # probe i of every item at once (each item's loss depends on its own row only)
        slope = (score(z0 + mu * u[:, i, None]) - score(z0 - mu * u[:, i, None])) / (2 * mu)
        for j in range(len(plain.local_items)):
            expected[j] += float(slope[j]) * u[j, i] / q
    assert float(expected.abs().max()) > 0
    pure = _dno(backbone, [reward], **sgd)
    _trainer(1, tmp_path / "pure").fit(pure)
    torch.testing.assert_close(pure.latents.detach(), z0 - lr * expected, rtol=1e-5, atol=1e-6)

    exact_ref = DOODL(**common, guidance=[SymmetryGuidance()]).prepare("cpu")
    exact_ref.evaluate_items(backward=True, step=0)
    exact = exact_ref.latents.grad.detach()
    hybrid = _dno(backbone, [reward, SymmetryGuidance()], hybrid_weight=2.0, **sgd)
    _trainer(1, tmp_path / "hybrid").fit(hybrid)
    torch.testing.assert_close(hybrid.latents.detach(), z0 - lr * (expected + 2.0 * exact), rtol=1e-5, atol=1e-6)
    # the hybrid's evaluation scores both terms; the black box's part carries no gradient
    assert set(hybrid.last.terms) == {"blackbox", "symmetry"}


def test_blackbox_dno_repeats_per_item_resumes_and_counts_compute(backbone, tmp_path):
    """A run stopped after one step and resumed ends bit-identical to the uninterrupted run (Adam's state in the
    checkpoint, directions from (seed, step)): the same config gives the same latents; one item per micro-batch gives
    the same first step (an item's probes and directions are its own, whatever is batched beside it); compute per
    image and step: (2 q + 1) chains without gradient (pure), and one back-propagated recomputation more (hybrid),
    with 2 q + 1 evaluations of every guidance term."""
    from doodl_lightning.data import initial_noise
    from doodl_lightning.guidance import BlackBoxReward, SymmetryGuidance

    steps, q, chain = 2, 2, 2
    full = _dno(backbone)
    t = _trainer(steps, tmp_path / "full")
    t.fit(full)
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    assert (meter["unet_evaluations_per_image"], meter["unet_backprop_per_image"]) == (steps * (2 * q + 1) * chain, 0)
    assert meter["guidance_evaluations_per_image"] == steps * (2 * q + 1)
    start = torch.stack([initial_noise(it, full.latent_shape) for it in full.local_items])
    assert float((full.latents[:, 0] - start).abs().max()) > 1e-3, "the noise moved"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1, save_top_k=0)
    part = _dno(backbone)
    _trainer(steps, tmp_path / "part", [ckpt, StopAfter(1)]).fit(part)
    assert part.global_step == 1
    resumed = _dno(backbone)
    _trainer(steps, tmp_path / "part").fit(resumed, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.global_step == steps and torch.equal(resumed.latents, full.latents)
    alone = _dno(backbone, micro_batch=1)
    _trainer(1, tmp_path / "alone").fit(alone)
    torch.testing.assert_close(alone.latents, part.latents, rtol=1e-4, atol=1e-5)
    hybrid = _dno(backbone, [BlackBoxReward("test_blackbox.brightness"), SymmetryGuidance()], hybrid_weight=1.0)
    t = _trainer(1, tmp_path / "hybrid")
    t.fit(hybrid)
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    assert (meter["unet_evaluations_per_image"], meter["unet_backprop_per_image"]) == ((2 * q + 2) * chain, chain)
    assert meter["guidance_evaluations_per_image"] == 2 * (2 * q + 1)  # two terms


def test_blackbox_dno_refuses_bad_settings(backbone):
    from doodl_lightning.guidance import BlackBoxReward, SymmetryGuidance
    from doodl_lightning.zeroth_order import DNO

    for kw, msg in ((dict(directions=0), "directions must be an integer >= 1"), (dict(mu=0.0), "mu must be > 0"),
                    (dict(mu=float("inf")), "mu must be a finite"), (dict(hybrid_weight=-1.0), "hybrid_weight must be >= 0"),
                    (dict(opt_t=2), "drop opt_t"), (dict(update_rule="rmsprop"), "unknown update_rule")):
        with pytest.raises(ValueError, match=msg):
            DNO(prompts=["a"], guidance=[torch.nn.Identity()], **kw)
    bb, sym = BlackBoxReward("test_blackbox.brightness"), SymmetryGuidance()
    for kw, msg in ((dict(guidance=[sym], hybrid_weight=1.0), "no guidance term is a black box"),
                    (dict(guidance=[bb], hybrid_weight=1.0), "every guidance term is a black box"),
                    (dict(guidance=[bb], sampler="edict", tied_latents=False), "set tied_latents: true")):
        with pytest.raises(ValueError, match=msg):
            _dno(backbone, **kw)


def test_blackbox_dno_fits_through_the_cli(tiny_pipeline_dir, tmp_path):
    """``cli.py fit`` with a DNO model and a black-box reward named by its dotted path, on the model's own sampler
    (EDICT: a pair, 2 UNet evaluations per step): results and compute written; the pure form back-propagates
    nothing; compute = (2 q + 1) chains per step + the final image's chain."""
    from cli import run_cli

    out = tmp_path / "o"
    cfg = {"trainer": {"max_steps": 1, "default_root_dir": str(out), "accelerator": "cpu", "devices": 1,
                       "enable_progress_bar": False, "enable_model_summary": False,
                       "callbacks": [{"class_path": "callbacks.ResultsWriter"}]},
           "model": {"class_path": "doodl_lightning.zeroth_order.DNO",
                     "init_args": {"model": tiny_pipeline_dir, "prompts": PROMPTS, "seeds": [0], "steps": 2,
                                   "guidance_scale": 3.0, "directions": 1, "mu": 0.5,
                                   "guidance": [{"class_path": "doodl_lightning.guidance.BlackBoxReward",
                                                 "init_args": {"reward": "test_blackbox.brightness"}}]}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli(["fit", "--config", str(path)]) == 0
    compute = json.loads(next(out.rglob("compute.json")).read_text())
    edict_chain = 2 * 2
    assert compute["unet_evaluations_per_image"] == 3 * edict_chain + edict_chain
    assert compute["unet_backprop_per_image"] == 0
    rows = [json.loads(line) for line in next(out.rglob("results.jsonl")).read_text().splitlines()]
    assert len(rows) == 2 and all("best_loss" in r for r in rows)


def test_blackbox_demo_runs_both_methods_at_equal_unet_evaluations(tmp_path):
    """The shapes demo on one prompt (2 items), 2-step chains, one DNO step: best-of-N gets N = DNO's chains per
    image, so both spend the same UNet evaluations; step 0 of both is the seed noise; the JSON has every row."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "blackbox_demo.py"
    spec = importlib.util.spec_from_file_location("blackbox_demo", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo.json"
    assert demo.main(["--prompts", "1", "--chain-steps", "2", "--max-steps", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    unguided, bon, dno = rec["rows"]
    assert rec["items"] == 2 and bon["method"] == "best-of-5"
    assert bon["unet_evaluations_per_image"] == dno["unet_evaluations_per_image"] == 5 * 2
    assert bon["unet_backprop_per_image"] == dno["unet_backprop_per_image"] == 0
    assert unguided["evaluator_target"] == bon["curve"][0]["evaluator_target"]
    assert bon["evaluator_target"] >= unguided["evaluator_target"]  # best-of-N keeps its best verdict
