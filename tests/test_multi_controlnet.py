"""Several ControlNets at once (SD-1.x and SDXL): ``controlnet: [dir, dir]`` with one control image and one scale per
net, the residuals summed as diffusers' ``MultiControlNetModel`` sums them.

The reference is diffusers' ControlNet pipeline given a list of ControlNets (``StableDiffusionControlNetPipeline`` /
``StableDiffusionXLControlNetPipeline`` wrap it in a ``MultiControlNetModel``), each net loaded by diffusers from the
same saved directory, the images and ``controlnet_conditioning_scale`` as lists, run from the same noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cli import main, run_cli
from doodl_lightning.guidance import SymmetryGuidance
from doodl_lightning.module import DOODL
from doodl_lightning.sampling import sample_ddim
from doodl_lightning.testing import adapters as AD
from doodl_lightning.testing import families as F

PROMPT = "a red circle"
SIZE = (16, 32)  # (height, width): not square, so a transposed control image could not pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipeline_dir):
    """Tiny SD-1.x and SDXL (DDIM) pipelines (the session's), two standalone ControlNets for each, two control
    images."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"
    tmp = tmp_path_factory.mktemp("multi_controlnet")
    out = {"tmp": tmp, "sd": tiny_pipeline_dir, "sdxl-ddim": F.tiny_model("sdxl-ddim", shared)}
    for name in ("sd", "sdxl-ddim"):
        unet = diffusers.UNet2DConditionModel.from_pretrained(out[name], subfolder="unet")
        out[f"{name}-nets"] = AD.save_tiny_controlnets(tmp / name, unet, count=2)
    for i in range(2):
        rgb = (np.random.RandomState(10 + i).rand(*SIZE, 3) * 255).astype("uint8")
        Image.fromarray(rgb).save(tmp / f"control_{i}.png")
    out["images"] = [str(tmp / f"control_{i}.png") for i in range(2)]
    return out


def _reference_pipeline(path: str, nets: list[str]):
    """diffusers' ControlNet pipeline of the base at ``path`` with a list of ControlNets (its MultiControlNetModel)."""
    import diffusers

    from doodl_lightning.backbone import pipeline_class_name

    base = getattr(diffusers, pipeline_class_name(path)).from_pretrained(path)
    cls = (diffusers.StableDiffusionXLControlNetPipeline if "XL" in type(base).__name__
           else diffusers.StableDiffusionControlNetPipeline)
    pipe = cls.from_pipe(base, controlnet=[diffusers.ControlNetModel.from_pretrained(n) for n in nets])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name,steps,g", [("sd", 3, 5.0), ("sdxl-ddim", 2, 4.0)])
def test_multi_controlnet_chain_equals_the_diffusers_pipeline(world, name, steps, g):
    """From the same noise, the module's chain with two ControlNets (their images and scales in list order) ends where
    diffusers' ControlNet pipeline with the list of nets ends; and both nets are in the chain (dropping either
    one's residuals, scale 0, moves the result)."""
    h, w = SIZE
    scales = [0.6, 1.3]
    m = DOODL(model=world[name], prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=g, height=h, width=w,
              sampler="ddim", timestep_grid="model", guidance=[SymmetryGuidance()], controlnet=world[f"{name}-nets"],
              control_images=world["images"], controlnet_scale=scales).prepare()
    assert type(m.backbone.controlnet).__name__ == "MultiControlNetModel" and len(m.backbone.controlnet.nets) == 2
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = sample_ddim(m.chain.denoiser([0]), x, m.chain.schedule)
    pipe = _reference_pipeline(world[name], world[f"{name}-nets"])
    ref = pipe(PROMPT, image=[Image.open(p) for p in world["images"]], latents=x.clone(), num_inference_steps=steps,
               guidance_scale=g, height=h, width=w, controlnet_conditioning_scale=scales, output_type="latent").images
    assert ours.shape == ref.shape == (1, 4, h // 2, w // 2)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    for off in range(2):  # not vacuous: each net's residuals matter
        only = [0.0 if i == off else s for i, s in enumerate(scales)]
        eps = m.backbone.denoiser(m.chain.cond, m.chain.uncond, g, control_image=m.chain.control([0]), control_scale=only)
        with torch.no_grad():
            assert (sample_ddim(eps, x, m.chain.schedule) - ours).abs().max() > 100 * 1e-5 * ref.abs().max()


def test_multi_controlnet_doodl_fit_through_the_cli(world, write_config):
    """A DOODL fit with two ControlNets through ``cli.py`` (one scale for both): it runs and lowers the loss."""
    tmp = world["tmp"]
    out = tmp / "fit"
    cfg = write_config(tmp / "fit.yaml", world["sd"], out, steps=2, callbacks=[{"class_path": "callbacks.ResultsWriter"}],
                       controlnet=world["sd-nets"], control_images=world["images"], controlnet_scale=0.8,
                       update_rule="adam", lr=0.1, prompts=[PROMPT], seeds=[0], height=SIZE[0], width=SIZE[1])
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = 2  # chain steps
    Path(cfg).write_text(yaml.safe_dump(data))
    cli = main(["fit", "--config", cfg])
    assert cli.model.chain.control_images.shape == (1, 2, 3, *SIZE)
    run = out / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["final_loss"] < records[0]["initial_loss"]


@pytest.mark.parametrize("case", ["controlnet-images-count", "controlnet-scales-count"])
def test_bad_multi_controlnet_input_is_one_line_and_writes_nothing(world, write_config, capsys, case):
    tmp = world["tmp"]
    out = tmp / f"bad_{case}"
    keys, expected = {
        "controlnet-images-count": (dict(control_images=world["images"][:1]),
                                    "error: 1 control_images for 2 ControlNets: give one image per ControlNet (in the "
                                    "controlnet list's order), or 4: one per ControlNet for each of the 2 prompts"),
        "controlnet-scales-count": (dict(control_images=world["images"], controlnet_scale=[0.5, 0.5, 0.5]),
                                    "error: 3 controlnet_scale values for 2 ControlNets: give one scale per ControlNet, "
                                    "or one number for all"),
    }[case]
    cfg = write_config(tmp / f"bad_{case}.yaml", world["sd"], out, controlnet=world["sd-nets"], height=SIZE[0],
                       width=SIZE[1], **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == expected
    assert not out.exists()
