#!/usr/bin/env python
"""Whole DOODL optimisation runs: many iterations of a few-step model with real-size guidance models.

``backprop.py`` times ONE iteration of the chain with a model-free loss; this script times what a user waits
for: ``--iterations`` iterations (default 50) of a ``DOODL`` module (its ``prepare``, ``chain.evaluate`` with
``loss_fn`` and ``configure_optimizers``, stepped through ``optim.masked_step`` with the ``RenormalizeLatents``
hook; for the reward ensemble the noise-norm regulariser in the loss instead). One untimed warm-up iteration
comes first (the latents are put back after it).

Every model has random weights at its REAL size, nothing is downloaded:
  * the diffusion model: ``doodl_lightning.testing.architectures`` (``--sd-config sd-turbo|sdxl-turbo|tiny``),
    conditioned on random text embeddings (``common.random_conditioning``: what random text towers would give);
  * ``--guidance clip-vit-l``: ``CLIPTextGuidance`` on open_clip ViT-L-14 with ``pretrained=None`` (random
    weights, no file), as experiments/sd_turbo/clip_text.yaml (16 cutouts; SGD-Nesterov lr 5, per-item gradient
    norm clipped to 0.05, renormalisation);
  * ``--guidance reward-ensemble``: ReNO's ensemble as experiments/sd15/reward_ensemble.yaml weights it (ReNO's
    HPSv2.1 x 5, ImageReward x 1, PickScore x 0.05, CLIP x 0.01, converted to this framework's losses) + the
    noise-norm regulariser, SGD-Nesterov lr 5 with per-item clipping to 0.1, no renormalisation. The three
    reward models only load from files, so random real-size weights are first written in each model's real
    layout (fp16, in ``--weights-dir``, reused when its manifest matches) and read back through the guidance
    classes' own loading code: ``HPS_v2.1_compressed.pt`` (open_clip ViT-H-14, ``{'state_dict': ...}``; its
    weights are the CLIP guidance's random ViT-H-14), ``PickScore_v1/`` (transformers CLIP-H config +
    model.safetensors + a CLIP processor and tokenizer built offline), ``ImageReward/`` (``ImageReward.pt`` under
    the ORIGINAL BLIP keys, BERT-base ``med_config.json``, a 30522-entry ``vocab.txt``). The CLIP guidance is
    open_clip ViT-H-14 with ``pretrained=None``, whole images (no cutouts).
  * ``--guidance tiny`` / ``tiny-clip``: the same two constructions with tiny models (CPU tests, ``--smoke``).

Reported (one JSON record per run, list in ``--json``, written atomically; ``--append`` adds to the list):
total_seconds (the timed iterations), seconds_per_image, seconds_per_iteration, per-iteration times and losses,
peak memory (CUDA max allocated during the timed run; on CPU the peak RSS of the timed run, via
/proc/self/clear_refs, else the process's), weights on the device, UNet calls (= iterations x the chain's calls
per iteration: 2 per step for checkpoint, one forward + one recomputation), the loss at the first iteration,
at the last and after the last update (an untimed evaluation without gradient), the build times of each part,
the machine (threads, load average) and, for the issues' configurations, the verdict against the targets.

    python experiments/benchmarks/iterations.py --smoke --json /tmp/smoke.json            # CPU, seconds
    python experiments/benchmarks/iterations.py --sd-config sd-turbo --resolution 512 --guidance clip-vit-l \\
        --device cuda --dtype bfloat16 --json out.json                                  # issue 16's target
    python experiments/benchmarks/iterations.py --sd-config sd-turbo --resolution 512 --guidance reward-ensemble \\
        --device cuda --dtype bfloat16 --vae-checkpointing --json out.json              # issue 17's target
    python experiments/benchmarks/iterations.py --summarize out.json [backprop.json ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import (DTYPES, fmt, free, machine_info, peak_rss, quiet_hf, random_conditioning, read_records, sync,  # noqa: E402
                    text_table, write_json)

START = time.perf_counter()
GUIDANCES = ("clip-vit-l", "reward-ensemble", "tiny", "tiny-clip")
SD_CONFIGS = ("sd-turbo", "sdxl-turbo", "tiny")
UPDATES = ("sgd", "adam", "official")
PROMPTS = ("A red dog and a green cat", "An orange chair to the right of a black airplane")  # ReNO's examples

# What each guidance runs with unless the command line says otherwise (the configs' own settings).
RECIPES = {
    "clip": dict(update="sgd", lr=5.0, momentum=0.9, max_grad_norm=0.05, renormalize=True),      # sd_turbo/clip_text.yaml
    "ensemble": dict(update="sgd", lr=5.0, momentum=0.9, max_grad_norm=0.1, renormalize=False),  # sd15/reward_ensemble.yaml
}
# The issues' targets: (sd_config, resolution, steps, iterations, guidance) -> limits
TARGETS = {
    ("sd-turbo", 512, 1, 50, "clip-vit-l"): dict(issue=16, total_seconds=5.0, peak_gib=8.0,
                                                 text="SD-Turbo 512, 1 step, 50 iterations, ViT-L CLIP: <= 5 s in all, peak <= 8 GiB"),
    ("sd-turbo", 512, 1, 50, "reward-ensemble"): dict(issue=17, seconds_per_image=8.0, peak_gib=12.0,
                                                      text="SD-Turbo 512 + 4-reward ensemble, 50 iterations: <= 8 s per image, peak <= 12 GiB"),
}

# -- model sizes -------------------------------------------------------------------------------------------
# open_clip's registered configs at real size; transformers / BLIP configs spelt as the released files are.
REAL = dict(
    clip_l="ViT-L-14", clip_h="ViT-H-14",
    # yuvalkirstain/PickScore_v1 config.json (laion CLIP-ViT-H-14 in transformers' CLIPModel)
    pickscore=dict(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                         projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024),
        projection_dim=1024, logit_scale_init_value=2.6592),
    pickscore_image=224,
    # THUDM/ImageReward: BLIP ViT-L/16 + med_config.json (BERT-base with cross-attention, + [DEC] [ENC])
    ir_vit="large",
    ir_text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512),
    ir_words=30522,  # bert-base-uncased's vocab.txt
)
TINY = dict(
    clip_l=None, clip_h=None,  # doodl_lightning.testing.tiny's open_clip config
    pickscore=dict(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=2.6592),
    pickscore_image=32,
    ir_vit={"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32},
    ir_text=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=40),
    ir_words=128,
)
TINY_CLIP_NAME = "doodl_bench_tiny_clip"


# -- small helpers -----------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes_on(modules, device: torch.device) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type == device.type and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _status_kib(field: str) -> int | None:
    try:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) so the next reading is the timed run's own (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(reset_ok: bool) -> tuple[int, str]:
    hwm = _status_kib("VmHWM")
    if reset_ok and hwm is not None:
        return hwm * 1024, "rss_timed_run"
    return peak_rss(), "rss_process (includes model construction)"


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def _default_device(device: torch.device):
    """New tensors on ``device`` (random init of a 1B-parameter model on the GPU takes milliseconds, on one CPU
    thread ~15 s); the CPU as it is."""
    return torch.device(device) if device.type != "cpu" else nullcontext()


def _construct(fn, device: torch.device, on_device: bool):
    """``fn()`` -- a guidance class's own constructor -- under the device as the default device when
    ``on_device`` (faster random init), else (or if that fails) as it is. Returns (object, how)."""
    if on_device and device.type != "cpu":
        try:
            with _default_device(device):
                return fn(), f"init on {device.type}"
        except Exception as e:  # noqa: BLE001 - fall back to the plain construction
            _log(f"construction under the {device.type} default device failed ({_one_line(e, 160)}); on the CPU")
            free(device)
    return fn(), "init on cpu"


# -- random real-size weights in each reward model's real file layout ---------------------------------------

def _original_image_reward_keys(state: dict) -> dict:
    """ImageRewardModel keys -> the ORIGINAL ImageReward.pt keys: the guidance's own key map
    (``image_reward.KEY_MAP``) read backwards; each name is checked to map forward to the key it came from."""
    from doodl_lightning.guidance.image_reward import KEY_MAP

    out = {}
    for key, value in state.items():
        for pattern, target in (rule for rule in KEY_MAP if rule[1] is not None):
            m = re.fullmatch("(.+)".join(map(re.escape, re.split(r"\\\d", target))), key)
            groups = iter(range(1, 10))  # the rule's top-level groups (nested ones are non-capturing) -> \1, \2 ...
            name = m and m.expand(re.sub(r"\((?:[^()]|\([^()]*\))*\)", lambda _: f"\\{next(groups)}", pattern)
                                  .replace("\\.", "."))
            if name and (back := re.fullmatch(pattern, name)) and back.expand(target) == key:
                out[name] = value
                break
        else:
            raise KeyError(f"ImageRewardModel key {key!r} has no original ImageReward.pt name")
    return out


def _half_state(module: nn.Module) -> dict:
    """The module's state dict in float16 on the CPU (the size of the released half-precision files)."""
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in module.state_dict().items()}


def _bert_vocab(n: int, prompts) -> list[str]:
    """A BERT WordPiece vocabulary of exactly ``n`` entries (bert-base-uncased's size; its files cannot be
    downloaded here): the special tokens, the prompts' words, letters, digits, continuations, fillers. The text is
    padded to a fixed length, so the entries change no cost."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    extra = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.lower())})
    extra += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    for w in extra:
        if w not in words:
            words.append(w)
    words += [f"[unused{i}]" for i in range(n - len(words))]
    if len(words) != n:
        raise ValueError(f"a BERT vocabulary of {n} entries cannot hold the {len(words)} needed")
    return words


def write_reward_files(folder: Path, sizes: dict, clip_model: nn.Module, device: torch.device, seed: int,
                       prompts) -> dict:
    """Random weights of HPS, PickScore and ImageReward in their released layouts under ``folder``; reused when
    ``folder/manifest.json`` says they were written for the same sizes. Returns {part: seconds}."""
    manifest = folder / "manifest.json"
    key = json.dumps({"sizes": sizes, "seed": seed}, sort_keys=True, default=str)
    if manifest.is_file() and manifest.read_text() == key:
        _log(f"reusing the random reward weights in {folder}")
        return {"reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    times = {"reused": False}

    # HPS: the CLIP guidance's random open_clip ViT-H-14 (HPSv2's architecture), saved as HPSv2 saves it
    t = time.perf_counter()
    torch.save({"state_dict": _half_state(clip_model)}, folder / "HPS_v2.1_compressed.pt")
    times["hps_file"] = time.perf_counter() - t

    # PickScore: transformers CLIPModel at CLIP-H size + the laion processor (CLIPImageProcessor defaults are its
    # config) + the CLIP BPE tokenizer built offline
    t = time.perf_counter()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from doodl_lightning.shapes.tokenizer import build_clip_tokenizer

    pick = folder / "PickScore_v1"
    torch.manual_seed(seed + 11)
    with _default_device(device):
        source = CLIPModel(CLIPConfig(**sizes["pickscore"]))
    source.to("cpu", torch.float16).save_pretrained(str(pick))
    del source
    free(device)
    s = sizes["pickscore_image"]
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(str(pick))
    build_clip_tokenizer().save_pretrained(str(pick))
    times["pickscore_files"] = time.perf_counter() - t

    # ImageReward: BLIP ViT + BERT with cross-attention + MLP, under the original keys, as a bare torch state dict
    t = time.perf_counter()
    from doodl_lightning.guidance.image_reward import VITS, ImageRewardModel

    ir = folder / "ImageReward"
    ir.mkdir(exist_ok=True)
    words = _bert_vocab(sizes["ir_words"], prompts)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(words) + 2, "add_cross_attention": True,
           **sizes["ir_text"]}
    vit = VITS[sizes["ir_vit"]] if isinstance(sizes["ir_vit"], str) else sizes["ir_vit"]
    med["encoder_width"] = vit["width"]
    (ir / "med_config.json").write_text(json.dumps(med, indent=1))
    (ir / "vocab.txt").write_text("\n".join(words) + "\n")
    (ir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    torch.manual_seed(seed + 12)
    with _default_device(device):
        source = ImageRewardModel(vit, med)
        # BlipVisionConfig initialises with std 1e-10 (initializer_range): such a ViT gives the same tokens for
        # every image, a reward with no gradient. Trained-like scale instead: N(0, 0.02) matrices and embeddings.
        with torch.no_grad():
            for p in source.vision.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
    torch.save(_original_image_reward_keys(_half_state(source)), ir / "ImageReward.pt")
    del source
    free(device)
    times["image_reward_files"] = time.perf_counter() - t
    manifest.write_text(key)  # last: its presence means every file is complete
    return times


# -- the guidance ------------------------------------------------------------------------------------------

def _clip_name(sizes: dict, which: str, workdir: Path) -> tuple[str, str | None]:
    """(open_clip model name, model_config path or None) of the CLIP at this size."""
    if sizes[which] is not None:
        return sizes[which], None
    from doodl_lightning.testing.tiny import write_tiny_clip_config

    path = workdir / f"{TINY_CLIP_NAME}.json"
    if not path.is_file():
        write_tiny_clip_config(workdir, name=TINY_CLIP_NAME)
    return TINY_CLIP_NAME, str(path)


def build_guidance(args, device: torch.device, dtype: torch.dtype, workdir: Path, weights_dir: Path) -> tuple[list, list[dict], dict]:
    """(guidance modules on ``device`` in ``dtype``, one info dict per module, file-writing times)."""
    from doodl_lightning.guidance import (CLIPTextGuidance, HPSGuidance, ImageRewardGuidance, NoiseNormRegularizer,
                                          PickScoreGuidance)

    sizes = REAL if args.guidance in ("clip-vit-l", "reward-ensemble") else TINY
    modules, infos, files = [], [], {}

    def add(make, cls_name: str, before_cast=None):
        t = time.perf_counter()
        torch.manual_seed(args.seed + 100 + len(modules))
        g, how = _construct(make, device, args.init_on_device)
        if before_cast is not None:
            before_cast(g)
        g.to(device=device, dtype=dtype)  # right away: the next model's construction does not see this one on the CPU
        free(device)
        info = dict(name=g.name, cls=cls_name, weight=g.weight, parameters=_params(g), init=how,
                    build_seconds=time.perf_counter() - t)
        _log(f"guidance {g.name} ({cls_name}, {info['parameters'] / 1e6:.1f}M parameters, weight {g.weight}) "
             f"built in {info['build_seconds']:.1f}s ({how})")
        modules.append(g)
        infos.append(info)
        return g

    if args.guidance in ("clip-vit-l", "tiny-clip"):
        name, config = _clip_name(sizes, "clip_l", workdir)
        kw = {} if args.num_cuts is None else {"num_cuts": args.num_cuts}
        add(lambda: CLIPTextGuidance(model_name=name, pretrained=None, model_config=config, name="clip", **kw),
            "CLIPTextGuidance")
        return modules, infos, files

    # the reward ensemble (experiments/sd15/reward_ensemble.yaml's weights)
    name, config = _clip_name(sizes, "clip_h", workdir)
    t_files = time.perf_counter()
    # HPS's file is this random ViT-H-14 (HPSv2's architecture), written before the model leaves float32
    add(lambda: CLIPTextGuidance(model_name=name, pretrained=None, model_config=config,
                                 num_cuts=0 if args.num_cuts is None else args.num_cuts, weight=0.75, name="clip"),
        "CLIPTextGuidance",
        before_cast=lambda g: files.update(write_reward_files(weights_dir, sizes, g.model, device, args.seed,
                                                              args.prompts)))
    hps_file = weights_dir / "HPS_v2.1_compressed.pt"
    add(lambda: HPSGuidance(checkpoint=str(hps_file), model_name=name, model_config=config, weight=0.05, name="hps"),
        "HPSGuidance")
    add(lambda: ImageRewardGuidance(checkpoint=str(weights_dir / "ImageReward" / "ImageReward.pt"),
                                    vit=sizes["ir_vit"], weight=1.0, name="image_reward"), "ImageRewardGuidance")
    add(lambda: PickScoreGuidance(model=str(weights_dir / "PickScore_v1"), weight=0.05, name="pickscore"),
        "PickScoreGuidance")
    add(lambda: NoiseNormRegularizer(weight=0.01), "NoiseNormRegularizer")
    files["all_guidance_seconds"] = time.perf_counter() - t_files
    return modules, infos, files


# -- the run -----------------------------------------------------------------------------------------------

def _recipe(args) -> dict:
    base = RECIPES["clip" if args.guidance in ("clip-vit-l", "tiny-clip") else "ensemble"]
    out = dict(base)
    for k in ("update", "lr", "momentum", "max_grad_norm"):
        v = getattr(args, k)
        if v is not None:
            out[k] = v
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        out["max_grad_norm"] = None
    return out


def _update(recipe: dict) -> dict:
    """DOODL's update settings of the recipe (``update``: sgd = SGD-Nesterov, adam, official = DOODL's defaults)."""
    if recipe["update"] == "official":
        return {}
    kw = dict(update_rule=recipe["update"], lr=recipe["lr"], max_grad_norm=recipe["max_grad_norm"])
    return kw if recipe["update"] == "adam" else dict(kw, momentum=recipe["momentum"], use_nesterov=True)


def base_record(args) -> dict:
    return dict(
        sd_config=args.sd_config, resolution=args.resolution, steps=args.steps, sampler=args.sampler,
        backprop=args.backprop, guidance=args.guidance, iterations=args.iterations, batch=args.batch,
        dtype=args.dtype, device=str(args.device), guidance_scale=args.guidance_scale,
        vae_checkpointing=args.vae_checkpointing, cuda_graphs=args.cuda_graphs, status="started",
        run_id=args.run_id,
    )


def random_text_backbone(parts: dict, cond, uncond):
    """The framework's UNet backbone over random-weight parts, whose prompts encode to the random embeddings
    ``cond`` / ``uncond`` (``common.random_conditioning``) instead of a text encoder's."""
    from doodl_lightning.families import UNetBackbone

    class RandomText(UNetBackbone):
        def encode_prompts(self, prompts, size=None):
            return cond.expand(len(prompts))

        def encode_negative(self, prompt, size=None):
            return uncond

    return RandomText(parts["unet"], parts["vae"], None, None, parts["scheduler"])


def run(args) -> dict:
    """Build everything, warm up once, time ``--iterations`` iterations; returns the record."""
    from callbacks.renormalize import RenormalizeLatents
    from doodl_lightning.data import Item
    from doodl_lightning.module import DOODL
    from doodl_lightning.optim import masked_step
    from doodl_lightning.testing import architectures

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    rec = base_record(args)
    rec["machine"] = machine_info(device)
    rec["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    recipe = _recipe(args)
    rec.update(update=recipe["update"], lr=recipe["lr"], momentum=recipe["momentum"],
               max_grad_norm=recipe["max_grad_norm"], renormalize=recipe["renormalize"])
    quiet_hf()

    # the diffusion model (random weights, real config), built on the device
    t = time.perf_counter()
    parts = architectures.build_components(args.sd_config, device=device, dtype=torch.float32, seed=args.seed,
                                           parts=("unet", "vae", "scheduler"))
    res = args.resolution or architectures.DEFAULT_RESOLUTION[args.sd_config]
    rec["resolution"] = res
    cond, uncond = random_conditioning(parts["unet"], args.seed, (res, res))
    backbone = random_text_backbone(parts, cond.to(device), uncond.to(device)).to(dtype)
    if args.vae_checkpointing:
        backbone.vae.enable_gradient_checkpointing()
    sync(device)
    rec["build_seconds"] = {"backbone": time.perf_counter() - t}
    rec["unet_parameters"], rec["vae_parameters"] = _params(backbone.unet), _params(backbone.vae)
    _log(f"{args.sd_config} UNet {rec['unet_parameters'] / 1e6:.0f}M + VAE {rec['vae_parameters'] / 1e6:.0f}M "
         f"parameters built in {rec['build_seconds']['backbone']:.1f}s ({args.dtype} on {device})")

    # the guidance (random weights, real size)
    workdir = Path(tempfile.mkdtemp(prefix="doodl-iter-"))
    weights_dir = Path(args.weights_dir) if args.weights_dir else workdir / "weights"
    try:
        t = time.perf_counter()
        guidance, infos, files = build_guidance(args, device, dtype, workdir, weights_dir)
        rec["build_seconds"]["guidance"] = time.perf_counter() - t
        rec["build_seconds"]["reward_files"] = files or None
    finally:  # the tiny configs and, without --weights-dir, the reward files
        shutil.rmtree(workdir, ignore_errors=True)
    rec["guidance_parts"] = infos
    rec["weights_bytes"] = _bytes_on([backbone, *guidance], device)

    # DOODL itself: its items' noise, chain, optimiser and renormalisation; this script only times them
    items = [Item(i, args.prompts[i % len(args.prompts)], args.seed + i) for i in range(args.batch)]
    module = DOODL(model=backbone, prompts=list(dict.fromkeys(it.prompt for it in items)), guidance=guidance,
                   sampler=args.sampler, backprop=args.backprop, steps=args.steps, mix_weight=args.mix_weight,
                   guidance_scale=args.guidance_scale, resolution=res, drift_tolerance=args.drift_tolerance,
                   cuda_graphs=args.cuda_graphs, renormalize_latents=recipe["renormalize"], **_update(recipe))
    module.items = items  # item i: prompt i mod P, seed --seed + i (not every prompt with every seed)
    module.prepare(device)
    module.stepped = module.active.clone()  # every item steps (no early stopping)
    chain, every = module.chain, list(range(len(items)))
    rec["sampler"] = chain.name
    dens = []  # every denoiser the chain makes (one per evaluation): their UNet calls
    make_denoiser = chain.denoiser
    chain.denoiser = lambda *a, **kw: dens.append(make_denoiser(*a, **kw)) or dens[-1]

    def calls() -> int:
        return sum(d.calls for d in dens)

    def optimizer():
        """DOODL's optimiser, renormalising after each step as the ``RenormalizeLatents`` callback does in a fit."""
        opt = module.configure_optimizers()
        if module.renormalizes:
            opt.register_step_post_hook(lambda *_: RenormalizeLatents.renormalize(module))
        return opt

    def iteration(opt, k: int, backward: bool = True):
        """DOODL's training_step at global step ``k``: zero_grad, evaluate (chain, decode, guidance, backward),
        step (+ renormalisation); without ``backward``, only the evaluation, without gradient."""
        if not backward:
            with torch.no_grad():
                return chain.evaluate(module.latents, every, module.loss_fn(every, k), backward=False)
        opt.zero_grad(set_to_none=True)
        ev = chain.evaluate(module.latents, every, module.loss_fn(every, k), backward=True)
        masked_step(opt, module.latents, module.stepped)
        return ev

    # one untimed warm-up iteration (kernels, allocator, the guidances' text caches, graph capture); the
    # latents are put back and the optimiser made afresh
    t = time.perf_counter()
    start = module.latents.detach().clone()
    ev = iteration(optimizer(), 0)
    float(ev.total.sum())
    sync(device)
    rec["warmup_seconds"] = time.perf_counter() - t
    module.latents.data.copy_(start)
    del start, ev
    free(device)
    _log(f"warm-up iteration {rec['warmup_seconds']:.2f}s")

    # the timed optimisation
    opt = optimizer()
    reset_ok = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_ok = _reset_peak_rss()
    calls0 = calls()
    times, losses, first_terms, last_terms = [], [], None, None
    deadline_hit = False
    sync(device)
    for k in range(args.iterations):
        if args.deadline is not None and time.perf_counter() - START > args.deadline and k > 0:
            deadline_hit = True
            break
        t = time.perf_counter()
        ev = iteration(opt, k)
        loss = float(ev.total.mean())  # the module logs the loss every step: one sync per iteration
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        terms = {n: float(v.mean()) for n, v in ev.terms.items()}
        first_terms = terms if first_terms is None else first_terms
        last_terms = terms
        if args.progress and (k % max(1, args.iterations // 5) == 0 or k == args.iterations - 1):
            _log(f"iteration {k + 1}/{args.iterations}: {times[-1]:.3f}s, loss {loss:.4f}")
        del ev
    done = len(times)
    unet_calls = calls() - calls0
    if device.type == "cuda":
        rec.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device), peak_memory_kind="cuda_max_allocated")
    else:
        peak, kind = _peak_rss(reset_ok)
        rec.update(peak_memory_bytes=peak, peak_memory_kind=kind, peak_rss_process_bytes=peak_rss())

    # after the last update: the loss of the final latents (untimed, no gradient)
    ev = iteration(None, done, backward=False)
    loss_final = float(ev.total.mean())
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses + [loss_final]))
    total = sum(times)
    rec.update(
        status=("partial: " + f"{done} of {args.iterations} iterations before the deadline") if deadline_hit else "ok",
        iterations_done=done, total_seconds=total, seconds_per_image=total / args.batch,
        seconds_per_iteration=total / max(done, 1), seconds_first_iteration=times[0] if times else None,
        seconds_all=times, unet_calls=unet_calls, unet_calls_per_iteration=unet_calls / max(done, 1),
        loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None, loss_final=loss_final,
        losses=losses, terms_first=first_terms, terms_last=last_terms, losses_finite=finite,
        latent_norm_final=[float(v) for v in module.latents.detach()[:, 0].flatten(1).norm(dim=1)],
        latent_norm_initial=[float(v) for v in module.initial_norm],
        wall_seconds=time.perf_counter() - START,
    )
    if device.type == "cpu":
        rec["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    rec["target"] = target_verdict(rec)
    return rec


def target_verdict(rec: dict) -> dict | None:
    """The issue's target for this configuration (on CUDA, a full run) and whether the record meets it."""
    key = (rec.get("sd_config"), rec.get("resolution"), rec.get("steps"), rec.get("iterations"), rec.get("guidance"))
    target = TARGETS.get(key)
    if target is None or rec.get("total_seconds") is None:
        return None
    out = dict(target)
    gib = rec["peak_memory_bytes"] / 2**30
    checks = [gib <= target["peak_gib"]]
    if "total_seconds" in target:
        checks.append(rec["total_seconds"] <= target["total_seconds"])
    if "seconds_per_image" in target:
        checks.append(rec["seconds_per_image"] <= target["seconds_per_image"])
    out["met"] = bool(all(checks)) and rec["status"] == "ok" and rec["device"].startswith("cuda")
    out["peak_gib"] = target["peak_gib"]
    out["measured"] = f"{rec['total_seconds']:.2f} s in all, {rec['seconds_per_image']:.2f} s per image, peak {gib:.2f} GiB"
    return out


# -- tables ------------------------------------------------------------------------------------------------

COLUMNS = [("model", "sd_config", None), ("px", "resolution", None), ("steps", "steps", None),
           ("guidance", "guidance", None), ("dtype", "dtype", None), ("b", "batch", None),
           ("iters", "iterations_done", None), ("total s", "total_seconds", "s"), ("s/image", "seconds_per_image", "s"),
           ("s/iter", "seconds_per_iteration", "s"), ("peak MiB", "peak_memory_bytes", "MiB"),
           ("weights MiB", "weights_bytes", "MiB"), ("unet", "unet_calls", None), ("loss first", "loss_first", "s"),
           ("loss final", "loss_final", "s"), ("status", "status", None)]


def table(records: list[dict]) -> str:
    def edit(r, row):
        extras = [s for s, on in (("vaeckpt", r.get("vae_checkpointing")), ("graphs", r.get("cuda_graphs"))) if on]
        if extras:
            row[4] += "+" + "+".join(extras)
        row[-1] = row[-1][:60]

    return text_table(COLUMNS, records, edit)


def summarize(paths: list[str]) -> str:
    """This script's records (table + targets) and, from backprop.py's JSON, the iteration-vs-floor records."""
    ours, floors = [], []
    for p in paths:
        for r in read_records(p):
            (floors if "floor_seconds" in r else ours).append(r)
    lines = []
    if ours:
        lines += [table(ours), ""]
        for r in ours:
            t = r.get("target")
            if t:
                lines.append(f"issue {t['issue']}: {t['text']}: {t['measured']} -> {'MET' if t['met'] else 'NOT met'}"
                             + ("" if r.get("device", "").startswith("cuda") else " (not on CUDA)"))
        for r in ours:
            if r.get("status") != "ok":
                lines.append(f"{r.get('sd_config')} {r.get('guidance')} {r.get('dtype')}: {r.get('status')}")
    if floors:
        lines.append("")
        lines.append(f"{'backprop.py record (model px steps batch dtype)':44} {'s/iter':>7} {'floor s':>8} {'x floor':>7} {'peak GiB':>8}  status")
        for r in floors:
            gib = r.get("peak_memory_bytes")
            model = str(r.get("model", "?")).replace(" (random weights)", "")
            name = f"{model} {r.get('resolution')}px {r.get('steps')} steps b{r.get('batch')} {r.get('dtype')}"
            lines.append(f"{name:44} {fmt(r.get('seconds_per_iteration'), 's'):>7} {fmt(r.get('floor_seconds'), 's'):>8} "
                         f"{fmt(r.get('time_vs_floor'), 'x'):>7} {'-' if gib is None else f'{gib / 2**30:.2f}':>8}  "
                         f"{str(r.get('status'))[:50]}")
            if str(r.get("model", "")).startswith("sdxl (") and r.get("resolution") == 1024 and r.get("steps") == 50 \
                    and r.get("status") == "ok" and r.get("time_vs_floor") is not None:
                ok = r["time_vs_floor"] <= 1.25 and gib <= 16 * 2**30
                lines.append(f"  issue 16: SDXL 1024 one iteration <= 1.25x its floor, peak <= 16 GiB: "
                             f"{r['time_vs_floor']:.2f}x, {gib / 2**30:.2f} GiB -> {'MET' if ok else 'NOT met'}")
    return "\n".join(lines) if lines else "no records"


# -- the driver --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd-config", default="sd-turbo", choices=SD_CONFIGS, help="diffusion architecture (random weights)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=1, help="chain steps (Turbo: 1-4)")
    p.add_argument("--iterations", type=int, default=50, help="timed optimisation iterations")
    p.add_argument("--guidance", default="clip-vit-l", choices=GUIDANCES,
                   help="clip-vit-l (issue 16), reward-ensemble (issue 17), tiny (the ensemble with tiny models), "
                        "tiny-clip (the CLIP guidance with a tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES)[:3], help="the frozen models' dtype (latents float32)")
    p.add_argument("--batch", type=int, default=1, help="images optimised together")
    p.add_argument("--sampler", default=None, help="default: the model's (DDIM on the trailing grid for Turbo)")
    p.add_argument("--backprop", default="checkpoint")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1: none, as Turbo runs)")
    p.add_argument("--mix-weight", type=float, default=0.93)
    p.add_argument("--drift-tolerance", type=float, default=1e-3)
    p.add_argument("--update", default=None, choices=UPDATES, help="default: the guidance's recipe (sgd)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=None, help="per-item clip (<= 0: none); default: the recipe's")
    p.add_argument("--num-cuts", type=int, default=None, help="CLIP cutouts (default: the class's 16 for clip-vit-l, "
                                                                  "0 for the ensemble)")
    p.add_argument("--vae-checkpointing", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="the UNet as CUDA graphs (DOODL's cuda_graphs)")
    p.add_argument("--init-on-device", action=argparse.BooleanOptionalAction, default=True,
                   help="construct the guidance models with the device as default device (fast random init; falls "
                        "back to the CPU if that fails)")
    p.add_argument("--weights-dir", default=None, help="where the reward models' random files go (reused when "
                                                       "complete); default: a temporary folder, removed")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for tiny models on CPU)")
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds since start after which no further iteration starts (status 'partial')")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 iterations, CPU")
    p.add_argument("--tiny", action="store_true",
                   help="every model replaced by its tiny version (sd-config tiny; clip-vit-l -> tiny-clip, "
                        "reward-ensemble -> tiny), the rest as given: a CPU check of a script's logic")
    p.add_argument("--json", default=None, help="write the record(s) here (a list; atomically)")
    p.add_argument("--append", action="store_true", help="add the record to the list already in --json")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON", help="print the tables of these files and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.sd_config = "tiny" if args.sd_config == "sd-turbo" else args.sd_config
        args.guidance = "tiny" if args.guidance == "clip-vit-l" else args.guidance
        args.iterations = 3 if args.iterations == 50 else args.iterations
        args.sampler = args.sampler or "ddim"
        args.steps = 2 if args.steps == 1 else args.steps
    if args.tiny:
        args.sd_config = "tiny"
        args.guidance = {"clip-vit-l": "tiny-clip", "reward-ensemble": "tiny"}.get(args.guidance, args.guidance)
        args.resolution = None
    if args.threads is None and torch.device(args.device).type == "cpu" and args.sd_config == "tiny":
        args.threads = 1
    args.run_id = uuid.uuid4().hex[:12]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    previous = read_records(args.json) if (args.json and args.append) else []

    def save(rec):
        if args.json:
            write_json(args.json, previous + [rec])

    rec = base_record(args)
    save(dict(rec, status="started (no result: the process was killed or crashed before the end)"))
    print(f"# {args.sd_config} {args.resolution or 'default'} px, {args.steps} step(s), {args.iterations} iterations, "
          f"guidance {args.guidance}, batch {args.batch}, {args.dtype} on {args.device}, torch {torch.get_num_threads()} "
          f"threads", flush=True)
    device = torch.device(args.device)
    try:
        rec = run(args)
    except torch.OutOfMemoryError as e:
        rec["status"] = "oom"
        if device.type == "cuda":
            rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        print(f"# OOM: {str(e).splitlines()[0][:200]}", flush=True)
    except Exception as e:  # the record says what broke; the caller's other records go on
        rec["status"] = f"error: {_one_line(e)}"
        traceback.print_exc()
    rec["wall_seconds"] = time.perf_counter() - START
    save(rec)
    print(table([rec]), flush=True)
    if rec.get("target"):
        t = rec["target"]
        print(f"issue {t['issue']} target ({t['text']}): {t['measured']} -> {'MET' if t['met'] else 'NOT met'}", flush=True)
    return [rec]


if __name__ == "__main__":
    records = main()
    sys.exit(0 if all(r["status"] in ("ok",) or r["status"].startswith("partial") for r in records) else 1)
