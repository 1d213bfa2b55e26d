"""IP-Adapter (SD-1.x and SDXL): the reference image's embedding as added conditioning plus the adapter's attention
processors, loaded with diffusers' own ``load_ip_adapter`` through ``model: <path>`` + ``ip_adapter`` keys.

The reference is diffusers' pipeline itself: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` loaded from
the same saved tiny model, ``load_ip_adapter`` of the same tiny adapter file (h94/IP-Adapter's layout: the weights
file + ``image_encoder/`` beside it), ``set_ip_adapter_scale`` and ``ip_adapter_image``, run from the same noise.
"""
from __future__ import annotations

import functools
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
LAYOUT = {"sd": "sd15", "sdxl-ddim": "sdxl"}  # tiny model -> the adapter layout of its family


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipeline_dir):
    """Tiny SD-1.x and SDXL (DDIM) pipelines (the session's, shared with test_families), an IP-Adapter for each in
    the released layout, and a reference image."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    shared = tmp_path_factory.getbasetemp() / "tiny_families"
    tmp = tmp_path_factory.mktemp("ip_adapter")
    out = {"tmp": tmp}
    for name, layout in LAYOUT.items():
        out[name] = tiny_pipeline_dir if name == "sd" else F.tiny_model(name, shared)
        unet = diffusers.UNet2DConditionModel.from_pretrained(out[name], subfolder="unet")
        out[f"{name}-adapter"] = AD.save_tiny_ip_adapter(tmp / f"IP-Adapter-{layout}", unet, layout, seed=3)
    rgb = (np.random.RandomState(5).rand(40, 56, 3) * 255).astype("uint8")  # not square: the processor crops
    Image.fromarray(rgb).save(tmp / "reference.png")
    out["image"] = str(tmp / "reference.png")
    return out


@functools.lru_cache(maxsize=None)
def _reference_pipeline(path: str, adapter: str, scale: float):
    """diffusers' own pipeline with the adapter loaded by its own loader (the parity reference)."""
    import diffusers

    from doodl_lightning.backbone import pipeline_class_name

    pipe = getattr(diffusers, pipeline_class_name(path)).from_pretrained(path)
    pipe.load_ip_adapter(str(Path(adapter).parent), subfolder="", weight_name=Path(adapter).name)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name,steps,g,size", [("sd", 3, 5.0, (16, 16)), ("sdxl-ddim", 2, 4.0, (16, 32))])
def test_ip_adapter_chain_equals_the_diffusers_pipeline(world, name, steps, g, size):
    """From the same noise, the module's chain (``ip_adapter``, ``ip_adapter_image``, ``ip_adapter_scale`` keys)
    ends where diffusers' pipeline with ``load_ip_adapter`` + ``ip_adapter_image`` ends, CFG's negative image
    embedding included; and the adapter is really in the chain (scale 0 or another image change the result)."""
    h, w = size
    m = DOODL(model=world[name], prompts=[PROMPT], seeds=[0], steps=steps, guidance_scale=g, height=h, width=w,
              sampler="ddim", timestep_grid="model", guidance=[SymmetryGuidance()], ip_adapter=world[f"{name}-adapter"],
              ip_adapter_image=world["image"], ip_adapter_scale=0.6).prepare()
    x = m.latents.detach()[:, 0]
    with torch.no_grad():
        ours = sample_ddim(m.chain.denoiser([0]), x, m.chain.schedule)
    pipe = _reference_pipeline(world[name], world[f"{name}-adapter"], 0.6)
    ref = pipe(PROMPT, latents=x.clone(), num_inference_steps=steps, guidance_scale=g, height=h, width=w,
               output_type="latent", ip_adapter_image=Image.open(world["image"])).images
    assert ours.shape == ref.shape == (1, 4, h // 2, w // 2)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()
    # not vacuous: without the image's embedding (zeros in both halves) the chain ends elsewhere
    cond, uncond = m.chain.cond, m.chain.uncond
    blank = cond.with_added(image_embeds=torch.zeros_like(cond.added["image_embeds"]))
    with torch.no_grad():
        other = sample_ddim(m.backbone.denoiser(blank, uncond, g), x, m.chain.schedule)
    assert (other - ours).abs().max() > 100 * 1e-5 * ref.abs().max()
    # the image rows of CFG's batch (negative, then reference) are exactly the pipeline's
    # prepare_ip_adapter_image_embeds: the projected CLIP embedding, zeros as the negative one (non-Plus adapters)
    rows = torch.cat([uncond.added["image_embeds"], cond.added["image_embeds"]])
    theirs = pipe.prepare_ip_adapter_image_embeds(Image.open(world["image"]), None, torch.device("cpu"), 1, True)
    assert len(theirs) == 1 and rows.shape == theirs[0].shape == (2, 1, AD.IMAGE_ENCODER_CONFIG["projection_dim"])
    assert torch.equal(rows, theirs[0]) and rows[0].abs().max() == 0 and rows[1].abs().max() > 0
    # the scale reached every decoupled cross-attention processor, and nothing new is trainable
    procs = [p for p in m.backbone.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert procs and all(p.scale == [0.6] for p in procs)
    assert not any(p.requires_grad for p in m.backbone.parameters())


def test_ip_adapter_doodl_fit_through_the_cli(world, write_config):
    """A DOODL fit with an IP-Adapter through ``cli.py``: it runs, lowers the loss, and writes its images."""
    tmp = world["tmp"]
    out = tmp / "fit"
    cfg = write_config(tmp / "fit.yaml", world["sd"], out, steps=2, callbacks=[{"class_path": "callbacks.ResultsWriter"}],
                       ip_adapter=world["sd-adapter"], ip_adapter_image=world["image"], ip_adapter_scale=0.8,
                       update_rule="adam", lr=0.1, prompts=[PROMPT], seeds=[0])
    data = yaml.safe_load(Path(cfg).read_text())
    data["model"]["steps"] = 2  # chain steps
    Path(cfg).write_text(yaml.safe_dump(data))
    cli = main(["fit", "--config", cfg])
    assert cli.model.backbone.image_encoder is not None and "image_embeds" in cli.model.chain.cond.added
    run = out / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["final_loss"] < records[0]["initial_loss"]
    assert (run / records[0]["final_image"]).is_file()


@pytest.mark.parametrize("case", ["ip_adapter-file-missing", "ip_adapter-image-missing", "ip_adapter-without-image",
                                  "ip_adapter-of-another-base"])
def test_bad_ip_adapter_input_is_one_line_and_writes_nothing(world, write_config, capsys, case):
    tmp = world["tmp"]
    out = tmp / f"bad_{case}"
    keys, expected = {
        "ip_adapter-file-missing": (dict(ip_adapter=str(tmp / "nope.safetensors"), ip_adapter_image=world["image"]),
                                    f"error: ip_adapter {tmp / 'nope.safetensors'} does not exist: give an IP-Adapter "
                                    "weights file in its released layout (e.g. IP-Adapter/models/ip-adapter_sd15.safetensors"
                                    " with models/image_encoder/)"),
        "ip_adapter-image-missing": (dict(ip_adapter=world["sd-adapter"], ip_adapter_image=str(tmp / "nope.png")),
                                     f"error: ip_adapter_image {tmp / 'nope.png'} does not exist: give a PNG or JPEG "
                                     "reference image"),
        "ip_adapter-without-image": (dict(ip_adapter=world["sd-adapter"]),
                                     "error: an IP-Adapter needs its reference image: add ip_adapter_image: <PNG or JPEG>"),
        # the SDXL adapter's projections are sized for SDXL's cross-attention width, not SD-1.x's
        "ip_adapter-of-another-base": (dict(ip_adapter=world["sdxl-ddim-adapter"], ip_adapter_image=world["image"]),
                                       f"error: IP-Adapter file {world['sdxl-ddim-adapter']} does not fit this model's UNet"),
    }[case]
    cfg = write_config(tmp / f"bad_{case}.yaml", world["sd"], out, **keys)
    assert run_cli(["fit", "--config", cfg]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and (last.startswith(expected) if case.endswith("another-base") else last == expected)
    assert not out.exists()
