"""The quality report's outputs (``shapes.quality``): ``QUALITY.md`` (``report_markdown``), the pass / fail
verdict of every bar (``bar_verdicts``) and the "Measured quality" section of each model card
(``update_cards``, between the cards' two ``QUALITY_MARK`` lines)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text
from .export import QUALITY_MARK

__all__ = ["bar_verdicts", "report_markdown", "update_cards"]


def report_markdown(results: dict) -> str:
    """``QUALITY.md``: every measured number, the guide-vs-evaluator table and the bars' verdicts."""
    r = results
    L = ["# Shapes world: measured quality", "", f"Measured on {r['machine']} on {r['date']} by "
         f"`{r.get('command', 'python -m doodl_lightning.shapes.quality')}` (fresh renders, seeds never used in training; "
         "every model from `ShapesWeights`, every model call through the framework)"
         + (f"; load average {r['load_average_at_start'][0]} at the start (other jobs share the machine)"
            if "load_average_at_start" in r else "")
         + (f"; {r['timings_s']['total']:.0f} s in all" if "total" in r.get("timings_s", {}) else "") + ".", ""]
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
            L.append(f"- Unguided generations (DDIM, {g['num_inference_steps']} steps on the model's grid {g['timesteps']}, "
                     f"CFG {g['guidance_scale']}, {g['n_per_prompt_set']} per set), evaluator match: full prompts "
                     f"{g['full_prompts_match_pct']}; short prompts {g['short_prompts_match_pct']}"
                     + (" (bar >= 90% shape and colour)" if g is r["generation"] else ""))
    if "guidance_gaps" in r:
        gg = r["guidance_gaps"]
        u = gg["update"]
        L += ["", f"## Guide vs evaluator ({gg['task']}; {gg['items']} items, {gg['optimisation_steps']} DOODL iterations "
              f"through a {gg['ddim_steps']}-step DDIM chain, CFG {gg['guidance_scale']})", "",
              f"The framework's `DOODL` module fitted by a Lightning `Trainer`: DDIM on the model's grid, backprop "
              f"`{gg['chain']['backprop']}`, the official update with grad_scale {u['grad_scale']:g}, clip_grad_val "
              f"{u['clip_grad_val']:g}, momentum {u['momentum']:g}, perturb_grad_scale {u['perturb_grad_scale']:g}, "
              f"renormalised latents ({gg['update_source']}); whole images (no cutouts).", "",
              "| guide | guide says target (before -> after) | evaluator says target (before -> after) | colour kept | guide loss (before -> after) |",
              "|---|---|---|---|---|"]
        for k in ("classifier", "clip_text"):
            v = gg[k]
            L.append(f"| {k} | {v['guide_says_target_before_pct']}% -> {v['guide_says_target_after_pct']}% | "
                     f"{v['evaluator_says_target_before_pct']}% -> {v['evaluator_says_target_after_pct']}% | "
                     f"{v['evaluator_colour_kept_after_pct']}% | {v['guide_loss_before_mean']} -> {v['guide_loss_after_mean']} |")
        a = gg["aesthetic"]
        L += ["", f"Aesthetic head (maximised): head score {a['head_score_before']} -> {a['head_score_after']}, "
              f"evaluator's quality {a['evaluator_quality_before']} -> {a['evaluator_quality_after']}."]
    if "bars" in r:
        L += ["", "## Bars", ""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in r["bars"].items()]
    return "\n".join(L) + "\n"


def bar_verdicts(r: dict) -> dict:
    """Each bar's verdict (bool) on the numbers measured; a bar whose part was not measured is absent."""
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
            sub["guidance_gaps"] = {name: gg.get(name), "task": gg.get("task"), "method": gg.get("method")}
        body = (f"Measured on {results['machine']}, {results['date']} (`python -m doodl_lightning.shapes.quality`; "
                f"all numbers in ../QUALITY.md):\n\n```json\n{json.dumps(sub, indent=1)}\n```")
        a, _, rest = text.partition(QUALITY_MARK)
        _, _, c = rest.partition(QUALITY_MARK)
        atomic_write_text(card, a + QUALITY_MARK + "\n" + body + "\n" + QUALITY_MARK + c)
