"""A few-step training run of every shapes-world YAML on CPU (tiny batches), through the real CLI."""
from pathlib import Path

import pytest

from doodl_lightning.shapes.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "shapes"
FAST = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--model.init_args.batch_size", "4", "--model.init_args.warmup_steps", "1"]


def _fit(stage, tmp, *extra):
    out = tmp / stage
    main(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--model.init_args.export_dir", str(out),
          "--trainer.default_root_dir", str(tmp / "logs"), *FAST, *extra])
    assert (out / "README.md").exists()
    return out


@pytest.mark.parametrize("stage", ["vae", "diffusion", "clip", "aesthetic", "classifier", "evaluator"])
def test_yaml_keys_are_init_arguments(stage):
    import importlib
    import inspect

    import yaml

    cfg = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
    mod, _, cls = cfg["model"]["class_path"].rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(mod), cls).__init__).parameters
    assert set(cfg["model"]["init_args"]) <= set(params)


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
    ev = _fit("evaluator", tmp_path)
    from doodl_lightning.shapes.evaluator import load_evaluator

    assert load_evaluator(ev)  # loads
