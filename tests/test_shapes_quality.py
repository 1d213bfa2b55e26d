"""``shapes.quality`` (the script behind the model cards' numbers) runs on the shipped weights at smoke sizes,
through the framework: generations by the core's sampler, guide-vs-evaluator runs by the DOODL module."""
import json

from doodl_lightning import module as M
from doodl_lightning.shapes import quality, quality_gaps, weights_dir

GAP_GUIDES = ("classifier", "clip_text")
RATE_KEYS = {"guide_says_target_before_pct", "guide_says_target_after_pct", "evaluator_says_target_before_pct",
             "evaluator_says_target_after_pct", "evaluator_colour_kept_after_pct"}


def _is_share_of(pct: float, items: int) -> bool:
    """``pct`` (rounded to 0.1) is 100 k / items for a whole number k of items."""
    k = round(pct * items / 100)
    return 0 <= k <= items and abs(pct - 100 * k / items) <= 0.05 + 1e-9


def test_quality_smoke_writes_every_measure_and_bar(tmp_path, monkeypatch):
    steps = []
    original = M.DOODL.training_step

    def counted(self, batch, batch_idx):
        steps.append(len(self.local_items))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(M.DOODL, "training_step", counted)
    before = (weights_dir() / "sd-shapes" / "README.md").read_text()
    assert quality.main(["--smoke", "--out", str(tmp_path), "--cfg", "2.5", "7.5", "--gap-items", "3"]) == 0
    r = json.loads((tmp_path / "quality.json").read_text())
    assert {"vae", "evaluator", "classifier", "clip", "aesthetic", "generation", "generation_other_cfg",
            "guidance_gaps", "bars"} <= set(r)
    assert r["generation"]["guidance_scale"] == 2.5 and list(r["generation_other_cfg"]) == ["7.5"]
    assert r["generation"]["timestep_grid"] == "model" and r["generation"]["timesteps"] == "501, 1"  # 2 steps, offset 1
    recon = r["vae"]["evaluator_reads_reconstruction_pct"]
    assert 0 <= recon["coarse_shape"] <= 100 and recon["coarse_shape"] >= recon["shape"]
    assert set(r["clip"]["zero_shot_accuracy_pct"]) == {"shape", "colour", "size", "position", "background"}

    # guide vs evaluator: the framework's DOODL module, fitted by a Trainer, for every item of every guide
    gg = r["guidance_gaps"]
    n, iters = gg["items"], gg["optimisation_steps"]
    assert (n, iters, gg["ddim_steps"], gg["guidance_scale"]) == (3, 1, 2, 7.5)
    assert gg["chain"] == {"sampler": "ddim", "backprop": "checkpoint", "timestep_grid": "model"}
    assert gg["update"] == quality_gaps.GAP_UPDATE
    prompts, targets, seeds, _ = quality_gaps.gap_items(n)
    groups = {"classifier": len(set(zip(prompts, targets))), "clip_text": len(set(zip(prompts, targets))),
              "aesthetic": len(set(prompts))}
    for guide, modules in groups.items():
        assert gg[guide]["doodl_modules"] == modules
    # each module optimised its items for ``iters`` Trainer steps, and every item was optimised once per guide
    assert len(steps) == iters * sum(groups.values()) and sum(steps) == iters * n * len(groups)
    for guide in GAP_GUIDES:
        v = gg[guide]
        assert RATE_KEYS <= set(v)
        for k in RATE_KEYS:  # percentages of the item count, not of anything else
            assert _is_share_of(v[k], n), (guide, k, v[k])
        assert v["guide_loss_before_mean"] >= 0 and v["guide_loss_after_mean"] >= 0
    # the same unoptimised chain for every guide: the evaluator's "before" verdict cannot depend on the guide
    assert len({gg[g]["evaluator_says_target_before_pct"] for g in GAP_GUIDES}) == 1
    a = gg["aesthetic"]
    assert {"head_score_before", "head_score_after", "evaluator_quality_before", "evaluator_quality_after"} <= set(a)

    # every bar is the verdict of its threshold on the numbers measured
    g, z = r["generation"], r["clip"]["zero_shot_accuracy_pct"]
    expected = {
        "VAE PSNR >= 32 dB": r["vae"]["psnr_db_mean"] >= 32,
        "evaluator >= 99% each attribute": min(r["evaluator"]["accuracy_pct"].values()) >= 99,
        "generations match shape >= 90%": min(g[k]["coarse_shape"] for k in ("full_prompts_match_pct", "short_prompts_match_pct")) >= 90,
        "generations match colour >= 90%": min(g[k]["colour"] for k in ("full_prompts_match_pct", "short_prompts_match_pct")) >= 90,
        "CLIP zero-shot >= 90% (shape, colour)": min(z["shape"], z["colour"]) >= 90,
        "CLIP zero-shot >= 90% (all attributes)": min(z.values()) >= 90,
        "classifier >= 98% clean": r["classifier"]["accuracy_pct"]["clean"] >= 98,
    }
    assert r["bars"] == expected and all(type(v) is bool for v in r["bars"].values())
    # the shipped measurement models pass their bars even at smoke sizes; 2-step generations do not
    # (so both verdicts, and their PASS / FAIL lines below, are exercised)
    assert r["bars"]["evaluator >= 99% each attribute"] and r["bars"]["classifier >= 98% clean"]
    assert r["bars"]["CLIP zero-shot >= 90% (shape, colour)"]
    assert not r["bars"]["generations match shape >= 90%"]
    md = (tmp_path / "QUALITY.md").read_text()
    bars_md = md.partition("## Bars")[2].strip().split("\n\n")[0].splitlines()
    assert bars_md == [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in expected.items()]
    assert "CFG 2.5" in md and "CFG 7.5" in md
    # the guide-vs-evaluator table shows the JSON's numbers
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| c")}
    for guide in GAP_GUIDES:
        v = gg[guide]
        assert (f"{v['guide_says_target_before_pct']}% -> {v['guide_says_target_after_pct']}% | "
                f"{v['evaluator_says_target_before_pct']}% -> {v['evaluator_says_target_after_pct']}%") in rows[guide]
    assert (weights_dir() / "sd-shapes" / "README.md").read_text() == before  # --smoke never touches the cards
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left behind


def test_quality_sizes_and_items():
    # --quick is a real measurement (the full chain and iterations of the report), only on fewer items
    assert quality.SIZES["quick"]["gap_steps"] == 10 and quality.SIZES["quick"]["gap_iters"] == 15
    prompts, targets, seeds, colours = quality_gaps.gap_items(16)
    assert all(p == f"a {c} polygon" or p == f"an {c} polygon" for p, c in zip(prompts, colours))
    assert targets[:4] == [1, 2, 3, 4] and len(set(seeds)) == 16
