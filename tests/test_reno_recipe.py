"""ReNO's recipe in the framework: the noise-norm regulariser on the latents, held-out metrics,
SGD-Nesterov with per-item clipping from YAML, and the shapes-world reward ensemble end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback

from cli import main
from doodl_lightning.guidance import NoiseNormRegularizer, SymmetryGuidance
from doodl_lightning.guidance.noise_norm import chi_nll
from doodl_lightning.objective import evaluate, weighted_guidance
from doodl_lightning.sampling import Denoiser, Schedule
from doodl_lightning.testing.tiny import CROSS_DIM, sd_scheduler, tiny_unet


# -- 1. the regulariser ---------------------------------------------------------------------------------------
def closed_form_grad(z: torch.Tensor, weight: float) -> torch.Tensor:
    """d/dz of weight * (0.5 r^2 - (d-1) log r), r = |z| per item, by hand: weight * z * (1 - (d-1) / r^2)."""
    d = z[0].numel()
    r2 = z.flatten(1).pow(2).sum(1).view(-1, *[1] * (z.dim() - 1))
    return weight * z * (1 - (d - 1) / r2)


def test_noise_norm_value_and_gradient_are_renos_closed_form():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64).view(3, 1, 1, 1)  # norms below, near and above the mode
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * scale
    reg = NoiseNormRegularizer(weight=0.01)
    assert reg.needs_latents and reg.name == "noise_norm" and reg.weight == 0.01
    leaf = z.clone().requires_grad_()
    images = torch.zeros(3, 3, 16, 16, dtype=torch.float64)
    value = reg(images, latents=leaf)
    (grad,) = torch.autograd.grad((reg.weight * value).sum(), leaf)
    assert torch.allclose(grad, closed_form_grad(z, 0.01), rtol=1e-12, atol=1e-15)
    # the value is ReNO's expression (trainer.py) up to the constant that makes it 0 at the mode r^2 = d - 1
    d = 256
    r = z.flatten(1).norm(dim=1)
    reno = 0.5 * r**2 - (d - 1) * torch.log(r)
    assert torch.allclose(value, reno - 0.5 * (d - 1) * (1 - math.log(d - 1)), rtol=1e-12)
    mode = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    mode = mode / mode.norm() * math.sqrt(d - 1)
    assert abs(float(chi_nll(mode))) < 1e-9 and (value > 0).all()
    # the images are not looked at, and a caller scoring images only gets a one-line error naming the term
    assert torch.equal(reg(images + 1, latents=z), reg(images, latents=z))
    with pytest.raises(ValueError, match="noise_norm .*scores the initial latents.*drop noise_norm"):
        reg(images)


def _toy_chain(sampler: str, steps: int = 2):
    """A tiny random UNet (float64), its schedule and a 'decoder' taking the first 3 latent channels as the image."""
    g = torch.Generator().manual_seed(7)
    cond = torch.randn(2, 5, CROSS_DIM, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 5, CROSS_DIM, generator=g, dtype=torch.float64)
    eps = Denoiser(tiny_unet(torch.float64, 0), cond=cond, uncond=uncond, guidance_scale=3.0)
    schedule = Schedule.from_scheduler(sd_scheduler(), steps, "model")
    return eps, schedule, (lambda lat: lat[:, :3].tanh())


@pytest.mark.parametrize("sampler,backprop,first_only", [
    ("ddim", "checkpoint", False), ("ddim", "autograd", False),
    ("edict", "checkpoint", False), ("edict", "autograd", True),
])
def test_gradient_with_the_regulariser_is_the_chains_plus_the_closed_form(sampler, backprop, first_only):
    """d(total)/dz = the chain's gradient (a run without the term) + weight x R'(z), added once; with EDICT each
    scored image's own initial latent gets the term (y too, unless only x_0's image is optimised)."""
    eps, schedule, decode = _toy_chain(sampler)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y0 = z0 + 0.05 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = 0.3
    grads, totals = [], []
    for guidance in ([SymmetryGuidance()], [SymmetryGuidance(), NoiseNormRegularizer(weight=w)]):
        z = z0.clone().requires_grad_()
        y = y0.clone().requires_grad_() if sampler == "edict" else None
        ev = evaluate(eps, z, schedule, decode, weighted_guidance(guidance, ["a", "b"], None), sampler=sampler,
                      backprop=backprop, y=y, first_image_only=first_only)
        grads.append((z.grad.clone(), None if y is None else y.grad.clone()))
        totals.append(ev)
    (gz, gy), (gz_reg, gy_reg) = grads
    assert gz.abs().max() > 0
    assert torch.allclose(gz_reg - gz, closed_form_grad(z0, w), rtol=1e-9, atol=1e-12)
    if sampler == "edict":
        expect_y = torch.zeros_like(y0) if first_only else closed_form_grad(y0, w)
        assert torch.allclose(gy_reg - gy, expect_y, rtol=1e-9, atol=1e-12)
    # the term is logged and enters the total (the mean over the scored images, as every term)
    plain, reg = totals
    starts = [z0] if sampler == "ddim" or first_only else [z0, y0]
    expect = sum(chi_nll(s) for s in starts) / len(starts)
    assert torch.allclose(reg.terms["noise_norm"], expect, rtol=1e-12)
    assert torch.allclose(reg.total, plain.total + w * expect, rtol=1e-12)
    assert torch.equal(reg.images, plain.images)


# -- 2. held-out metrics --------------------------------------------------------------------------------------
class GradRecorder(Callback):
    """``class_path: test_reno_recipe.GradRecorder``: the latents' gradient of every step."""

    def __init__(self):
        self.grads = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grads.append(pl_module.latents.grad.detach().clone())


@pytest.fixture
def fit(tmp_path, tiny_pipeline_dir, write_config):
    def run(name, callbacks=None, **kw):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_pipeline_dir, out, callbacks=callbacks, **kw)
        return main(["fit", "--config", cfg]), out / "lightning_logs/version_0"

    return run


def _clip(tiny_clip, **kw):
    return {"class_path": "doodl_lightning.guidance.CLIPTextGuidance",
            "init_args": {"model_config": str(tiny_clip.config), "pretrained": str(tiny_clip.weights), "num_cuts": 2,
                          **kw}}


def test_held_out_metrics_are_logged_and_never_optimised(fit, tiny_clip):
    callbacks = [{"class_path": "callbacks.ResultsWriter"}, {"class_path": "test_reno_recipe.GradRecorder"},
                 {"class_path": "callbacks.ImageLogger", "init_args": {"every_n_steps": 1}}]
    guidance = [_clip(tiny_clip, prompt="a green star")]  # random cutouts: the metrics must not touch its draws
    metrics = [_clip(tiny_clip, name="held_clip"), {"class_path": "doodl_lightning.guidance.SymmetryGuidance",
                                                    "init_args": {"name": "held_symmetry"}}]
    plain, run_plain = fit("plain", callbacks=callbacks, steps=3, guidance=guidance)
    cli, run = fit("metrics", callbacks=callbacks, steps=3, guidance=guidance, metrics=metrics)
    grads = [c for c in cli.trainer.callbacks if isinstance(c, GradRecorder)][0].grads
    grads_plain = [c for c in plain.trainer.callbacks if isinstance(c, GradRecorder)][0].grads
    assert len(grads) == 3 and all(torch.equal(a, b) for a, b in zip(grads, grads_plain))
    assert torch.equal(cli.model.latents, plain.model.latents)
    assert [n for n, p in cli.model.named_parameters() if p.requires_grad] == ["latents"]
    # results.jsonl: initial / best / final values of each metric, measured on the item's image
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    final = cli.model.final_evaluation()
    m = cli.model
    for j, r in enumerate(records):
        for kind in ("initial", "best", "final"):
            assert set(r[f"{kind}_metrics"]) == {"held_clip", "held_symmetry"}, kind
        sym = m.metrics[1](final.images[j:j + 1])
        assert r["final_metrics"]["held_symmetry"] == pytest.approx(float(sym), rel=1e-6)
        assert r["final_metrics"]["held_clip"] == pytest.approx(float(final.metrics["held_clip"][j]), rel=1e-6)
        assert "held_clip" not in r["final_terms"]
    plain_records = [json.loads(x) for x in (run_plain / "results.jsonl").read_text().splitlines()]
    assert not any(k.endswith("_metrics") for r in plain_records for k in r)  # no metrics: no keys
    # TensorBoard: the mean under metrics/<name>, every item under items/metric_<name>/<prompt | seed>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("metrics/held_clip", "metrics/held_symmetry", "items/metric_held_clip/a red circle | seed 0"):
        assert tag in tags, tag
    assert len(acc.Scalars("metrics/held_symmetry")) == 4  # 3 steps + the final evaluation
    last = acc.Scalars("metrics/held_symmetry")[-1].value
    assert last == pytest.approx(float(final.metrics["held_symmetry"].mean()), rel=1e-5)
    assert (run / "contact_sheet.png").is_file()


def test_metric_names_and_roles_are_checked(tmp_path, tiny_pipeline_dir, write_config):
    def build(name, **kw):
        return main(["--config", write_config(tmp_path / f"{name}.yaml", tiny_pipeline_dir, tmp_path / name, **kw)],
                    run=False)

    sym = {"class_path": "doodl_lightning.guidance.SymmetryGuidance"}
    with pytest.raises(ValueError, match="metric name 'symmetry' is also a guidance name"):
        build("clash", metrics=[sym])
    reg = {"class_path": "doodl_lightning.guidance.NoiseNormRegularizer"}
    with pytest.raises(ValueError, match="soft alternative to renormalize_latents.*renormalize_latents: false"):
        build("renorm", guidance=[sym, reg])
    with pytest.raises(ValueError, match="metric noise_norm scores latents"):
        build("latmetric", metrics=[reg], renormalize_latents=False)
    ok = build("ok", guidance=[sym, reg], renormalize_latents=False, update_rule="sgd", lr=0.5, use_nesterov=True,
               max_grad_norm=0.1)
    assert ok.model.hparams.update_rule == "sgd" and [g.name for g in ok.model.guidance] == ["symmetry", "noise_norm"]


# -- 3./4. the recipe as configs ------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_shapes_reward_ensemble_runs_end_to_end_and_logs_the_held_out_metrics(tmp_path, monkeypatch):
    """experiments/reward_ensemble.yaml through cli.py (4 evaluations instead of 50): the ensemble + regulariser are
    optimised with SGD-Nesterov, the evaluator's held-out metrics land in results.jsonl and TensorBoard."""
    monkeypatch.chdir(ROOT)  # the config names the shipped weights relative to the repository
    cli = main(["fit", "--config", "experiments/reward_ensemble.yaml", "--trainer.max_steps", "3",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    m = cli.model
    assert m.hparams.update_rule == "sgd" and m.hparams.use_nesterov and m.hparams.max_grad_norm == 0.1
    assert not m.chain.start.renormalize and [g.name for g in m.guidance] == ["preference", "clip", "noise_norm"]
    assert type(cli.model.configure_optimizers()).__name__ == "PerItemSGD"
    run = tmp_path / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["steps"] == 3 for r in records)
    for r in records:
        assert set(r["final_terms"]) == {"preference", "clip", "noise_norm"}
        for kind in ("initial", "best", "final"):
            values = r[f"{kind}_metrics"]
            assert set(values) == {"evaluator_quality", "evaluator_prompt"} and all(map(math.isfinite, values.values()))
    # the optimised preference reward rose (its loss fell) for every item in 3 updates
    assert all(r["final_terms"]["preference"] < r["initial_terms"]["preference"] for r in records)
    # renormalisation off: the norms moved, under the regulariser's pull alone
    from doodl_lightning.data import initial_noise

    z0 = torch.stack([initial_noise(it, m.latent_shape) for it in m.local_items])
    assert not torch.allclose(m.latents.detach()[:, 0].flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]
    assert {"metrics/evaluator_quality", "metrics/evaluator_prompt", "train/loss_noise_norm"} <= set(tags)


def test_the_evaluator_metric_is_the_shipped_evaluator_and_refuses_to_guide(tmp_path, tiny_pipeline_dir, write_config):
    from doodl_lightning.shapes import ShapesWeights
    from doodl_lightning.shapes.data import make_batch
    from doodl_lightning.shapes.metrics import EvaluatorMetric, prompt_attributes

    _, images, captions = make_batch(11, 16)
    quality, prompt = EvaluatorMetric(), EvaluatorMetric(measure="prompt")
    assert torch.allclose(quality(images), 10 - ShapesWeights().evaluator()(images)["quality"], atol=1e-5)
    right = prompt(images, prompts=captions)
    wrong = prompt(images, prompts=["a purple star" if "star" not in c else "a purple circle" for c in captions])
    assert right.max() < 0.2 and wrong.min() > 0.4  # the renders show their captions, not the swapped prompts
    assert prompt_attributes("a small red polygon at the top left on a black background") == {
        "position": [0], "colour": [0], "size": [0], "background": [0], "shape": [1, 2, 3, 4]}
    with pytest.raises(ValueError, match="two objects"):
        prompt_attributes("a red star and a blue circle")
    cfg = write_config(tmp_path / "c.yaml", tiny_pipeline_dir, tmp_path / "c",
                       guidance=[{"class_path": "doodl_lightning.shapes.metrics.EvaluatorMetric"}])
    with pytest.raises(ValueError, match="evaluator_quality .*measurement only.*model.metrics"):
        main(["--config", cfg], run=False)


# -- 5. ReNO's loop beside the framework's -------------------------------------------------------------------
class LatentRecorder(Callback):
    """``class_path: test_reno_recipe.LatentRecorder``: the latents each step is evaluated at (before its update)."""

    def __init__(self):
        self.latents = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.latents.append(pl_module.latents.detach().clone())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


RENO_ITERS, RENO_LR, RENO_CLIP, RENO_REG = 8, 40.0, 0.01, 0.3


def test_sgd_recipe_is_renos_loop_with_clipping_and_best_by_reward(tmp_path, tiny_pipeline_dir, write_config):
    """``update_rule: sgd`` + ``use_nesterov`` + ``max_grad_norm`` + ``NoiseNormRegularizer`` is ReNO's loop
    (``official_reno.reno_train``, transcribed from ExplainableML/ReNO) on the framework's own float64 chain: every
    iteration's latents agree to 1e-8 (each step's displacement too) with the gradient clipped at every step, and
    ``results.jsonl``'s best iteration is ReNO's, the lowest reward loss, which here is not the lowest total loss.
    Fails if the clip's + 1e-6 is dropped (displacements differ by ~1e-6 / |g|) or the best goes by the total."""
    from official_reno import reno_optimizer, reno_train

    from doodl_lightning.data import initial_noise
    from doodl_lightning.sampling import sample

    guidance = [{"class_path": "doodl_lightning.guidance.SymmetryGuidance"},
                {"class_path": "doodl_lightning.guidance.NoiseNormRegularizer", "init_args": {"weight": RENO_REG}}]
    callbacks = [{"class_path": "callbacks.ResultsWriter"}, {"class_path": "test_reno_recipe.LatentRecorder"}]
    cfg = write_config(tmp_path / "reno.yaml", tiny_pipeline_dir, tmp_path / "reno", steps=RENO_ITERS - 1,
                       callbacks=callbacks, seeds=[0], sampler="ddim", guidance=guidance, renormalize_latents=False,
                       update_rule="sgd", lr=RENO_LR, use_nesterov=True, momentum=0.9, max_grad_norm=RENO_CLIP)
    cli = main(["fit", "--config", cfg, "--trainer.precision", "64-true", "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false"])
    m = cli.model
    seen = [c for c in cli.trainer.callbacks if isinstance(c, LatentRecorder)][0].latents + [m.latents.detach()]
    records = [json.loads(x) for x in (tmp_path / "reno/results.jsonl").read_text().splitlines()]
    symmetry = m.guidance[0]
    differs = 0
    for j, item in enumerate(m.local_items):
        def apply(z, j=j):
            (x0,) = sample(m.chain.denoiser([j]), z, m.chain.schedule, sampler="ddim", backprop="autograd")
            return m.backbone.decode(x0)

        z = initial_noise(item, m.latent_shape).double().unsqueeze(0).requires_grad_()
        ref = reno_train(z, item.prompt, apply, [("symmetry", lambda img, p: symmetry(img, prompts=[p])[0], 1.0)],
                         reno_optimizer(z, RENO_LR), RENO_ITERS, regularization_weight=RENO_REG, grad_clip=RENO_CLIP)
        # the clip is active at every step, so each step carries its factor
        assert min(ref["grad_norms"]) > RENO_CLIP, ref["grad_norms"]
        ours = [s[j:j + 1, 0] for s in seen]
        assert len(ours) == len(ref["latents"]) == RENO_ITERS
        for k in range(RENO_ITERS):
            assert _relative(ours[k], ref["latents"][k]) <= 1e-8, (j, k, _relative(ours[k], ref["latents"][k]))
            if k:
                step, ref_step = ours[k] - ours[k - 1], ref["latents"][k] - ref["latents"][k - 1]
                assert _relative(step, ref_step) <= 1e-8, (j, k, _relative(step, ref_step))
        # the best iteration: ReNO's lowest reward loss (regulariser excluded), not the lowest total
        r = records[j]
        assert r["best_step"] == ref["best_iteration"], (j, r["best_step"], ref["best_iteration"])
        assert r["best_reward_loss"] == pytest.approx(ref["best_rewards"]["total"], rel=1e-10)
        assert r["best_terms"]["symmetry"] == pytest.approx(ref["best_rewards"]["symmetry"], rel=1e-10)
        assert r["initial_reward_loss"] == pytest.approx(ref["initial_rewards"]["total"], rel=1e-10)
        by_total = min(range(RENO_ITERS), key=lambda k: ref["totals"][k])
        differs += by_total != ref["best_iteration"]
    assert differs, "the lowest total is the lowest reward loss for every item: the best-iteration rule is untested"
    # train/best_loss (TensorBoard, progress bar) follows the same iteration: the final evaluation joins it as
    # TensorBoardSummary.on_train_end does
    m.metric_logs(m.gathered_metrics(m.final_evaluation()))
    assert m.item_best_loss.tolist() == pytest.approx([r["best_loss"] for r in records], rel=1e-6)
    assert m.item_best_reward.tolist() == pytest.approx([r["best_reward_loss"] for r in records], rel=1e-6)


def test_reward_loss_leaves_out_the_regulariser_and_is_the_total_without_one():
    """``Evaluation.reward`` (what the best iteration, best-of-N and early stopping go by) is the weighted sum of the
    reward terms; with no regulariser it is the total itself, so a DOODL run chooses exactly as before."""
    from doodl_lightning.objective import Evaluation, check_guidance, reward_loss

    sym, reg = SymmetryGuidance(weight=2.0), NoiseNormRegularizer(weight=0.5)
    terms = {"symmetry": torch.tensor([0.25, 1.0], dtype=torch.float64),
             "noise_norm": torch.tensor([3.0, 0.0], dtype=torch.float64)}
    total = 2.0 * terms["symmetry"] + 0.5 * terms["noise_norm"]
    assert torch.equal(reward_loss([sym, reg], total, terms), 2.0 * terms["symmetry"])
    assert reward_loss([sym], total, terms) is total
    assert Evaluation(total, terms, torch.zeros(2, 3, 4, 4)).reward is total
    with pytest.raises(ValueError, match="only regularisers \\(noise_norm\\).*add a reward term"):
        check_guidance([reg])


def test_early_stopping_watches_the_reward_loss():
    """An item whose reward loss keeps falling while its total (regulariser included) rises is still improving the
    result it keeps: it must not stop; one whose reward loss stalls stops after ``patience`` steps."""
    from types import SimpleNamespace

    from callbacks.early_stopping import ItemEarlyStopping
    from doodl_lightning.objective import Evaluation

    stopper = ItemEarlyStopping(patience=2)
    module = SimpleNamespace(active=torch.ones(2, dtype=torch.bool))
    trainer = SimpleNamespace(should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    for k in range(4):
        total = torch.tensor([1.0 + k, 1.0 + k])  # both totals rise
        reward = torch.tensor([1.0 - 0.1 * k, 1.0])  # item 0's reward falls, item 1's stalls
        module.last = Evaluation(total, {}, torch.zeros(2, 3, 4, 4), reward=reward)
        stopper.on_train_batch_end(trainer, module, None, None, 0)
    assert module.active.tolist() == [True, False]


def test_best_of_n_keeps_the_candidate_of_the_lowest_reward_loss(tmp_path, tiny_pipeline_dir, write_config):
    """With a regulariser, best-of-N keeps the candidate whose REWARD loss is lowest (ReNO's ``imageselect`` keeps
    its lowest ``total_reward_loss`` too), not the one whose total with the noise prior is lowest."""
    from doodl_lightning.best_of_n import candidate_noise
    from doodl_lightning.module import DOODL

    n = 4
    guidance = [{"class_path": "doodl_lightning.guidance.SymmetryGuidance"},
                {"class_path": "doodl_lightning.guidance.NoiseNormRegularizer", "init_args": {"weight": 0.05}}]
    cfg = write_config(tmp_path / "bon.yaml", tiny_pipeline_dir, tmp_path / "bon", steps=n, callbacks=[],
                       sampler="ddim", guidance=guidance, renormalize_latents=False)
    cli = main(["fit", "--config", cfg, "--model", "doodl_lightning.best_of_n.BestOfN", "--model.candidates", str(n),
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"])
    m = cli.model
    hp = {k: v for k, v in m.hparams.items() if k not in ("model", "candidates") and not k.startswith("_")}
    ref = DOODL(model=m.backbone, guidance=list(m.guidance), renormalize_latents=False, **hp).prepare("cpu")
    rewards, totals = [], []
    for k in range(n):
        z = torch.stack([candidate_noise(it, k, ref.latent_shape) for it in ref.local_items])
        ref.latents.data = z.unsqueeze(1).expand_as(ref.latents).clone()
        ref._final = None
        ev = ref.final_evaluation()
        rewards.append(ev.terms["symmetry"] * m.guidance[0].weight)
        totals.append(ev.total)
    winner, by_total = torch.stack(rewards).argmin(0), torch.stack(totals).argmin(0)
    assert (winner != by_total).any(), "the lowest total is the lowest reward loss: the rule is untested"
    for j, it in enumerate(m.local_items):
        assert torch.equal(m.latents.detach()[j, 0], candidate_noise(it, int(winner[j]), m.latent_shape)), j


def test_contact_sheet_greens_the_lowest_reward_loss_with_a_regulariser(tmp_path):
    """The contact sheet's green number marks the iteration ``results.jsonl`` calls best: with a regulariser, the
    lowest reward loss (step 2 here), not the lowest loss shown (step 1)."""
    import numpy as np
    from PIL import Image

    from callbacks.image_logger import ImageLogger
    from doodl_lightning.data import Item
    from doodl_lightning.io import save_png

    logger = ImageLogger(every_n_steps=1)
    logger.dir = tmp_path
    colours = {0: -0.8, 1: 0.0, 2: 0.8}  # a flat grey per step: its columns are found by colour
    for step, loss, reward in ((0, 0.9, 0.5), (1, 0.4, 0.6), (2, 0.7, 0.3)):
        save_png(logger._path(0, step), torch.full((3, 16, 16), colours[step]))
        logger.logged_steps.append(step)
        logger.losses[step], logger.rewards[step] = {0: loss}, {0: reward}
    logger.final_step = 2
    restored = ImageLogger()
    restored.load_state_dict(logger.state_dict())  # a resumed run keeps the rewards the green goes by
    restored.dir = tmp_path
    sheet = np.asarray(Image.open(restored.contact_sheet([Item(0, "a red circle", 0)])).convert("RGB")).astype(int)
    # step 2's column: the x where its grey fills a whole image height (text and gutters hold a few such pixels)
    column = np.nonzero(np.all(sheet == round((colours[2] + 1) * 127.5), axis=-1).sum(0) >= 64)[0]
    green = np.nonzero((sheet[..., 1] - sheet[..., 0] > 40) & (sheet[..., 1] - sheet[..., 2] > 40))[1]
    assert len(green) and column.min() <= green.min() and green.max() <= column.max()


def test_a_resumed_fit_keeps_comparing_reward_losses():
    """TensorBoardSummary checkpoints each item's best reward loss beside its best loss: a regularised run resumed
    from a checkpoint goes on choosing its best iteration by the reward loss (``train/best_loss``)."""
    from types import SimpleNamespace

    from callbacks.tensorboard import TensorBoardSummary

    saver = TensorBoardSummary()
    saver.module = SimpleNamespace(item_best_loss=torch.tensor([1.0, 2.0]), item_best_reward=torch.tensor([0.1, 0.2]))
    loader = TensorBoardSummary()
    loader.load_state_dict(saver.state_dict())
    module = SimpleNamespace(items=[0, 1])
    loader.on_train_start(None, module)
    assert module.item_best_loss.tolist() == [1.0, 2.0]
    assert module.item_best_reward.tolist() == pytest.approx([0.1, 0.2])
