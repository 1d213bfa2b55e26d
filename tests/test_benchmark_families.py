"""backprop.py's newer families (SANA-Sprint, SANA, FLUX.2 klein, Qwen-Image): one record each, in-process on CPU, on
the tiny architectures gpu_families.sh's CPU check runs (--tiny), built through each family's own backbone class; and
the released configs' sizes (counted on the meta device)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from doodl_lightning.families.flux2 import Flux2Backbone
from doodl_lightning.families.qwen_image import QwenImageBackbone
from doodl_lightning.families.sana import SanaBackbone, SanaSprintBackbone
from doodl_lightning.testing import family_models

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "backprop.py"


@pytest.fixture(scope="module")
def backprop():
    spec = importlib.util.spec_from_file_location("backprop_benchmark_families", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import diffusers  # the families' classes, imported once here (diffusers imports them lazily, ~2 s the first time)

    for cls in ("SanaTransformer2DModel", "AutoencoderDC", "SCMScheduler", "DPMSolverMultistepScheduler",
                "Flux2Transformer2DModel", "AutoencoderKLFlux2", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage"):
        getattr(diffusers, cls)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --threads 1 below is process-wide


# (--sd-config, extra arguments, tiny architecture, backbone class); the GPU rows' options, 2 steps
CASES = [
    ("sana-sprint", ["--samplers", "scm", "--guidance-scale", "4.5"], "tiny-sana-sprint", SanaSprintBackbone),
    ("sana-1600m", ["--samplers", "flow_dpm", "--guidance-scale", "4.5"], "tiny-sana", SanaBackbone),
    ("flux2-klein", ["--samplers", "flow", "--guidance-scale", "1.0", "--vae-checkpointing"], "tiny-flux2-klein",
     Flux2Backbone),
    ("qwen-image", ["--samplers", "flow", "--guidance-scale", "4.0", "--build-in-dtype", "--transformer-checkpointing"],
     "tiny-qwen-image", QwenImageBackbone),
]


@pytest.mark.parametrize("name,extra,tiny,cls", CASES, ids=[c[0] for c in CASES])
def test_one_record_per_family(backprop, tmp_path, name, extra, tiny, cls):
    args = ["--sd-config", name, "--tiny", *extra, "--device", "cpu", "--dtype", "float32", "--resolution", "32",
            "--steps", "2", "--repeats", "1", "--warmup", "0", "--backprops", "checkpoint", "--floor",
            "--grad-reference", "none", "--isolate", "none", "--threads", "1", "--json", str(tmp_path / "out.json")]
    (record,) = backprop.main(args)
    assert record["status"] == "ok", record["status"]
    assert record["model"].startswith(f"{tiny} (random weights")
    # one transformer call per step (CFG batched in it), and the checkpoint chain's with-grad recomputation of each
    assert record["unet_calls"] == 2 * 2
    assert record["seconds_per_iteration"] > 0 and record["time_vs_floor"] > 0 and record["saved_bytes"] > 0
    assert record["sampler"] == extra[1] and record["resolution"] == 32
    if "--transformer-checkpointing" in extra:
        assert "transformer gradient checkpointing" in record["note"]
    # the same architecture through the family's own class (what the record's Model built)
    assert type(family_models.build_family_backbone(tiny)) is cls


def test_layers_shorten_the_released_configs_and_are_noted(backprop):
    args = backprop.parse_args(["--sd-config", "flux2-klein", "--layers", "1"])
    assert args.samplers == ["flow"] and args.layers == 1
    note = backprop._shortened("flux2-klein", 1)
    assert note.startswith("transformer shortened to 1 of 5 + 4 of 20 blocks")
    assert backprop._shortened("qwen-image", 2).startswith("transformer shortened to 2 of 60 blocks")
    assert backprop.parse_args(["--sd-config", "sana-sprint"]).samplers == ["scm"]
    assert backprop.parse_args(["--sd-config", "sana-1600m", "--tiny"]).sd_config == "tiny-sana"
    with pytest.raises(SystemExit):  # weights made in bfloat16 cannot give a float32 reference
        backprop.parse_args(["--sd-config", "qwen-image", "--dtype", "bfloat16", "--build-in-dtype"])


@pytest.mark.parametrize("name,billions", [("sana-1600m", 1.60), ("sana-sprint", 1.61), ("flux2-klein", 3.88),
                                           ("qwen-image", 20.43)])
def test_released_sizes(name, billions):
    """SANA 1600M / SANA-Sprint 1.6B, FLUX.2 klein "4B" (3.88 B in the transformer) and Qwen-Image 20 B: the configs
    give the published sizes (transformer parameters, meta device)."""
    assert family_models.family_parameter_count(name) / 1e9 == pytest.approx(billions, abs=0.01)
