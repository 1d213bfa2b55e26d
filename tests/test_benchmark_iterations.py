"""The whole-optimisation benchmark (experiments/benchmarks/iterations.py) runs end to end with tiny models, in
process, and reports sane records; its real-size guidance configurations have the released models' sizes."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "iterations.py"
KEYS = {
    "sd_config", "resolution", "steps", "sampler", "backprop", "guidance", "iterations", "iterations_done", "batch",
    "dtype", "device", "status", "total_seconds", "seconds_per_image", "seconds_per_iteration", "seconds_all",
    "peak_memory_bytes", "peak_memory_kind", "weights_bytes", "unet_calls", "unet_calls_per_iteration", "loss_first",
    "loss_last", "loss_final", "losses", "terms_first", "terms_last", "build_seconds", "guidance_parts",
    "warmup_seconds", "machine", "update", "lr", "max_grad_norm", "renormalize", "target",
}


def load_script():
    spec = importlib.util.spec_from_file_location("iterations_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_smoke_in_process_writes_the_record(tmp_path, capsys):
    """--smoke: the tiny diffusion model + the tiny reward ensemble (CLIP, HPS, ImageReward, PickScore read back
    from random files in their real layouts, + the noise-norm regulariser), SGD-Nesterov, 3 iterations; then a
    tiny CLIP run with renormalisation appended to the same JSON."""
    bench = load_script()
    out = tmp_path / "iterations.json"
    [rec] = bench.main(["--smoke", "--json", str(out)])
    assert "total s" in capsys.readouterr().out  # the table
    records = json.loads(out.read_text())
    assert len(records) == 1 and records[0]["run_id"] == rec["run_id"]
    r = records[0]
    assert KEYS <= set(r), KEYS - set(r)
    assert r["status"] == "ok" and r["device"] == "cpu" and r["sampler"] == "ddim" and r["backprop"] == "checkpoint"
    assert r["iterations"] == r["iterations_done"] == 3 and r["steps"] == 2
    for k in ("total_seconds", "seconds_per_image", "seconds_per_iteration", "peak_memory_bytes", "weights_bytes",
              "warmup_seconds"):
        assert finite(r[k]) and r[k] > 0, (k, r[k])
    assert len(r["seconds_all"]) == 3 and abs(sum(r["seconds_all"]) - r["total_seconds"]) < 1e-9
    # checkpoint: each step's UNet call once forward, once recomputed for the backward; CFG off (one call each)
    assert r["unet_calls"] == r["iterations"] * 2 * r["steps"]
    assert all(finite(v) for v in r["losses"] + [r["loss_final"]])
    assert r["loss_final"] < r["loss_first"]
    assert {p["name"] for p in r["guidance_parts"]} == {"clip", "hps", "image_reward", "pickscore", "noise_norm"}
    assert set(r["terms_first"]) == {"clip", "hps", "image_reward", "pickscore", "noise_norm"}
    assert r["renormalize"] is False and r["update"] == "sgd" and r["max_grad_norm"] == 0.1
    assert r["target"] is None  # not an issue's configuration

    bench.main(["--smoke", "--guidance", "tiny-clip", "--iterations", "2", "--batch", "2", "--json", str(out),
                "--append", "--no-progress"])
    first, second = json.loads(out.read_text())
    assert first == r
    assert second["status"] == "ok" and second["guidance"] == "tiny-clip" and second["batch"] == 2
    assert second["unet_calls"] == 2 * 2 * second["steps"]
    assert second["renormalize"] is True and second["max_grad_norm"] == 0.05
    assert abs(second["seconds_per_image"] - second["total_seconds"] / 2) < 1e-9
    # renormalised to each item's norm of x_T after every step
    for a, b in zip(second["latent_norm_final"], second["latent_norm_initial"]):
        assert abs(a - b) < 1e-3 * b
    text = bench.summarize([str(out)])
    assert "tiny-clip" in text and "ok" in text


def test_a_failing_run_is_a_record_not_a_crash(tmp_path):
    bench = load_script()
    out = tmp_path / "bad.json"
    [rec] = bench.main(["--smoke", "--resolution", "10", "--json", str(out)])  # 5-pixel latents: the UNet cannot halve them
    assert rec["status"].startswith("error: ValueError") and json.loads(out.read_text())[0]["status"] == rec["status"]


def test_real_size_configurations_are_the_released_models():
    """Built on the meta device (no memory): the guidance models at the sizes the GPU run builds them."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    from doodl_lightning.guidance.image_reward import VITS, ImageRewardModel, map_image_reward_keys

    bench = load_script()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        vit_h = open_clip.create_model(bench.REAL["clip_h"], pretrained=None, device="meta")
        vit_l = open_clip.create_model(bench.REAL["clip_l"], pretrained=None, device="meta")
        pick = CLIPModel(CLIPConfig(**bench.REAL["pickscore"]))
        ir = ImageRewardModel(VITS[bench.REAL["ir_vit"]], dict(vocab_size=bench.REAL["ir_words"] + 2, **bench.REAL["ir_text"]))
    assert round(count(vit_h) / 1e6) == 986 and round(count(vit_l) / 1e6) == 428  # open_clip ViT-H-14 / ViT-L-14
    assert count(pick) == count(vit_h)  # PickScore_v1 is CLIP-H in transformers' layout
    assert round(count(ir) / 1e6) == 446  # BLIP ViT-L/16 + BERT-base with cross-attention + MLP
    # the original ImageReward.pt names the script writes are read back by the guidance's own key map
    own = ir.state_dict()
    assert set(map_image_reward_keys(bench._original_image_reward_keys(own))) == set(own)
    assert len(bench._bert_vocab(bench.REAL["ir_words"], bench.PROMPTS)) == 30522
