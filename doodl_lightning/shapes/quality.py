"""Measure the shapes world against the quality bars of issue 5 and write the numbers
(``quality.json`` + ``QUALITY.md`` in the weights directory, and each model card's "Measured quality").

    python -m doodl_lightning.shapes.quality [--weights DIR] [--n-gen 240] [--smoke]

Bars: VAE PSNR >= 32 dB on fresh renders; evaluator >= 99% per attribute on fresh renders; unguided
generations match their prompt (per the evaluator) >= 90% for shape and colour; shapes-CLIP zero-shot
>= 90%; classifier >= 98% on fresh renders and robust (noise / shift). For every guidance model, a short
noise optimisation (DDIM chain, plain autograd, DOODL-style normalised steps and renormalised latents)
reports guide-vs-evaluator agreement: how often the guide believes it reached the target vs how often the
independent evaluator agrees. All renders use seeds never used in training.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from .modules import OPENAI_MEAN, OPENAI_STD, QUALITY_MARK, _load_arch, augment

EVAL_SEED = 7_777_000_000  # fresh renders: far from every training seed range
# sd-shapes' guidance scale for unguided generation, chosen on held-out prompt sets (EVAL_SEED + 60/61; sweep in
# the sd-shapes model card): higher scales draw "polygon" as rounded hexagons read as circles, lower ones blur stars
RECOMMENDED_CFG = 2.5


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------- loaders
def load_pipeline(weights: Path, device):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(weights / "sd-shapes"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip(weights: Path, device):
    import open_clip

    d = weights / "shapes-clip"
    open_clip.add_model_config(str(d / "shapes-clip.json"))
    model, _, _ = open_clip.create_model_and_transforms("shapes-clip", pretrained=str(d / "open_clip_model.safetensors"))
    return model.to(device).eval(), open_clip.get_tokenizer("shapes-clip")


def load_classifier(weights: Path, device):
    from safetensors.torch import load_file

    d = weights / "classifier"
    cfg = json.loads((d / "config.json").read_text())
    net = _load_arch(cfg["arch"], cfg["num_classes"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()})
    net = net.to(device).eval()
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)

    def classify(x):  # x in [-1, 1] -> logits
        x = F.interpolate(x, size=(cfg["input_size"],) * 2, mode="bilinear", align_corners=False)
        return net(((x + 1) / 2 - mean) / std)

    return classify, cfg


def clip_image_features(model, x):
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return F.normalize(model.encode_image(((x + 1) / 2 - mean) / std).float(), dim=-1)


# ---------------------------------------------------------------------------------------------------- bars
@torch.no_grad()
def measure_vae(pipe, n, device, evaluator=None) -> dict:
    """PSNR of reconstructions; with ``evaluator``, also how often it still reads each single shape's fine and
    coarse class after the round trip -- a ceiling on generations' shape match that PSNR does not show."""
    attrs = D.sample_attributes(EVAL_SEED + 1, n, p_two=0.2)
    x = D.render(attrs, device)
    vae = pipe.vae
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(256)]).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-10))
    res = {"psnr_db_mean": round(float(psnr.mean()), 2), "psnr_db_of_mean_mse": round(float(10 * math.log10(1 / float(mse.mean()))), 2),
           "n": n, "bar": ">= 32 dB"}
    if evaluator is not None:
        one = (attrs.n_objects == 1).cpu()
        truth, pred = attrs.shape[:, 0][one], evaluator(rec)["shape"].cpu()[one]
        coarse = torch.tensor(D.FINE_TO_COARSE)
        res["evaluator_reads_reconstruction_pct"] = {
            "shape": round(100 * float((pred == truth).float().mean()), 2),
            "coarse_shape": round(100 * float((coarse[pred] == coarse[truth]).float().mean()), 2),
            "per_shape": {s: round(100 * float((pred[truth == i] == i).float().mean()), 1)
                          for i, s in enumerate(D.SHAPES) if bool((truth == i).any())},  # no NaN for absent classes
            "n_single_shape": int(one.sum())}
    return res


@torch.no_grad()
def measure_evaluator(evaluator, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 2, n)
    x = D.render(attrs, device)
    pred = evaluator(x)
    labels = attrs.labels()
    acc = {a: round(float((pred[a] == labels[a]).float().mean()) * 100, 2) for a in D.ATTRIBUTES}
    return {"accuracy_pct": acc, "quality_mae": round(float((pred["quality"] - attrs.quality).abs().mean()), 3), "n": n,
            "bar": ">= 99% per attribute"}


@torch.no_grad()
def measure_classifier(classify, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 3, n)
    x = D.render(attrs, device)
    y = attrs.shape[:, 0].to(device)
    g = torch.Generator().manual_seed(0)
    res = {}
    for name, xx in [("clean", x), ("noise_0.2", x + 0.2 * torch.randn(x.shape, generator=g).to(device)),
                     ("noise_0.4", x + 0.4 * torch.randn(x.shape, generator=g).to(device)),
                     ("shift_2px", augment(x, 0.0, 2, g))]:
        res[name] = round(float((classify(xx).argmax(-1) == y).float().mean()) * 100, 2)
    return {"accuracy_pct": res, "n": n, "bar": ">= 98% clean, robust"}


def _template(size, colour, shape, position, background):
    return f"a {size} {colour} {shape} {D.POSITION_PHRASE[D.POSITIONS.index(position)]} on a {background} background"


@torch.no_grad()
def measure_clip(model, tokenizer, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 4, n)
    x = D.render(attrs, device)
    img = torch.cat([clip_image_features(model, c) for c in x.split(256)])
    lab = attrs.labels()
    acc = {}
    for a in D.ATTRIBUTES:
        names = D.ATTRIBUTE_NAMES[a]
        correct = 0
        caps, owners = [], []
        for i in range(n):
            true = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
            for v in names:
                t = dict(true, **{a: v})
                caps.append(_template(t["size"], t["colour"], t["shape"], t["position"], t["background"]))
        txt = torch.cat([F.normalize(model.encode_text(tokenizer(c).to(device)).float(), dim=-1)
                         for c in [caps[j:j + 1024] for j in range(0, len(caps), 1024)]])
        txt = txt.view(n, len(names), -1)
        pick = torch.einsum("nd,ncd->nc", img, txt).argmax(-1).cpu()
        correct = (pick == lab[a]).float().mean()
        acc[a] = round(float(correct) * 100, 2)
    return {"zero_shot_accuracy_pct": acc, "n": n, "protocol": "full caption with the true attributes vs the same "
            "caption with this one attribute changed (all alternatives)", "bar": ">= 90%"}


@torch.no_grad()
def measure_aesthetic(model, head, n, device) -> dict:
    attrs = D.sample_attributes(EVAL_SEED + 5, n, p_degraded=0.7)
    x = D.render(attrs, device)
    s = (torch.cat([clip_image_features(model, c) for c in x.split(256)]) @ head["weight"].t() + head["bias"]).squeeze(-1).cpu()
    q = attrs.quality
    r = torch.corrcoef(torch.stack([s, q]))[0, 1]
    rs = torch.corrcoef(torch.stack([s.argsort().argsort().float(), q.argsort().argsort().float()]))[0, 1]
    return {"pearson_r": round(float(r), 3), "spearman_r": round(float(rs), 3), "mae": round(float((s - q).abs().mean()), 3), "n": n}


def _prompts(n, seed, kind):
    attrs = D.sample_attributes(seed, n, p_degraded=0.0)
    lab = attrs.labels()
    prompts, want = [], []
    for i in range(n):
        t = {k: D.ATTRIBUTE_NAMES[k][int(lab[k][i])] for k in D.ATTRIBUTES}
        coarse = D.COARSE_SHAPES[D.FINE_TO_COARSE[int(lab["shape"][i])]]
        if kind == "full":
            prompts.append(_template(t["size"], t["colour"], coarse, t["position"], t["background"]))
            want.append({"coarse_shape": coarse, "colour": t["colour"], "size": t["size"], "position": t["position"],
                         "background": t["background"]})
        else:
            prompts.append(D.with_article(f"{t['colour']} {coarse}"))
            want.append({"coarse_shape": coarse, "colour": t["colour"]})
    return prompts, want


@torch.no_grad()
def generate(pipe, prompts, seeds, steps, cfg, device, batch=128):
    out = []
    for j in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[j:j + batch]]
        lat = torch.stack([torch.randn(pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                                       pipe.unet.config.sample_size, generator=g) for g in gens]).to(device)
        img = pipe(prompts[j:j + batch], num_inference_steps=steps, guidance_scale=cfg, latents=lat,
                   output_type="pt", height=D.IMAGE_SIZE, width=D.IMAGE_SIZE).images
        out.append(img * 2 - 1)
    return torch.cat(out)


def match_rates(pred_names, want) -> dict:
    keys = sorted({k for w in want for k in w})
    res = {}
    for k in keys:
        pairs = [(p, w) for p, w in zip(pred_names, want) if k in w]
        if k == "coarse_shape":
            hit = [D.COARSE_SHAPES[D.FINE_TO_COARSE[D.SHAPES.index(p["shape"])]] == w[k] for p, w in pairs]
        else:
            hit = [p[k] == w[k] for p, w in pairs]
        res[k] = round(100 * sum(hit) / max(1, len(hit)), 2)
    return res


def measure_generation(pipe, evaluator, n, device, steps, cfg, seed_offset=6) -> dict:
    """Evaluator match of unguided generations: ``n`` full and ``n`` short prompts (seeds ``EVAL_SEED + seed_offset``
    and the next; another offset gives a held-out prompt set, e.g. for choosing the guidance scale)."""
    from .evaluator import Evaluator

    res = {"num_inference_steps": steps, "guidance_scale": cfg, "scheduler": type(pipe.scheduler).__name__}
    for kind, seed in [("full", EVAL_SEED + seed_offset), ("short", EVAL_SEED + seed_offset + 1)]:
        prompts, want = _prompts(n, seed, kind)
        imgs = generate(pipe, prompts, [seed + i for i in range(n)], steps, cfg, device)
        pred = evaluator(imgs)
        res[f"{kind}_prompts_match_pct"] = match_rates(Evaluator.names(pred), want)
        res[f"{kind}_prompts_evaluator_quality_mean"] = round(float(pred["quality"].mean()), 2)
        res[f"{kind}_example_prompt"] = prompts[0]
    res["n_per_prompt_set"] = n
    res["bar"] = ">= 90% shape (coarse: circle / polygon / star) and colour"
    return res


# ------------------------------------------------------------------------------------------- guidance gaps
def _ddim_chain(pipe, z, cond, uncond, steps, cfg):
    """Deterministic DDIM (eta 0) x_T -> x_0 with batched CFG; differentiable (plain autograd)."""
    sch = pipe.scheduler
    sch.set_timesteps(steps)
    ac = sch.alphas_cumprod.to(z.device)
    ts = sch.timesteps
    emb = torch.cat([uncond, cond])
    for i, t in enumerate(ts):
        eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, emb).sample.chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else sch.final_alpha_cumprod.to(z.device)
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


def optimise_noise(pipe, prompts, seeds, loss_fn, device, iters, steps, cfg, lr=0.1):
    """DOODL-style: normalised gradient steps on x_T, then each latent rescaled to its original norm."""
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        cond = pipe.text_encoder(ids)[0]
        un = pipe.tokenizer([""] * len(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(device)
        uncond = pipe.text_encoder(un)[0]
    c = pipe.unet.config
    z0 = torch.stack([torch.randn(c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(s))
                      for s in seeds]).to(device)
    norm0 = z0.flatten(1).norm(dim=1)
    z = z0.clone().requires_grad_(True)
    with torch.no_grad():
        first = _ddim_chain(pipe, z0, cond, uncond, steps, cfg)
    for _ in range(iters):
        img = _ddim_chain(pipe, z, cond, uncond, steps, cfg)
        loss = loss_fn(img).sum()
        (g,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            g = g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1) * math.sqrt(z[0].numel())
            z -= lr * g
            z *= (norm0 / z.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    with torch.no_grad():
        last = _ddim_chain(pipe, z.detach(), cond, uncond, steps, cfg)
    return first, last


def measure_guidance_gaps(pipe, evaluator, classify, clip_model, clip_tok, head, device, n, iters, steps, cfg) -> dict:
    for p in list(pipe.unet.parameters()) + list(pipe.vae.parameters()) + list(pipe.text_encoder.parameters()):
        p.requires_grad_(False)
    rng = random.Random(0)
    colours = [rng.choice(D.COLOURS) for _ in range(n)]
    targets = torch.tensor([1 + (i % 4) for i in range(n)])  # triangle, square, pentagon, hexagon
    prompts = [D.with_article(f"{c} polygon") for c in colours]
    seeds = [EVAL_SEED + 100 + i for i in range(n)]
    out = {"items": n, "optimisation_steps": iters, "ddim_steps": steps, "guidance_scale": cfg,
           "task": "prompt 'a <colour> polygon', target = one of the 4 polygon classes (vocabulary expansion)"}

    def rates(first, last, guide_pred_fn):
        ev0, ev1 = evaluator(first)["shape"], evaluator(last)["shape"]
        with torch.no_grad():
            g0, g1 = guide_pred_fn(first).cpu(), guide_pred_fn(last).cpu()
        return {"guide_says_target_before_pct": round(100 * float((g0 == targets).float().mean()), 1),
                "guide_says_target_after_pct": round(100 * float((g1 == targets).float().mean()), 1),
                "evaluator_says_target_before_pct": round(100 * float((ev0 == targets).float().mean()), 1),
                "evaluator_says_target_after_pct": round(100 * float((ev1 == targets).float().mean()), 1),
                "evaluator_colour_kept_after_pct": round(100 * float(
                    (evaluator(last)["colour"] == torch.tensor([D.COLOURS.index(c) for c in colours])).float().mean()), 1)}

    t0 = time.time()
    first, last = optimise_noise(pipe, prompts, seeds, lambda im: F.cross_entropy(classify(im), targets.to(device), reduction="none"),
                                 device, iters, steps, cfg)
    out["classifier"] = rates(first, last, lambda im: classify(im).argmax(-1))
    # CLIP text guidance toward the fine class name
    texts = [D.with_article(f"{c} {D.SHAPES[int(t)]}") for c, t in zip(colours, targets)]
    with torch.no_grad():
        tfeat = F.normalize(clip_model.encode_text(clip_tok(texts).to(device)).float(), dim=-1)
        shape_txt = F.normalize(clip_model.encode_text(clip_tok([f"a {s}" for s in D.SHAPES]).to(device)).float(), dim=-1)

    def clip_loss(im):
        f = clip_image_features(clip_model, im)
        return 2 * torch.arcsin((f - tfeat).norm(dim=-1) / 2) ** 2  # spherical distance

    first, last = optimise_noise(pipe, prompts, seeds, clip_loss, device, iters, steps, cfg)
    out["clip_text"] = rates(first, last, lambda im: (clip_image_features(clip_model, im) @ shape_txt.t()).argmax(-1))
    out["clip_text"]["note"] = "guide's belief = shapes-CLIP zero-shot over 'a <shape>'"
    # aesthetic head: maximise
    w, b = head["weight"].to(device), head["bias"].to(device)
    score = lambda im: (clip_image_features(clip_model, im) @ w.t() + b).squeeze(-1)
    first, last = optimise_noise(pipe, prompts, seeds, lambda im: -score(im), device, iters, steps, cfg)
    with torch.no_grad():
        out["aesthetic"] = {"head_score_before": round(float(score(first).mean()), 2),
                            "head_score_after": round(float(score(last).mean()), 2),
                            "evaluator_quality_before": round(float(evaluator(first)["quality"].mean()), 2),
                            "evaluator_quality_after": round(float(evaluator(last)["quality"].mean()), 2)}
    out["seconds"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------------- report
def _md(results: dict) -> str:
    r = results
    L = [f"# Shapes world: measured quality", "", f"Measured on {r['machine']} on {r['date']} by "
         "`python -m doodl_lightning.shapes.quality` (fresh renders, seeds never used in training).", ""]
    if "vae" in r:
        L.append(f"- VAE reconstruction PSNR: **{r['vae']['psnr_db_mean']} dB** (mean over {r['vae']['n']} images; bar >= 32 dB)")
        if "evaluator_reads_reconstruction_pct" in r["vae"]:
            e = r["vae"]["evaluator_reads_reconstruction_pct"]
            L.append(f"- Evaluator on VAE reconstructions of {e['n_single_shape']} single shapes: fine shape {e['shape']}%, "
                     f"coarse shape {e['coarse_shape']}% (per shape {e['per_shape']}) -- a ceiling for generations")
    if "evaluator" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["evaluator"]["accuracy_pct"].items())
        L.append(f"- Evaluator accuracy: {acc}; quality MAE {r['evaluator']['quality_mae']} (bar >= 99% each)")
    if "classifier" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["classifier"]["accuracy_pct"].items())
        L.append(f"- Classifier (fine shape) accuracy: {acc} (bar >= 98% clean)")
    if "clip" in r:
        acc = ", ".join(f"{k} {v}%" for k, v in r["clip"]["zero_shot_accuracy_pct"].items())
        L.append(f"- shapes-CLIP zero-shot: {acc} (bar >= 90%)")
    if "aesthetic" in r:
        a = r["aesthetic"]
        L.append(f"- Aesthetic head vs procedural quality: Pearson {a['pearson_r']}, Spearman {a['spearman_r']}, MAE {a['mae']}")
    if "generation" in r:
        g = r["generation"]
        for g in [g] + list(r.get("generation_other_cfg", {}).values()):
            L.append(f"- Unguided generations ({g['scheduler']}, {g['num_inference_steps']} steps, CFG {g['guidance_scale']}, "
                     f"{g['n_per_prompt_set']} per set), evaluator match: full prompts {g['full_prompts_match_pct']}; "
                     f"short prompts {g['short_prompts_match_pct']}" + (" (bar >= 90% shape and colour)" if g is r["generation"] else ""))
    if "guidance_gaps" in r:
        gg = r["guidance_gaps"]
        L += ["", f"## Guide vs evaluator ({gg['task']}; {gg['items']} items, {gg['optimisation_steps']} noise-optimisation "
              f"steps through a {gg['ddim_steps']}-step DDIM chain, CFG {gg['guidance_scale']})", "",
              "| guide | guide says target (before -> after) | evaluator says target (before -> after) | colour kept |",
              "|---|---|---|---|"]
        for k in ("classifier", "clip_text"):
            v = gg[k]
            L.append(f"| {k} | {v['guide_says_target_before_pct']}% -> {v['guide_says_target_after_pct']}% | "
                     f"{v['evaluator_says_target_before_pct']}% -> {v['evaluator_says_target_after_pct']}% | "
                     f"{v['evaluator_colour_kept_after_pct']}% |")
        a = gg["aesthetic"]
        L += ["", f"Aesthetic head (maximised): head score {a['head_score_before']} -> {a['head_score_after']}, "
              f"evaluator's quality {a['evaluator_quality_before']} -> {a['evaluator_quality_after']}."]
    if "bars" in r:
        L += ["", "## Bars", ""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in r["bars"].items()]
    return "\n".join(L) + "\n"


def _bars(r: dict) -> dict:
    bars = {}
    if "vae" in r:
        bars["VAE PSNR >= 32 dB"] = r["vae"]["psnr_db_mean"] >= 32
    if "evaluator" in r:
        bars["evaluator >= 99% each attribute"] = min(r["evaluator"]["accuracy_pct"].values()) >= 99
    if "generation" in r:
        g = r["generation"]
        bars["generations match shape >= 90%"] = min(g["full_prompts_match_pct"]["coarse_shape"], g["short_prompts_match_pct"]["coarse_shape"]) >= 90
        bars["generations match colour >= 90%"] = min(g["full_prompts_match_pct"]["colour"], g["short_prompts_match_pct"]["colour"]) >= 90
    if "clip" in r:
        z = r["clip"]["zero_shot_accuracy_pct"]
        bars["CLIP zero-shot >= 90% (shape, colour)"] = min(z["shape"], z["colour"]) >= 90
        bars["CLIP zero-shot >= 90% (all attributes)"] = min(z.values()) >= 90
    if "classifier" in r:
        bars["classifier >= 98% clean"] = r["classifier"]["accuracy_pct"]["clean"] >= 98
    return bars


def update_cards(weights: Path, results: dict) -> None:
    sections = {"sd-shapes": ["vae", "generation", "generation_other_cfg", "guidance_gaps"], "shapes-clip": ["clip", "guidance_gaps"],
                "classifier": ["classifier", "guidance_gaps"], "aesthetic": ["aesthetic", "guidance_gaps"],
                "evaluator": ["evaluator"]}
    for d, keys in sections.items():
        card = weights / d / "README.md"
        if not card.exists():
            continue
        text = card.read_text()
        if text.count(QUALITY_MARK) != 2:
            continue
        sub = {k: results[k] for k in keys if k in results}
        if "guidance_gaps" in sub and d != "sd-shapes":
            gg = results["guidance_gaps"]
            name = {"shapes-clip": "clip_text", "classifier": "classifier", "aesthetic": "aesthetic"}[d]
            sub["guidance_gaps"] = {name: gg.get(name), "task": gg.get("task")}
        body = (f"Measured on {results['machine']}, {results['date']} (`python -m doodl_lightning.shapes.quality`; "
                f"all numbers in ../QUALITY.md):\n\n```json\n{json.dumps(sub, indent=1)}\n```")
        a, _, rest = text.partition(QUALITY_MARK)
        _, _, c = rest.partition(QUALITY_MARK)
        card.write_text(a + QUALITY_MARK + "\n" + body + "\n" + QUALITY_MARK + c)


def main(argv=None):
    from . import weights_dir
    from .evaluator import load_evaluator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=weights_dir())
    ap.add_argument("--out", type=Path, default=None, help="where quality.json / QUALITY.md go (default: --weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=2048, help="fresh renders per classification bar")
    ap.add_argument("--n-gen", type=int, default=240, help="generations per prompt set")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for unguided generations")
    ap.add_argument("--cfg", type=float, nargs="+", default=[RECOMMENDED_CFG, 7.5],
                    help="guidance scales for unguided generations; the first decides the bar (default: sd-shapes' "
                    "recommended scale, chosen on held-out prompts -- see its model card -- then SD's usual 7.5)")
    ap.add_argument("--gen-seed-offset", type=int, default=6, help="prompt sets EVAL_SEED + this and + this + 1")
    ap.add_argument("--gap-cfg", type=float, default=7.5, help="guidance scale of the guide-vs-evaluator runs")
    ap.add_argument("--gap-items", type=int, default=16)
    ap.add_argument("--gap-iters", type=int, default=15)
    ap.add_argument("--gap-steps", type=int, default=10)
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: vae evaluator classifier clip aesthetic generation gaps")
    ap.add_argument("--no-cards", action="store_true", help="do not write into the model cards")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script, not a measurement)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.n, a.n_gen, a.steps, a.gap_items, a.gap_iters, a.gap_steps = 16, 4, 2, 2, 1, 2
    out = a.out or a.weights
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    r: dict = {"machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timings_s": {}}

    def timed(name, fn):
        t0 = time.time()
        r[name] = fn()
        r["timings_s"][name] = round(time.time() - t0, 1)
        print(name, json.dumps(r[name]), flush=True)

    w = a.weights
    pipe = load_pipeline(w, dev) if (w / "sd-shapes").exists() else None
    evaluator = load_evaluator(w / "evaluator", device=dev) if (w / "evaluator").exists() else None
    classify = load_classifier(w, dev)[0] if (w / "classifier").exists() else None
    clip_model, clip_tok = load_clip(w, dev) if (w / "shapes-clip").exists() else (None, None)
    head = None
    if (w / "aesthetic" / "head.safetensors").exists():
        from safetensors.torch import load_file

        head = {k: v.float().to(dev) for k, v in load_file(str(w / "aesthetic" / "head.safetensors")).items()}
    if pipe is not None and "vae" not in a.skip:
        timed("vae", lambda: measure_vae(pipe, min(a.n, 1024), dev, evaluator))
    if evaluator is not None and "evaluator" not in a.skip:
        timed("evaluator", lambda: measure_evaluator(evaluator, a.n, dev))
    if classify is not None and "classifier" not in a.skip:
        timed("classifier", lambda: measure_classifier(classify, a.n, dev))
    if clip_model is not None and "clip" not in a.skip:
        timed("clip", lambda: measure_clip(clip_model, clip_tok, min(a.n, 512), dev))
    if clip_model is not None and head is not None and "aesthetic" not in a.skip:
        timed("aesthetic", lambda: measure_aesthetic(clip_model, head, a.n, dev))
    if pipe is not None and evaluator is not None and "generation" not in a.skip:
        timed("generation", lambda: measure_generation(pipe, evaluator, a.n_gen, dev, a.steps, a.cfg[0], a.gen_seed_offset))
        if len(a.cfg) > 1:
            timed("generation_other_cfg", lambda: {str(c): measure_generation(pipe, evaluator, a.n_gen, dev, a.steps, c,
                                                                              a.gen_seed_offset) for c in a.cfg[1:]})
    if None not in (pipe, evaluator, classify, clip_model, head) and "gaps" not in a.skip:
        timed("guidance_gaps", lambda: measure_guidance_gaps(pipe, evaluator, classify, clip_model, clip_tok, head, dev,
                                                             a.gap_items, a.gap_iters, a.gap_steps, a.gap_cfg))
    r["bars"] = _bars(r)
    (out / "quality.json").write_text(json.dumps(r, indent=2))
    (out / "QUALITY.md").write_text(_md(r))
    if not a.no_cards and not a.smoke:
        update_cards(w, r)
    print(_md(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
