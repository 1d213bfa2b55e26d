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
    assert all(isinstance(v, bool) for v in r["bars"].values())
    md = (tmp_path / "QUALITY.md").read_text()
    assert "CFG 2.5" in md and "CFG 7.5" in md
    assert (weights_dir() / "sd-shapes" / "README.md").read_text() == before  # --smoke never touches the cards
