"""``shapes.train_all``: the one command that retrains the shapes world (stage commands, time caps, a smoke run)."""
from pathlib import Path

import pytest

from doodl_lightning.shapes import train_all as TA

ROOT = Path(__file__).resolve().parents[1]


def test_scale_time_scales_lightning_max_time():
    assert TA.scale_time("00:00:20:00", 0.5) == "00:00:10:00"
    assert TA.scale_time("00:01:25:00", 0.5) == "00:00:42:30"
    assert TA.scale_time("00:00:04:00", 1.0) == "00:00:04:00"
    assert TA.scale_time("00:23:00:00", 2.0) == "01:22:00:00"


def test_cpu_profile_fits_two_hours_and_chains_wire_stages(tmp_path):
    # the chains run in parallel, so the slowest chain's caps bound the training time
    def minutes(stage, scale=1.0):
        cmd = TA.stage_command(stage, tmp_path / "out", tmp_path / "work", "cpu", time_scale=scale)
        return TA.max_time_seconds(cmd[cmd.index("--trainer.max_time") + 1]) / 60

    longest = max(sum(minutes(s) for s in chain) for chain in TA.CHAINS["cpu"])
    assert longest <= 110, longest  # leaves time for start-up, export and the quality run within 2 h
    assert max(sum(minutes(s, 0.5) for s in chain) for chain in TA.CHAINS["cpu"]) == pytest.approx(longest / 2, abs=0.1)
    # every stage has a config, each dependent stage reads what its predecessor exports
    for chain in TA.CHAINS["cpu"]:
        for stage in chain:
            assert (ROOT / TA.CONFIG_DIR / f"{stage}.yaml").is_file()
    diff = TA.stage_command("diffusion", tmp_path / "out", tmp_path / "work", "cpu")
    assert diff[diff.index("--model.init_args.vae_path") + 1] == str(tmp_path / "work" / "vae")
    vae = TA.stage_command("vae", tmp_path / "out", tmp_path / "work", "cpu")
    assert vae[vae.index("--model.init_args.export_dir") + 1] == str(tmp_path / "work" / "vae")
    aes = TA.stage_command("aesthetic", tmp_path / "out", tmp_path / "work", "cpu")
    assert aes[aes.index("--model.init_args.clip_dir") + 1] == str(tmp_path / "out" / "shapes-clip")


def test_time_scale_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        TA.main(["--time-scale", "0", "--out", str(tmp_path / "w"), "--work", str(tmp_path / "work")])
    assert e.value.code == 2
    assert "--time-scale must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing half-made


@pytest.mark.slow
def test_smoke_profile_trains_and_exports_every_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, work = tmp_path / "weights", tmp_path / "work"
    assert TA.main(["--profile", "smoke", "--out", str(out), "--work", str(work), "--no-quality"]) == 0
    for f in ("sd-shapes/model_index.json", "sd-shapes/unet/diffusion_pytorch_model.safetensors",
              "sd-shapes/vae/diffusion_pytorch_model.safetensors", "shapes-clip/open_clip_model.safetensors",
              "aesthetic/head.safetensors", "classifier/model.safetensors", "evaluator/model.safetensors"):
        assert (out / f).is_file(), f
    import json

    summary = json.loads((work / "train_all.json").read_text())
    assert set(summary["stages"]) == set(TA.EXPORT) and all(v["returncode"] == 0 for v in summary["stages"].values())
