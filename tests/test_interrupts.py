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
