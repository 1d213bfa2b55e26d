"""A few-step training run of every shapes-world YAML on CPU (tiny batches), through the real CLI."""
from pathlib import Path

import pytest

from doodl_lightning.shapes.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "shapes"
FAST = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--model.init_args.batch_size", "4", "--model.init_args.warmup_steps", "1"]


def _run(stage, tmp, *extra):
    out = tmp / stage
    cli = main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--model.init_args.export_dir", str(out),
                "--trainer.default_root_dir", str(tmp / "logs"), *FAST, *extra])
    assert (out / "README.md").exists()
    return out, cli


def _fit(stage, tmp, *extra):
    return _run(stage, tmp, *extra)[0]


@pytest.mark.parametrize("stage", ["vae", "diffusion", "clip", "aesthetic", "classifier", "evaluator"])
def test_yaml_keys_are_init_arguments(stage):
    import importlib
    import inspect

    import yaml

    cfg = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
    mod, _, cls = cfg["model"]["class_path"].rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(mod), cls).__init__).parameters
    assert set(cfg["model"]["init_args"]) <= set(params)


@pytest.mark.slow
def test_train_vae_then_diffusion(tmp_path):
    vae = _fit("vae", tmp_path)
    sd = _fit("diffusion", tmp_path, "--model.init_args.vae_path", str(vae))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd)
    img = pipe(["a red polygon"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)


def test_train_clip_then_aesthetic(tmp_path):
    clip = _fit("clip", tmp_path)
    assert (clip / "shapes-clip.json").exists() and (clip / "open_clip_model.safetensors").exists()
    _fit("aesthetic", tmp_path, "--model.init_args.clip_dir", str(clip))


def test_train_classifier_and_evaluator(tmp_path):
    cls = _fit("classifier", tmp_path)
    assert (cls / "labels.txt").read_text().split() == ["circle", "triangle", "square", "pentagon", "hexagon", "star"]
    ev, cli = _run("evaluator", tmp_path)
    import torch

    from doodl_lightning.shapes import data as D
    from doodl_lightning.shapes.evaluator import ShapesEvaluatorNet, load_evaluator

    trained = cli.model.net.eval()
    hp = cli.model.hparams
    with torch.random.fork_rng():  # the module's own initialisation, to show that training moved it
        torch.manual_seed(hp.seed)
        init = ShapesEvaluatorNet(hp.width, hp.hidden).state_dict()
    weights = {k: v for k, v in trained.state_dict().items() if k.endswith("weight")}
    assert any(not torch.equal(v, init[k]) for k, v in weights.items())  # it trained
    evaluator = load_evaluator(ev)
    loaded = evaluator.net.state_dict()
    assert set(loaded) == set(trained.state_dict())
    for k, v in trained.state_dict().items():  # exported in float16, loaded back as float32
        want = v.half().float() if v.is_floating_point() else v
        assert loaded[k].dtype == want.dtype and torch.equal(loaded[k], want), k
    # and it measures images as the trained network (with its float16-rounded weights) does
    _, x, _ = D.make_batch(5, 6)
    with torch.no_grad():
        ref = ShapesEvaluatorNet(hp.width, hp.hidden)
        ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in trained.state_dict().items()})
        logits = ref.eval()(x)
    pred = evaluator(x)
    for a in D.ATTRIBUTES:
        assert pred[a].shape == (6,) and pred[a].dtype == torch.long
        assert torch.equal(pred[a], logits[a].argmax(-1))
        assert pred[a + "_probs"].shape == (6, D.NUM_CLASSES[a])
        assert torch.allclose(pred[a + "_probs"].sum(-1), torch.ones(6))
    assert torch.allclose(pred["quality"], logits["quality"])
    assert [set(n) for n in evaluator.names(pred)] == [set(D.ATTRIBUTES) | {"quality"}] * 6


def test_clip_aux_heads_train_but_are_not_exported(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    clip = _fit("clip", tmp_path, "--model.init_args.aux_weight", "1.0")
    keys = set(load_file(str(clip / "open_clip_model.safetensors")))
    assert keys and not any("aux" in k for k in keys)
    open_clip.add_model_config(str(clip / "shapes-clip.json"))
    open_clip.create_model("shapes-clip", pretrained=str(clip / "open_clip_model.safetensors"))  # strict load


def test_clip_aux_loss_counts_only_the_background_of_two_object_images():
    import torch

    from doodl_lightning.shapes import data as D
    from doodl_lightning.shapes.clip_modules import ClipModule

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    m = ClipModule(cfg, aux_weight=1.0)
    attrs = D.sample_attributes(0, 8, p_two=1.0)
    assert bool((attrs.n_objects == 2).all())
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    before = m.aux_loss(img, attrs)
    attrs.shape[:, 0] = (attrs.shape[:, 0] + 1) % len(D.SHAPES)  # which object is "first" is ambiguous
    assert torch.equal(m.aux_loss(img, attrs), before)
    attrs.background[:] = (attrs.background + 1) % len(D.BACKGROUNDS)
    assert not torch.equal(m.aux_loss(img, attrs), before)


def test_vae_edge_loss_sees_blur_not_offsets(tmp_path):
    import torch
    import torch.nn.functional as F

    from doodl_lightning.shapes import data as D
    from doodl_lightning.shapes.generator_modules import edge_loss

    _, x, _ = D.make_batch(0, 8, caption=None, p_degraded=0.0)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    shifted = x + (blurred - x).abs().mean()  # the same pixel L1 as the blur, spread flat
    assert edge_loss(x, x) == 0 and edge_loss(shifted, x) < 1e-6 < edge_loss(blurred, x)
    _fit("vae", tmp_path, "--model.init_args.edge_weight", "1.0")
