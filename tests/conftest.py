"""Shared test fixtures: a saved tiny SD pipeline, a tiny open_clip model, and a ``cli.py fit`` config writer.

The models come from ``doodl_lightning.testing`` (random weights, no download). The session-scoped
files are built once and only read by the tests; a test that needs another seed or prediction type
calls ``doodl_lightning.testing.tiny.save_tiny_pipeline`` itself.
"""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's command): two workers on two cores, one thread each -- with torch's default of one
    # thread per core each worker would oversubscribe the CPU. Set before torch is imported, so every process a test
    # starts inherits the same count (bitwise comparisons of in-process and subprocess results need it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from doodl_lightning.testing.tiny import save_tiny_clip, save_tiny_pipeline, write_tiny_clip_config


class TinyClip(NamedTuple):
    config: Path  # open_clip model-config JSON (model name = its stem, "tiny_clip_test")
    weights: Path  # its seeded random weights, .safetensors


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A tiny random SD-1.x-layout diffusers directory (seed 0, epsilon prediction). Read only."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline") / "pipe")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> TinyClip:
    """A tiny open_clip model: ``(config, weights)`` paths, as ``model_config=`` / ``pretrained=``. Read only."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = write_tiny_clip_config(folder)
    weights = folder / "tiny.safetensors"
    save_tiny_clip(config, weights)
    return TinyClip(config, weights)


def _write_config(path: Path, pipe: str, out: Path, steps: int = 3, callbacks=None, **model) -> str:
    """Write a ``cli.py fit`` YAML config to ``path`` (CPU, ``steps`` optimisation steps, logs under ``out``) for
    the model at ``pipe``; ``model`` entries override the model's defaults. Returns the path as a string."""
    cfg = {
        "trainer": {
            "max_steps": steps, "default_root_dir": str(out), "accelerator": "cpu", "devices": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": callbacks if callbacks is not None else [
                {"class_path": "callbacks.ResultsWriter"},
                {"class_path": "callbacks.ImageLogger", "init_args": {"every_n_steps": 2}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0}},
            ],
        },
        "model": {
            "model": pipe, "prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "steps": 4,
            "guidance_scale": 3.0, "grad_scale": 1.0, "clip_grad_val": 0.025,
            "guidance": [{"class_path": "doodl_lightning.guidance.SymmetryGuidance"}],
            **model,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def write_config():
    """``write_config(path, pipe, out, steps=3, callbacks=None, **model) -> str``: a ``cli.py fit`` YAML config."""
    return _write_config


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that runs a script's main() in-process may set torch's thread count (the benchmarks use 1 thread for
    tiny models); later tests compare in-process float32 results with subprocess ones bit for bit, which needs
    the same thread count in both, so every test starts and ends with the session's."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
