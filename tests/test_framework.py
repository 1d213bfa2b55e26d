"""The LightningModule, callbacks and CLI on a tiny random SD pipeline saved and loaded back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fit(tmp_path, tiny_pipeline_dir, write_config):
    """``fit(name="run", extra=(), **config) -> (cli, out)``: ``cli.py fit`` on the tiny pipeline, config and logs
    in ``tmp_path`` (``config``: ``write_config``'s steps, callbacks and model entries; ``extra``: CLI arguments)."""

    def run(name="run", extra=(), **kw):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_pipeline_dir, out, **kw)
        return main(["fit", "--config", cfg, *extra]), out

    return run


class StepRecorder(Callback):
    """What each optimisation step saw (``class_path: test_framework.StepRecorder``): the latents before
    it, and after it the items' losses and images and which items it stepped."""

    def __init__(self):
        self.latents, self.losses, self.images, self.stepped = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.latents.append(pl_module.latents.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(pl_module.last.total.detach().float().cpu().clone())
        self.images.append(pl_module.last.images.detach().cpu().clone())
        self.stepped.append(pl_module.stepped.detach().cpu().clone())


def recorder(cli) -> StepRecorder:
    (rec,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "StepRecorder"]
    return rec


def latents_by_item(module) -> dict[int, torch.Tensor]:
    return {it.index: module.latents.detach()[j].clone() for j, it in enumerate(module.local_items)}


def test_only_latents_change_and_frozen_weights_stay_out_of_checkpoints(tmp_path, tiny_pipeline_dir, write_config):
    out = tmp_path / "a"
    cli = main(["fit", "--config", write_config(tmp_path / "a.yaml", tiny_pipeline_dir, out, steps=3)])
    from doodl_lightning.families import UNetBackbone as Backbone
    from doodl_lightning.data import initial_noise

    before = Backbone.load(tiny_pipeline_dir).state_dict()
    after = cli.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    z0 = torch.stack([initial_noise(it, cli.model.latent_shape) for it in cli.model.items])
    assert not torch.equal(z0, cli.model.latents.detach())
    assert [n for n, p in cli.model.named_parameters() if p.requires_grad] == ["latents"]
    ckpt = torch.load(out / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {"latents", "initial_norm", "active"}
    assert ckpt["doodl_items"][3] == {"index": 3, "prompt": "a blue square", "seed": 1}


def test_same_config_same_images_bitwise(fit):
    a, out_a = fit("a")
    b, out_b = fit("b")
    assert torch.equal(a.model.latents, b.model.latents)
    for png in sorted((out_a / "lightning_logs/version_0/images").glob("*.png")):
        twin = out_b / "lightning_logs/version_0/images" / png.name
        assert png.read_bytes() == twin.read_bytes()


def test_item_noise_does_not_depend_on_batch_position():
    from doodl_lightning.data import Item, initial_noise
    x = initial_noise(Item(0, "p", 7), (4, 8, 8))
    y = initial_noise(Item(5, "q", 7), (4, 8, 8))
    assert torch.equal(x, y)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, fit):
    full, _ = fit("full", steps=4)
    part, out = fit("part", steps=2)
    ckpt = out / "lightning_logs/version_0/checkpoints/last.ckpt"
    resumed, out2 = fit("part", steps=4, extra=["--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 4
    assert torch.equal(full.model.latents, resumed.model.latents)
    lines = (out2 / "lightning_logs/version_1/results.jsonl").read_text().splitlines()
    full_lines = (tmp_path / "full/lightning_logs/version_0/results.jsonl").read_text().splitlines()
    strip = lambda r: {k: v for k, v in json.loads(r).items() if not k.endswith("_image")}  # noqa: E731
    assert [strip(r) for r in lines] == [strip(r) for r in full_lines]


def test_renormalization_keeps_norms_and_callbacks_write_logs(fit):
    cli, out = fit("r", steps=3)
    m = cli.model
    norms = m.latents.detach().flatten(2).norm(dim=2)  # (items, pair)
    assert torch.allclose(norms, m.initial_norm[:, None].float().expand_as(norms), rtol=1e-6)
    run = out / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["steps"] == 3 and r["best_loss"] <= min(r["initial_loss"], r["final_loss"])
        assert set(r["final_terms"]) == {"symmetry"} and Path(r["final_image"]).is_file() and Path(r["best_image"]).is_file()
    assert (run / "contact_sheet.png").is_file()
    assert sorted(p.name for p in (run / "images/item002").glob("*.png")) == ["step0000.png", "step0002.png", "step0003.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    for key in ("train/loss", "train/loss_symmetry", "train/latent_norm", "train/grad_norm",
                "items/loss/a blue square | seed 1", "items/loss_symmetry/a red circle | seed 0"):  # items 3, 0
        assert key in tags["scalars"], key
    assert len(acc.Scalars("train/loss")) == 4  # the 3 steps' evaluations and the final one (step 3)
    assert "images/all_items" in tags["images"]
    assert not list(run.rglob("*.tmp"))  # nothing half-written


def test_results_keep_the_best_iteration_not_the_last(fit):
    """best_loss / best_step / best_image are those of the lowest loss over every step and the final latents."""
    from PIL import Image

    from doodl_lightning.io import to_pil

    cb = [{"class_path": "callbacks.ResultsWriter"}, {"class_path": "test_framework.StepRecorder"}]
    # a large perturbation: the losses go up and down, so best, first, last and final differ
    cli, out = fit("b", steps=4, callbacks=cb, perturb_grad_scale=0.3)
    rec = recorder(cli)
    final = cli.model.final_evaluation()
    records = [json.loads(x) for x in (out / "lightning_logs/version_0/results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [it.index for it in cli.model.local_items] == [0, 1, 2, 3]
    inside = 0
    for j, r in enumerate(records):
        seen = [float(loss[j]) for loss in rec.losses] + [float(final.total[j])]  # steps 0..3, then final
        images = [im[j] for im in rec.images] + [final.images[j]]
        assert r["initial_loss"] == seen[0] and r["final_loss"] == seen[-1] and r["steps"] == 4
        best = min(range(len(seen)), key=seen.__getitem__)
        assert r["best_loss"] == seen[best] and r["best_step"] == best, (j, seen, r["best_loss"], r["best_step"])
        assert r["best_terms"]["symmetry"] == pytest.approx(seen[best], rel=1e-6)
        with Image.open(r["best_image"]) as im:
            assert im.tobytes() == to_pil(images[best]).tobytes()
        inside += 0 < best < len(rec.losses) - 1
    assert inside >= 1  # some item's best is neither its first nor its last step (nor the final latents)


def test_renormalization_off_lets_norms_move(fit):
    cli, _ = fit("n", steps=2, renormalize_latents=False, clip_grad_val=5.0, grad_scale=10.0)
    m = cli.model
    norms = m.latents.detach().flatten(2).norm(dim=2)
    assert not torch.allclose(norms, m.initial_norm[:, None].float().expand_as(norms), rtol=1e-6)


@pytest.mark.slow  # fast twin: test_per_item_early_stopping_patience_and_masked_update_fast
def test_per_item_early_stopping_freezes_items_and_ends_fit(fit):
    cb = [{"class_path": "callbacks.ItemEarlyStopping", "init_args": {"stop_at": 1e9}}]
    cli, _ = fit("e", steps=10, callbacks=cb)
    assert cli.trainer.global_step == 1  # every item reached the target after its first evaluation
    assert not cli.model.active.any()
    cb = [{"class_path": "callbacks.ItemEarlyStopping", "init_args": {"patience": 1, "min_delta": 1e9}}]
    cli, _ = fit("p", steps=5, callbacks=cb)
    assert cli.trainer.global_step == 2
    # a stopped item's latent is bit-identical from then on, while the others move: the target stops
    # the items of the first prompt (initial losses ~0.13) after step 0, not those of the second (~0.21)
    cb = [{"class_path": "callbacks.ItemEarlyStopping", "init_args": {"stop_at": 0.17}},
          {"class_path": "test_framework.StepRecorder"}]
    cli, _ = fit("s", steps=3, callbacks=cb)
    rec = recorder(cli)
    m = cli.model
    assert cli.trainer.global_step == 3 and len(rec.latents) == 3
    first = rec.losses[0] <= 0.17
    assert first.tolist() == [True, False, True, False]
    assert rec.stepped[0].all() and all(torch.equal(s, ~first) for s in rec.stepped[1:])
    assert m.active.cpu().tolist() == (~first).tolist()
    snapshots = rec.latents + [m.latents.detach().clone()]  # before each step, and after the last
    for k, stepped in enumerate(rec.stepped):
        before, after = snapshots[k], snapshots[k + 1]
        for j in range(len(stepped)):
            same = torch.equal(after[j], before[j])
            # an active item moves; a stopped one stays bit-identical
            assert same != bool(stepped[j]), f"step {k}, item {j}: {'stopped' if not stepped[j] else 'active'}, moved={not same}"


class StopLowerItem(Callback):
    """Before ``ItemEarlyStopping`` sees the first losses, set its ``stop_at`` between the two items' losses, so
    exactly the lower item stops after step 0 whatever the tiny model's random weights make them."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        (stopper,) = [c for c in trainer.callbacks if type(c).__name__ == "ItemEarlyStopping"]
        # after step 0 only: later the other item must stop on patience alone
        stopper.stop_at = float(pl_module.last.total.detach().float().mean()) if trainer.global_step == 1 else None


def test_per_item_early_stopping_patience_and_masked_update_fast(fit):
    """The default-suite twin of the slow early-stopping test (2 items, a 2-step chain, at most 4 steps): item 0
    or 1 (the lower first loss) stops at ``stop_at`` after step 0 and is bit-identical from then on while the other
    moves; the other never improves by ``min_delta`` and stops on ``patience`` 2 after step 2, ending the fit at
    global step 3 (a patience counted one late runs to 4)."""
    cb = [{"class_path": "test_framework.StepRecorder"}, {"class_path": "test_framework.StopLowerItem"},
          {"class_path": "callbacks.ItemEarlyStopping", "init_args": {"patience": 2, "min_delta": 1e9}}]
    cli, _ = fit("s", steps=4, callbacks=cb, prompts=["a red circle"], seeds=[0, 1], extra=["--model.steps", "2"])
    rec = recorder(cli)
    first = rec.losses[0] < rec.losses[0].mean()  # the item StopLowerItem's threshold stops
    assert first.sum() == 1, rec.losses[0]
    assert cli.trainer.global_step == 3 and len(rec.stepped) == 3
    assert rec.stepped[0].all() and all(torch.equal(s, ~first) for s in rec.stepped[1:])
    assert not cli.model.active.any()
    snapshots = rec.latents + [cli.model.latents.detach().clone()]  # before each step, and after the last
    for k, stepped in enumerate(rec.stepped):
        for j in range(len(stepped)):
            same = torch.equal(snapshots[k + 1][j], snapshots[k][j])
            assert same != bool(stepped[j]), f"step {k}, item {j}: {'stopped' if not stepped[j] else 'active'}, moved={not same}"


def test_lightning_early_stopping_on_mean_loss_works(fit):
    cb = [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
           "init_args": {"monitor": "train/loss", "patience": 1, "min_delta": 1e9, "check_on_train_epoch_end": True}}]
    cli, _ = fit("l", steps=10, callbacks=cb)
    assert cli.trainer.global_step < 10


@pytest.mark.parametrize("sampler,backprop", [("ddim", "checkpoint"), ("edict", "reversible"), ("ddim", "autograd")])
def test_samplers_and_micro_batches_give_the_same_gradient_step(fit, sampler, backprop):
    a, _ = fit("a", steps=1, sampler=sampler, backprop=backprop, perturb_grad_scale=0.0)
    b, _ = fit("b", steps=1, sampler=sampler, backprop="autograd", micro_batch=1, perturb_grad_scale=0.0)
    assert torch.allclose(a.model.latents, b.model.latents, atol=1e-6)


def test_optimizer_can_be_swapped_from_the_cli(fit):
    cli, _ = fit("o", steps=2, extra=["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.01"])
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)


def test_prompt_file_items(tmp_path, fit):
    (tmp_path / "p.csv").write_text("prompt,other\na red circle,1\na green star,2\n")
    cli, _ = fit("f", steps=1, prompts=None, prompt_file=str(tmp_path / "p.csv"))
    assert [(it.prompt, it.seed) for it in cli.model.items] == [("a red circle", 0), ("a red circle", 1),
                                                               ("a green star", 0), ("a green star", 1)]


@pytest.mark.parametrize("model_kw,match", [
    (dict(prompts=[]), "prompt list is empty"),
    (dict(prompts=None, prompt_file="/nonexistent/prompts.txt"), "does not exist"),
    (dict(seeds=[-1]), "non-negative integers"),
    (dict(seeds=[]), "seed list is empty"),
    (dict(resolution=18), "resolution"),
    (dict(resolution=7), "resolution"),
    (dict(sampler="ddim", backprop="reversible"), "needs an exactly invertible sampler"),
    (dict(model="/nonexistent/model"), "not found"),
])
def test_bad_input_fails_before_any_work(tmp_path, tiny_pipeline_dir, write_config, model_kw, match):
    out = tmp_path / "bad"
    cfg = write_config(tmp_path / "bad.yaml", tiny_pipeline_dir, out, **model_kw)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        main(["fit", "--config", cfg])
    assert not out.exists()


def test_unknown_class_path_and_unwritable_output_dir(tmp_path, tiny_pipeline_dir, write_config):
    cfg = write_config(tmp_path / "c.yaml", tiny_pipeline_dir, tmp_path / "c",
                       guidance=[{"class_path": "doodl_lightning.guidance.NoSuchGuidance"}])
    with pytest.raises(SystemExit):
        main(["fit", "--config", cfg])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg = write_config(tmp_path / "d.yaml", tiny_pipeline_dir, ro / "out")
    if os.geteuid() == 0:  # root ignores permissions; use a path below a regular file instead
        (tmp_path / "file").write_text("x")
        cfg = write_config(tmp_path / "d.yaml", tiny_pipeline_dir, tmp_path / "file" / "out")
    with pytest.raises((PermissionError, OSError), match="not writable|Not a directory|exists"):
        main(["fit", "--config", cfg])


@pytest.mark.slow
def test_cli_prints_one_line_error(tmp_path, tiny_pipeline_dir, write_config):
    cfg = write_config(tmp_path / "e.yaml", tiny_pipeline_dir, tmp_path / "e", seeds=[-3])
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", cfg], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: seeds must be non-negative integers")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_pipeline_dir, write_config, fit):
    """SIGKILL after step 3 of 5, resume from last.ckpt: same latents, complete results and images."""
    full, _ = fit("full", steps=5)
    out = tmp_path / "killed"
    callbacks = [
        {"class_path": "callbacks.ResultsWriter"},
        {"class_path": "callbacks.ImageLogger", "init_args": {"every_n_steps": 1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0}},
    ]
    cfg = write_config(tmp_path / "killed.yaml", tiny_pipeline_dir, out, steps=5, callbacks=callbacks + [
        {"class_path": "killer.KillAfter", "init_args": {"step": 3}}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", cfg], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9  # killed, not finished
    run = out / "lightning_logs/version_0"
    for line in (run / "results.jsonl").read_text().splitlines():
        json.loads(line)  # only complete lines
    from PIL import Image

    for png in run.rglob("*.png"):
        Image.open(png).load()  # only complete images
    assert not list(run.rglob("*.tmp"))
    cfg = write_config(tmp_path / "resume.yaml", tiny_pipeline_dir, out, steps=5, callbacks=callbacks)
    resumed = main(["fit", "--config", cfg, "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    assert resumed.trainer.global_step == 5
    assert torch.equal(full.model.latents, resumed.model.latents)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_half_precisions_keep_latents_and_optimiser_in_float32(fit, precision):
    cli, _ = fit("h", steps=2, extra=["--trainer.precision", precision])
    m = cli.model
    assert m.backbone.dtype == torch.bfloat16
    assert m.latents.dtype == torch.float32 and m.initial_norm.dtype == torch.float64
    buf = cli.trainer.optimizers[0].state[m.latents]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.isfinite(m.last.total).all()
