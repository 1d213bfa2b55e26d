"""Interruptions at any moment (issue 25 §3): a signal between two steps, a signalled 2-process run resumed with
2 processes, and a resumed run directory that holds everything its results point to. Real processes where the
behaviour is the process's (signals, exit status, several processes); the tiny random pipeline of ``conftest.py``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from test_faults import CHECKPOINT, OUTPUTS, cli_process, records, strip_paths

ROOT = Path(__file__).resolve().parents[1]
# last.ckpt only every 100 steps: the stopped step's checkpoint must come from the signal handling itself
RARE_CHECKPOINT = {**CHECKPOINT, "init_args": {**CHECKPOINT["init_args"], "every_n_train_steps": 100}}


# -- a signal at any moment of a step -------------------------------------------------------------------
def test_sigterm_between_two_steps_writes_the_final_outputs_and_resumes_bit_identical(
        tmp_path, tiny_pipeline_dir, write_config):
    """SIGTERM right after step 2 was written (every callback of the step done, the loop's own bookkeeping not) and
    right before step 3 begins: the run stops after step 2 with what a finished run writes, says how to resume and
    exits 143, like a SIGTERM during a step (``test_faults``). Lightning's own check raised at the end of the epoch
    (one step here): exit 143 within 2 s with no final evaluation, images, contact sheet or resume line."""
    moments = ("on_train_epoch_end", "on_train_epoch_start")

    def config(name: str, *extra) -> str:
        return write_config(tmp_path / f"{name}{'-killed' if extra else ''}.yaml", tiny_pipeline_dir, tmp_path / name,
                            steps=4, prompts=["a red circle"], callbacks=OUTPUTS + [RARE_CHECKPOINT, *extra])

    procs = {hook: cli_process("fit", "--config", config(hook, {"class_path": "killer.KillAt",
                                                               "init_args": {"step": 2, "hook": hook}}), wait=False)
             for hook in moments}
    full = main(["fit", "--config", config("full")])  # meanwhile
    for hook, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 143, (hook, stderr[-2000:])
        assert "stopped by SIGTERM after step 2 of 4" in stdout and "--ckpt_path last" in stdout, (hook, stdout)
        run = tmp_path / hook / "lightning_logs/version_0"
        recs = records(run)
        assert [rec["steps"] for rec in recs] == [2, 2] and all("final_loss" in rec for rec in recs), hook
        assert all(Path(rec["final_image"]).is_file() for rec in recs) and (run / "contact_sheet.png").is_file(), hook
        assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2, hook
    for hook in moments:
        resumed = main(["fit", "--config", config(hook), "--ckpt_path", "last"])
        assert resumed.trainer.global_step == 4, hook
        assert torch.equal(resumed.model.latents, full.model.latents), hook
        assert strip_paths(records(tmp_path / hook / "lightning_logs/version_1")) == strip_paths(
            records(tmp_path / "full/lightning_logs/version_0")), hook


# -- a resumed run's directory is self-contained --------------------------------------------------------
def test_a_resumed_run_directory_holds_the_images_its_results_name(tmp_path, tiny_pipeline_dir, write_config):
    """The best step came before the resume: the new version_N holds the best PNG (results.jsonl named the older
    folder's) and the step images logged before the resume (its contact sheet showed only the later columns), as
    hard links where the file system allows. A best image that is gone is named null, never a dead path.
    Each update is clipped to 1e-30, without perturbation, so no latent changes (float32): every step's loss equals
    step 0's, and the best step is step 0 whatever the model does."""
    import warnings

    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, tmp_path / "out", steps=2,
                       clip_grad_val=1e-30, perturb_grad_scale=0.0, callbacks=OUTPUTS + [CHECKPOINT])
    main(["fit", "--config", cfg])
    old, new = (tmp_path / f"out/lightning_logs/version_{v}" for v in (0, 1))
    main(["fit", "--config", cfg, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    recs = records(new)
    assert [r["best_step"] for r in recs] == [0] * len(recs)  # the situation this test is about
    for rec in recs:
        for key in ("best_image", "final_image"):
            path = Path(rec[key])
            assert path.parent.parent == new and path.is_file(), (key, path)
        assert (new / "images" / Path(rec["best_image"]).name).read_bytes() == (
            old / "images" / Path(rec["best_image"]).name).read_bytes()
    for item in range(len(recs)):
        for step in (0, 1):  # logged before the resume
            for view in ("", "upscaled"):
                before = old / f"images/item{item:03d}" / view / f"step{step:04d}.png"
                assert before.is_file() and (new / f"images/item{item:03d}" / view / f"step{step:04d}.png").read_bytes() \
                    == before.read_bytes(), (item, step, view)
    assert (new / "contact_sheet.png").is_file()

    (old / "images/item000_best.png").unlink()  # gone: resumed from the older folder's checkpoint again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", cfg, "--trainer.max_steps", "3", "--ckpt_path", str(old / "checkpoints/last.ckpt")])
    recs = records(tmp_path / "out/lightning_logs/version_2")
    assert recs[0]["best_image"] is None and Path(recs[1]["best_image"]).is_file()
    assert any("item 0: its best_image" in str(w.message) and "is gone" in str(w.message) for w in caught)
