"""Zero-order search and search-then-refine: what each step evaluates, what is kept, determinism, resume and the
compute each spends (FK steering's tests are ``test_particles.py``)."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from test_noise_search import StopAfter
from test_particles import _trainer

PROMPTS = ["a red circle", "a blue square"]


class Record(Callback):
    """Each step's evaluated reward losses (items,) and the latents after it."""

    def __init__(self):
        self.losses, self.latents = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(pl_module.last.reward.detach().double().clone())
        self.latents.append(pl_module.latents.detach().clone())


def _guide():
    from doodl_lightning.guidance import SymmetryGuidance

    return [SymmetryGuidance()]


def _zero_order(pipe, **kw):
    from doodl_lightning.zero_order import ZeroOrderSearch

    return ZeroOrderSearch(**{**dict(model=pipe, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0,
                                     sampler="ddim", neighbours=2, radius=0.7, guidance=_guide()), **kw})


def test_neighbour_keeps_noise_standard_and_tends_to_a_fresh_draw():
    from doodl_lightning.zero_order import neighbour

    g = torch.Generator().manual_seed(0)
    pivot, d = torch.randn(2, 200_000, generator=g), torch.randn(2, 200_000, generator=g)
    for r in (0.1, 1.0, 3.0):
        assert float(neighbour(pivot, d, r).std()) == pytest.approx(1.0, abs=0.01)
    torch.testing.assert_close(neighbour(pivot, d, 1e6), d, rtol=0, atol=1e-5)
    assert float(torch.nn.functional.cosine_similarity(neighbour(pivot, d, 0.1), pivot).min()) > 0.99


def test_zero_order_search_climbs_from_the_seed_noise(tiny_pipeline_dir, tmp_path):
    """Step 0 evaluates the seed noise; step s a neighbour of the pivot in direction candidate_noise(s); the pivot
    moves to the best noise so far after every ``neighbours`` steps; each item keeps its lowest reward loss. The
    same config gives the same latents bit for bit, a resume mid-round ends bit-identical, and the compute is one
    chain and one guidance evaluation per step."""
    from doodl_lightning.best_of_n import candidate_noise
    from doodl_lightning.data import initial_noise
    from doodl_lightning.zero_order import neighbour

    steps = 5
    rec = Record()
    m = _zero_order(tiny_pipeline_dir)
    t = _trainer(steps, tmp_path / "full", [rec])
    t.fit(m)
    losses = torch.stack(rec.losses)  # (steps, items)
    torch.testing.assert_close(m.best_loss, losses.min(0).values, rtol=0, atol=0)
    # replay the climb from the recorded losses: pivot = seed noise, moved at steps 3 and 5 (after rounds of 2)
    for j, it in enumerate(m.local_items):
        pivot = initial_noise(it, m.latent_shape)
        best, kept = float("inf"), None
        for s in range(steps):
            if s > 1 and (s - 1) % 2 == 0:
                pivot = kept
            z = pivot if s == 0 else neighbour(pivot, candidate_noise(it, s, m.latent_shape), 0.7)
            if float(losses[s, j]) < best:
                best, kept = float(losses[s, j]), z
        assert torch.equal(m.latents[j, 0], kept), f"item {j}"
    assert len({int(x) for x in losses.argmin(0)}) > 1 or float(losses.min(0).values.max()) < float(losses[0].max()), \
        "the search found nothing better than the seed noise for any item: the test would not see a wrong climb"
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    assert (meter["unet_evaluations_per_image"], meter["unet_backprop_per_image"]) == (steps * 4, 0)
    assert meter["guidance_evaluations_per_image"] == steps
    again = _zero_order(tiny_pipeline_dir)
    _trainer(steps, tmp_path / "again").fit(again)
    assert torch.equal(again.latents, m.latents)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1, save_top_k=0)
    part = _zero_order(tiny_pipeline_dir)
    _trainer(steps, tmp_path / "part", [ckpt, StopAfter(4)]).fit(part)  # mid-round: the pivot moved at step 3
    resumed = _zero_order(tiny_pipeline_dir)
    _trainer(steps, tmp_path / "part").fit(resumed, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.global_step == steps
    assert torch.equal(resumed.latents, m.latents) and torch.equal(resumed.pivot, m.pivot)
    assert torch.equal(resumed.best_loss, m.best_loss)


def test_zero_order_refuses_bad_settings():
    from doodl_lightning.zero_order import ZeroOrderSearch

    for kw, msg in ((dict(neighbours=0), "neighbours must be"), (dict(radius=0.0), "radius must be"),
                    (dict(opt_t=2), "drop opt_t")):
        with pytest.raises(ValueError, match=msg):
            ZeroOrderSearch(prompts=["a"], guidance=[torch.nn.Identity()], **kw)


# -- search then refine ------------------------------------------------------------------------------------------
def _refine(pipe, **kw):
    from doodl_lightning.search_refine import SearchThenRefine

    return SearchThenRefine(**{**dict(model=pipe, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0,
                                      sampler="ddim", candidates=3, grad_scale=20.0, clip_grad_val=0.01,
                                      guidance=_guide()), **kw})


def test_search_then_refine_is_best_of_k_then_doodl_from_the_winner(tiny_pipeline_dir, tmp_path):
    """The first K steps score best-of-N's candidates (the same losses as BestOfN) and keep the best; the rest are
    DOODL updates from it: the same latents as a DOODL run whose start is that winner (renormalised to the
    winner's norm). Compute: K chains without gradient, then per DOODL iteration one chain and its checkpointed
    recomputation (back-propagated). A resume in the search phase and one in the refine phase end bit-identical."""
    from doodl_lightning.best_of_n import BestOfN
    from doodl_lightning.module import DOODL

    K, iters = 3, 2
    m = _refine(tiny_pipeline_dir)
    t = _trainer(K + iters, tmp_path / "full")
    t.fit(m)
    bon = BestOfN(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0, sampler="ddim",
                  candidates=K, guidance=_guide()).prepare("cpu")
    cand = [bon.candidate(c) for c in range(K)]
    losses = torch.stack([bon.evaluate_items(False, z, step=0).reward for z in cand]).double()
    torch.testing.assert_close(m.best_loss, losses.min(0).values, rtol=1e-6, atol=0)
    winner = torch.stack([cand[int(c)][j] for j, c in enumerate(losses.argmin(0))])
    assert len({int(c) for c in losses.argmin(0)}) > 1 or int(losses.argmin(0)[0]) != 0, \
        "candidate 0 always wins: the test would not tell search from no search"

    class FromWinner(DOODL):
        def on_fit_start(self):
            super().on_fit_start()
            self.latents.data = winner.clone()
            self.initial_norm.copy_(winner[:, 0].double().flatten(1).norm(dim=1))

    ref = FromWinner(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0,
                     sampler="ddim", grad_scale=20.0, clip_grad_val=0.01, guidance=_guide())
    _trainer(iters, tmp_path / "ref").fit(ref)
    torch.testing.assert_close(m.latents, ref.latents, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m.latents, winner), "DOODL did not move the winner"
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    S = 4
    assert (meter["unet_evaluations_per_image"], meter["unet_backprop_per_image"]) == (K * S + iters * 2 * S, iters * S)
    for stop in (2, K + 1):  # mid-search, mid-refine
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ck{stop}", save_last=True, every_n_train_steps=1, save_top_k=0)
        part = _refine(tiny_pipeline_dir)
        _trainer(K + iters, tmp_path / f"part{stop}", [ckpt, StopAfter(stop)]).fit(part)
        resumed = _refine(tiny_pipeline_dir)
        _trainer(K + iters, tmp_path / f"part{stop}").fit(resumed, ckpt_path=str(tmp_path / f"ck{stop}" / "last.ckpt"))
        assert torch.equal(resumed.latents, m.latents), f"resumed after step {stop}"
        assert torch.equal(resumed.best_loss, m.best_loss)


# -- population DOODL --------------------------------------------------------------------------------------------
def _population(pipe, **kw):
    from doodl_lightning.population import PopulationDOODL

    return PopulationDOODL(**{**dict(model=pipe, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0,
                                     sampler="ddim", members=3, exchange_every=1, radius=0.5, grad_scale=20.0,
                                     clip_grad_val=0.01, guidance=_guide()), **kw})


def test_population_doodl_of_one_member_is_doodl(tiny_pipeline_dir, tmp_path):
    from doodl_lightning.module import DOODL

    pop = _population(tiny_pipeline_dir, members=1)
    _trainer(3, tmp_path / "pop").fit(pop)
    ref = DOODL(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0, sampler="ddim",
                grad_scale=20.0, clip_grad_val=0.01, guidance=_guide())
    _trainer(3, tmp_path / "ref").fit(ref)
    assert torch.equal(pop.population, ref.latents)  # the same updates, perturbations and renormalisation
    assert not torch.equal(pop.population, pop.latents)  # latents: the member as the last step showed it


def test_population_doodl_replaces_the_worst_member_near_the_best(tiny_pipeline_dir, tmp_path):
    """Step 0 evaluates best-of-N's first 3 candidates per item (the same reward losses as BestOfN), shows the best
    one, updates every member, then restarts the worst member at neighbour(best member after its update, direction
    of (seed, step 0, stream 7)) with its momentum cleared. A resume across an exchange ends bit-identical; compute
    = members x (one chain + its checkpointed recomputation) per step."""
    from doodl_lightning.best_of_n import BestOfN
    from doodl_lightning.data import step_generator
    from doodl_lightning.zero_order import neighbour

    m = _population(tiny_pipeline_dir)
    t = _trainer(1, tmp_path / "one")
    t.fit(m)
    bon = BestOfN(model=tiny_pipeline_dir, prompts=PROMPTS, seeds=[1, 2], steps=4, guidance_scale=3.0, sampler="ddim",
                  candidates=3, guidance=_guide()).prepare("cpu")
    cand = [bon.candidate(c) for c in range(3)]
    losses = torch.stack([bon.evaluate_items(False, z, step=0).reward for z in cand], dim=1)  # (items, 3)
    torch.testing.assert_close(m.member_losses.float(), losses.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.last.reward.float(), losses.min(1).values.float(), rtol=1e-5, atol=1e-6)
    momentum = t.optimizers[0].state[m.population]["momentum_buffer"]
    for j, it in enumerate(m.local_items):
        best, worst = int(losses[j].argmin()), int(losses[j].argmax())
        assert torch.equal(m.latents[j], cand[best][j])
        d = torch.randn(m.latent_shape, generator=step_generator(it, 0, stream=7))
        torch.testing.assert_close(m.population[3 * j + worst, 0], neighbour(m.population[3 * j + best, 0], d, 0.5),
                                   rtol=0, atol=0)
        assert not bool(momentum[3 * j + worst].any()) and bool(momentum[3 * j + best].any())
    meter = next(c for c in t.callbacks if type(c).__name__ == "ComputeMeter").last
    assert (meter["unet_evaluations_per_image"], meter["unet_backprop_per_image"]) == (3 * 2 * 4, 3 * 4)
    full = _population(tiny_pipeline_dir)
    _trainer(3, tmp_path / "full").fit(full)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1, save_top_k=0)
    part = _population(tiny_pipeline_dir)
    _trainer(3, tmp_path / "part", [ckpt, StopAfter(1)]).fit(part)
    resumed = _population(tiny_pipeline_dir)
    _trainer(3, tmp_path / "part").fit(resumed, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(resumed.population, full.population) and torch.equal(resumed.latents, full.latents)
