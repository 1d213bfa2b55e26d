"""The resume rule itself (``doodl_lightning.resume``): every setting that changes the chain is in the trajectory a
checkpoint keeps, so a resume with another value is refused, never continued silently.

The keys are read from the signatures, not listed here: a setting added to ``DOODL.__init__`` or to a guidance
class is checked by these tests as it lands, and one left out of the trajectory fails them until it is added to
the documented exceptions below, with its reason.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from doodl_lightning.guidance import CLIPTextGuidance, NoiseNormRegularizer, SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.resume import NOT_TRAJECTORY, mismatch, trajectory
from doodl_lightning.search import NoiseSearch

# DOODL settings that are NOT trajectory keys of their own, each with the reason (resume.py's NOT_TRAJECTORY,
# plus the two module lists the trajectory describes member by member)
NOT_OWN_KEYS = {
    # how the same numbers are computed: memory, speed
    "micro_batch": "items per chain call", "backprop": "autograd / checkpoint / reversible: the same gradient",
    "drift_tolerance": "a check of the reversible backward", "vae_checkpointing": "memory",
    "cuda_graphs": "speed",
    # where the frozen weights are read from: the weights themselves are the key "model.model (weights)"
    "model": "path", "model_config": "path", "local_files_only": "where to look",
    # the item list is the key "model.items (prompts x seeds)"
    "prompts": "items", "seeds": "items", "prompt_file": "items",
    # each guidance term is keyed by itself: model.guidance[i].class / its settings / its weights
    "guidance": "model.guidance[i].*",
    # held-out measurements on each step's images, never in the loss: the latents' path does not depend on them
    "metrics": "held out",
}
GUIDANCE_OWN = {"guidance", "metrics"}  # not in NOT_TRAJECTORY: save_hyperparameters leaves them out


def settings(cls) -> list[str]:
    """The YAML keys of a search method: its own ``__init__`` arguments and, through ``**kwargs``, NoiseSearch's."""
    own = [p for p, v in inspect.signature(cls.__init__).parameters.items()
           if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD]
    return own + [p for p in inspect.signature(NoiseSearch.__init__).parameters if p != "self"]


def doodl_settings() -> list[str]:
    return settings(DOODL)


@pytest.fixture(scope="module")
def module(tiny_pipeline_dir):
    # as many settings as the tiny SD model allows at a value that is not None (a key recorded as None could
    # hide a value the trajectory cannot hold); the ControlNet keys are covered by test_families' fit
    return DOODL(model=tiny_pipeline_dir, prompts=["a red circle"], seeds=[0, 1], negative_prompt="blurry",
                 guidance=[SymmetryGuidance()], sampler="ddim", steps=4, timestep_grid="model", height=16, width=16,
                 opt_t=2, max_grad_norm=1.0, renormalize_latents=True, guidance_scale=3.0)


def test_the_exceptions_are_exactly_the_documented_ones():
    """A key added to NOT_TRAJECTORY (e.g. negative_prompt, which changes the unconditional branch of CFG) must be
    argued for here first; a documented exception that is no longer a setting is dropped from both."""
    assert set(NOT_TRAJECTORY) == set(NOT_OWN_KEYS) - GUIDANCE_OWN
    assert set(NOT_OWN_KEYS) <= set(doodl_settings()), set(NOT_OWN_KEYS) - set(doodl_settings())


def test_every_doodl_setting_that_changes_the_chain_is_a_trajectory_key(module):
    traj = trajectory(module)
    missing = [k for k in doodl_settings() if k not in NOT_OWN_KEYS and f"model.{k}" not in traj]
    assert not missing, f"settings a resume would not compare: {missing}"
    # and recorded as the value itself: a setting the trajectory can only hold as None is not compared either
    lost = [k for k in doodl_settings() if k not in NOT_OWN_KEYS and module.hparams.get(k) is not None
            and traj[f"model.{k}"] is None]
    assert not lost, f"settings recorded as None: {lost}"
    # the exceptions' stand-ins are there
    for key in ("model.items (prompts x seeds)", "model.model (weights)", "model.guidance[0].class",
                "model.guidance[0].weight", "model.guidance[0] (models and weights)"):
        assert key in traj, key


def test_every_setting_of_a_search_built_on_doodl_is_a_trajectory_key(tiny_pipeline_dir):
    """The same rule for the classes that extend DOODL (best-of-N: ``candidates``): their own settings too."""
    from doodl_lightning.best_of_n import BestOfN

    m = BestOfN(candidates=3, model=tiny_pipeline_dir, prompts=["a red circle"], steps=2, guidance=[SymmetryGuidance()])
    own = settings(BestOfN)
    traj = trajectory(m)
    missing = [p for p in own if p not in NOT_OWN_KEYS and f"model.{p}" not in traj]
    assert own and not missing, f"settings a resume would not compare: {missing}"
    assert traj["model.candidates"] == 3


def test_another_negative_prompt_is_refused(module, tiny_pipeline_dir):
    other = DOODL(**{**dict(module.hparams), "model": tiny_pipeline_dir, "negative_prompt": "",
                     "guidance": [SymmetryGuidance()]})
    assert mismatch(trajectory(module), trajectory(module)) is None
    problem = mismatch(trajectory(module), trajectory(other))
    assert problem is not None and "model.negative_prompt 'blurry' -> ''" in problem, problem


def test_a_controlnet_retrained_at_the_same_path_is_refused(tmp_path, tiny_pipeline_dir):
    """The ControlNet's weights are compared, not its path (as the base model's): its residuals are in every step."""
    import numpy as np
    from PIL import Image

    from doodl_lightning.families import PretrainedBackbone
    from doodl_lightning.testing.families import save_tiny_controlnet

    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(tmp_path / "control.png")
    base = PretrainedBackbone(tiny_pipeline_dir).unet
    kw = dict(model=tiny_pipeline_dir, prompts=["a red circle"], controlnet=str(tmp_path / "cn"), height=16, width=16,
              control_images=[str(tmp_path / "control.png")], guidance=[SymmetryGuidance()], steps=2)
    save_tiny_controlnet(tmp_path / "cn", base, seed=1)
    before = trajectory(DOODL(**kw))
    save_tiny_controlnet(tmp_path / "cn", base, seed=2)
    problem = mismatch(before, trajectory(DOODL(**kw)))
    assert problem is not None and "model.model (other weights: text encoders, ControlNet)" in problem, problem
    assert "model.model (weights)" not in problem  # the base model is the same


def _guidance(kind, tiny_clip, folder) -> tuple[type, dict]:
    """The class and its arguments, every setting away from its default where the tiny models allow."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from doodl_lightning.guidance import AestheticGuidance, CLIPImageGuidance

    clip = dict(model_name="tiny_clip_test", pretrained=str(tiny_clip.weights), model_config=str(tiny_clip.config),
                num_cuts=2, cut_power=0.5, weight=2.0, name="c", resample="bilinear")
    if kind == "clip_text":
        return CLIPTextGuidance, dict(clip, prompt="a circle", cutout_reduction="mean")
    if kind == "clip_image":
        Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(folder / "ref.png")
        return CLIPImageGuidance, dict(clip, references=[str(folder / "ref.png")], cutout_reduction="mean")
    if kind == "aesthetic":
        dim = json.loads(tiny_clip.config.read_text())["embed_dim"]
        save_file({"weight": torch.randn(1, dim, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(1)},
                  str(folder / "head.safetensors"))
        return AestheticGuidance, dict(clip, head=str(folder / "head.safetensors"), target=5.0, score_clip=[2.0, 8.0])
    return {"symmetry": SymmetryGuidance, "noise_norm": NoiseNormRegularizer}[kind], dict(weight=2.0, name="g")


# guidance settings that only say where the model's weights are read from: "model.guidance[i] (models and weights)"
GUIDANCE_PATHS = {"pretrained", "model_config", "head"}


@pytest.mark.parametrize("kind", ["clip_text", "clip_image", "aesthetic", "symmetry", "noise_norm"])
def test_every_guidance_setting_is_a_trajectory_key(module, tiny_clip, tmp_path, kind):
    """Each ``__init__`` argument of the guidance class is recorded under ``model.guidance[i]`` (on the guidance or
    one of our own parts, e.g. ``cutouts.num_cuts``) at the value given, or is a path to the weights."""
    cls, kwargs = _guidance(kind, tiny_clip, tmp_path)
    saved = module.guidance
    try:
        module.guidance = type(saved)([cls(**kwargs)])
        traj = trajectory(module)
    finally:
        module.guidance = saved
    keys = {k.rsplit(".", 1)[-1]: v for k, v in traj.items() if k.startswith("model.guidance[0].")}
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if p not in GUIDANCE_PATHS and p not in keys]
    assert not missing, f"{cls.__name__} settings a resume would not compare: {missing}"
    wrong = {p: (v, keys[p]) for p, v in kwargs.items() if p not in GUIDANCE_PATHS and keys[p] != v}
    assert not wrong, wrong
