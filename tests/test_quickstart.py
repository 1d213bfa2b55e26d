"""The README's main job runs end to end (shortened) on the shipped shapes world."""
from __future__ import annotations

import json
from pathlib import Path

from cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_writes_images_results_and_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the config names the shipped weights relative to the repository
    cli = main(["fit", "--config", "experiments/quickstart.yaml", "--trainer.max_steps", "2",
                "--model.seeds", "[0, 1]", "--trainer.default_root_dir", str(tmp_path)])
    run = tmp_path / "lightning_logs/version_0"
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1] and all(r["steps"] == 2 for r in records)
    assert (run / "contact_sheet.png").is_file() and list(run.glob("events.out.tfevents.*"))
    assert cli.model.last.terms.keys() == {"clip_text"}
    # the run ends by naming each item's losses and where its outputs are
    out = capsys.readouterr().out.split("DOODL finished:")[1]
    for r in records:
        assert f"seed {r['seed']:<6d} loss {r['initial_loss']:.4f} -> best {r['best_loss']:.4f}" in out
    assert f"results:       {run / 'results.jsonl'}" in out and f"contact sheet: {run / 'contact_sheet.png'}" in out
    assert f"tensorboard --logdir {run}" in out
