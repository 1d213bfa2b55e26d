"""``shapes.quality`` (the script behind the model cards' numbers) runs on the shipped weights at smoke sizes."""
import json

from doodl_lightning.shapes import quality, weights_dir


def test_quality_smoke_writes_every_measure_and_bar(tmp_path):
    before = (weights_dir() / "sd-shapes" / "README.md").read_text()
    assert quality.main(["--smoke", "--out", str(tmp_path), "--cfg", "2.5", "7.5"]) == 0
    r = json.loads((tmp_path / "quality.json").read_text())
    assert {"vae", "evaluator", "classifier", "clip", "aesthetic", "generation", "generation_other_cfg",
            "guidance_gaps", "bars"} <= set(r)
    assert r["generation"]["guidance_scale"] == 2.5 and list(r["generation_other_cfg"]) == ["7.5"]
    recon = r["vae"]["evaluator_reads_reconstruction_pct"]
    assert 0 <= recon["coarse_shape"] <= 100 and recon["coarse_shape"] >= recon["shape"]
    assert set(r["clip"]["zero_shot_accuracy_pct"]) == {"shape", "colour", "size", "position", "background"}
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
    assert (weights_dir() / "sd-shapes" / "README.md").read_text() == before  # --smoke never touches the cards
