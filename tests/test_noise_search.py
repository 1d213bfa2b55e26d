"""Best-of-N search and the alternative updates (adam, sgd): the cheaper rivals DOODL is measured against."""
from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback

from cli import main

BEST_OF_N = ["--model", "doodl_lightning.best_of_n.BestOfN"]


@pytest.fixture
def fit(tmp_path, tiny_pipeline_dir, write_config):
    def run(name="run", extra=(), **kw):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_pipeline_dir, out, **kw)
        return main(["fit", "--config", cfg, *extra]), out

    return run


def reference_losses(cli, candidates: int) -> torch.Tensor:
    """(candidates, items) guidance losses, each candidate sampled by a plain DOODL module set up without a
    Trainer whose latents are overwritten with that candidate's noise (the search's own bookkeeping unused)."""
    from doodl_lightning.best_of_n import candidate_noise
    from doodl_lightning.module import DOODL

    hp = {k: v for k, v in cli.model.hparams.items() if k not in ("model", "candidates") and not k.startswith("_")}
    ref = DOODL(model=cli.model.backbone, guidance=list(cli.model.guidance), **hp).prepare("cpu")
    rows = []
    for k in range(candidates):
        z = torch.stack([candidate_noise(it, k, ref.latent_shape) for it in ref.local_items])
        ref.latents.data = z.unsqueeze(1).expand_as(ref.latents).clone()
        ref._final = None
        rows.append(ref.final_evaluation().total.detach())
    return torch.stack(rows)


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("edict", marks=pytest.mark.slow)])
def test_best_of_n_keeps_the_candidate_the_guidance_scores_best(fit, sampler):
    n = 4
    cli, out = fit("bon", steps=n, sampler=sampler, extra=[*BEST_OF_N, "--model.candidates", str(n)])
    assert cli.trainer.global_step == n
    losses = reference_losses(cli, n)  # (n, items)
    best, winner = losses.min(dim=0)
    assert len(set(winner.tolist())) > 1 or n == 1, "a test where one candidate always wins cannot tell much"
    from doodl_lightning.best_of_n import candidate_noise

    for j, it in enumerate(cli.model.local_items):
        kept = cli.model.latents.detach()[j, 0]
        assert torch.equal(kept, candidate_noise(it, int(winner[j]), cli.model.latent_shape))
    torch.testing.assert_close(cli.model.best_loss.float(), best.float(), rtol=1e-5, atol=1e-6)
    records = [json.loads(x) for x in next(out.rglob("results.jsonl")).read_text().splitlines()]
    for r in records:
        assert r["best_step"] == int(winner[r["index"]])
        assert r["best_loss"] == pytest.approx(float(best[r["index"]]), rel=1e-5)
        assert r["initial_loss"] == pytest.approx(float(losses[0, r["index"]]), rel=1e-5)
        assert r["final_loss"] == pytest.approx(r["best_loss"], rel=1e-5)  # the kept noise, re-sampled


@pytest.mark.slow  # fast twin: test_best_of_one_is_the_seed_noise_doodl_starts_from
def test_best_of_one_is_the_unguided_sample_doodl_starts_from(fit):
    bon, _ = fit("bon1", steps=1, extra=[*BEST_OF_N, "--model.candidates", "1"])
    doodl, _ = fit("doodl", steps=1)
    # DOODL's first evaluation is of its initial noise, before any update
    torch.testing.assert_close(bon.model.last.images, doodl.model.last.images, rtol=0, atol=0)


class StopAfter(Callback):
    """Ends the fit after ``steps`` steps, as a kill would (``class_path: test_noise_search.StopAfter``)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


@pytest.mark.slow  # fast twin: test_best_of_n_edict_pairs_and_checkpointed_best
def test_best_of_n_resumes_to_the_uninterrupted_result(fit):
    full, _ = fit("full", steps=4, extra=[*BEST_OF_N, "--model.candidates", "4"])
    callbacks = [{"class_path": "test_noise_search.StopAfter", "init_args": {"steps": 2}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0}}]
    part, out = fit("part", steps=4, callbacks=callbacks, extra=[*BEST_OF_N, "--model.candidates", "4"])
    assert part.trainer.global_step == 2
    ckpt = next(out.rglob("last.ckpt"))
    resumed, _ = fit("part", steps=4, extra=[*BEST_OF_N, "--model.candidates", "4", "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 4
    assert torch.equal(full.model.latents, resumed.model.latents)
    assert torch.equal(full.model.best_loss, resumed.model.best_loss)


def test_best_of_n_edict_pairs_and_checkpointed_best(tiny_pipeline_dir):
    """Default-suite twins of two slow tests. The resume test: the kept candidate's loss is saved with the latents
    (the kept noise), so a resumed search compares later candidates with the best found before the interruption (a
    best reset to inf would let the next, worse candidate replace it). The EDICT search: each candidate is a pair
    (x, y) both equal to its noise, as DOODL's own start."""
    from doodl_lightning.best_of_n import BestOfN, candidate_noise
    from doodl_lightning.guidance import SymmetryGuidance

    m = BestOfN(model=tiny_pipeline_dir, prompts=["a red circle"], seeds=[0, 1], steps=2, candidates=2,
                sampler="edict", guidance=[SymmetryGuidance()]).prepare()
    m.best_loss.fill_(0.5)
    state = m.state_dict()
    assert {"latents", "best_loss"} <= set(state) and torch.equal(state["best_loss"], m.best_loss)
    z = m.candidate(1)
    assert z.shape == m.latents.shape and z.shape[1] == 2
    for j, it in enumerate(m.local_items):
        assert torch.equal(z[j, 0], candidate_noise(it, 1, m.latent_shape)) and torch.equal(z[j, 1], z[j, 0])


def test_best_of_one_is_the_seed_noise_doodl_starts_from():
    """The default-suite twin of the slow best-of-one test: candidate 0 is the item's own initial noise."""
    from doodl_lightning.best_of_n import candidate_noise
    from doodl_lightning.data import Item, initial_noise

    for it in (Item(0, "a", 0), Item(3, "b", 7)):
        assert torch.equal(candidate_noise(it, 0, (4, 8, 8)), initial_noise(it, (4, 8, 8)))
        assert not torch.equal(candidate_noise(it, 1, (4, 8, 8)), initial_noise(it, (4, 8, 8)))


def test_best_of_n_refuses_too_few_steps_and_bad_counts(fit):
    with pytest.raises(ValueError, match="max_steps .*below model.candidates"):
        fit("few", steps=2, extra=[*BEST_OF_N, "--model.candidates", "4"])
    from doodl_lightning.best_of_n import BestOfN

    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        BestOfN(candidates=0, prompts=["a"], guidance=[torch.nn.Identity()])


# -- alternative updates ------------------------------------------------------------------------------------
def test_per_item_clipping_does_not_let_one_item_shrink_another():
    from doodl_lightning.optim import PerItemSGD

    p = torch.zeros(2, 2, 3, 4, 4, requires_grad=True)
    grad = torch.ones_like(p)
    grad[0] *= 1000.0  # one item with a huge gradient, one with a small one (norm 0.07 per latent)
    grad[1] *= 0.01
    p.grad = grad.clone()
    PerItemSGD([p], lr=1.0, momentum=0.0, nesterov=False, max_grad_norm=1.0, tied_latents=True).step()
    step = -p.detach()
    # item 0 clipped to norm 1 (per latent pair: the tied gradient spread over the pair), item 1 untouched
    assert step[0].flatten().norm() == pytest.approx(2 ** 0.5, rel=1e-5)  # each of the 2 tied latents has norm 1
    torch.testing.assert_close(step[1], torch.full_like(step[1], 0.01))
    assert torch.equal(p[:, 0], p[:, 1])  # the pair stays tied


def test_per_item_sgd_equals_torch_sgd_on_the_tied_clipped_gradient():
    from doodl_lightning.optim import PerItemSGD

    torch.manual_seed(0)
    p0 = torch.randn(3, 2, 4, 2, 2, dtype=torch.float64)  # float64: the clip's + 1e-6 shows above rounding
    grads = [torch.randn_like(p0) * s for s in (1.0, 5.0, 0.1)]
    ours = p0.clone().requires_grad_()
    ref = p0.clone().requires_grad_()
    opt = PerItemSGD([ours], lr=0.1, momentum=0.9, nesterov=True, max_grad_norm=2.0, tied_latents=True)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True)
    for g in grads:
        ours.grad = g.clone()
        opt.step()
        t = g.mean(dim=1, keepdim=True).expand_as(g).clone()  # tied: the pair's mean gradient
        for latent in t.flatten(0, 1):  # torch's own norm clip on each latent alone (ReNO clips with it)
            leaf = torch.zeros_like(latent, requires_grad=True)
            leaf.grad = latent.clone()
            torch.nn.utils.clip_grad_norm_(leaf, 2.0)
            latent.copy_(leaf.grad)
        ref.grad = t
        ref_opt.step()
        with torch.no_grad():
            ref.copy_(ref.mean(dim=1, keepdim=True).expand_as(ref))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("update", ["adam", "sgd"])
def test_alternative_updates_run_from_yaml_and_lower_the_loss(fit, update):
    cli, out = fit(update, steps=3, update_rule=update, lr=0.05, max_grad_norm=10.0, use_nesterov=True,
                 perturb_grad_scale=0.0, prompts=["a red circle"], seeds=[0])
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == {"adam": "PerItemAdam", "sgd": "PerItemSGD"}[update]
    (record,) = [json.loads(x) for x in next(out.rglob("results.jsonl")).read_text().splitlines()]
    assert record["final_loss"] < record["initial_loss"]


def test_compute_meter_counts_what_each_search_spends(fit):
    """compute.json against the analytic count: best-of-N = N chains without gradient; DOODL (checkpoint) =
    per step one chain without gradient + one recomputed with gradient, plus the final evaluation."""
    S, n = 4, 3  # write_config's model.steps; optimisation steps / candidates
    _, out = fit("bon", steps=n, sampler="ddim", extra=[*BEST_OF_N, "--model.candidates", str(n)])
    bon = json.loads(next(out.rglob("compute.json")).read_text())
    assert (bon["unet_evaluations_per_image"], bon["unet_backprop_per_image"]) == (n * S + S, 0)  # + the final evaluation
    assert bon["guidance_evaluations_per_image"] == n + 1 and bon["steps"] == n and bon["seconds"] > 0
    _, out = fit("doodl", steps=n, sampler="ddim", backprop="checkpoint")
    d = json.loads(next(out.rglob("compute.json")).read_text())
    assert (d["unet_evaluations_per_image"], d["unet_backprop_per_image"]) == ((2 * n + 1) * S, n * S)
