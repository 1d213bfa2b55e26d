"""Interruptions at any moment: a signal between two steps, a signalled 2-process run resumed with
2 processes, and a resumed run directory that holds everything its results point to. Real processes where the
behaviour is the process's (signals, exit status, several processes); the tiny random pipeline of ``conftest.py``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import cli
from cli import StopOnSignal, main
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
    (one step here): exit 143 within 2 s with no final evaluation, images, contact sheet or resume line. The
    uninterrupted run (in process) gets SIGTERM while its final outputs are written: it ends as finished, as
    a run of several processes must (its ranks decided at on_train_end), and gives the handlers back."""
    moments = ("on_train_epoch_end", "on_train_epoch_start")

    def config(name: str, *extra) -> str:
        return write_config(tmp_path / f"{name}{'-killed' if extra else ''}.yaml", tiny_pipeline_dir, tmp_path / name,
                            steps=4, prompts=["a red circle"], callbacks=OUTPUTS + [RARE_CHECKPOINT, *extra])

    procs = {hook: cli_process("fit", "--config", config(hook, {"class_path": "killer.KillAt",
                                                               "init_args": {"step": 2, "hook": hook}}), wait=False)
             for hook in moments}
    handler = signal.getsignal(signal.SIGTERM)
    late = {"class_path": "killer.KillAt", "init_args": {"step": 4, "hook": "on_train_end"}}
    full = main(["fit", "--config", config("full", late)])  # meanwhile
    assert full.stopped_by is None and full.trainer.global_step == 4
    assert signal.getsignal(signal.SIGTERM) == handler  # given back, not Lightning's handler put back after the fit
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



# -- a signalled 2-process run, resumed with 2 processes -------------------------------------------------
def test_signals_to_one_rank_or_each_of_a_two_process_run_stop_both_after_one_step_and_resume_bit_identical(
        tmp_path, tiny_pipeline_dir, write_config):
    """A 2-process ``seed_parallel`` run of 3 steps, signalled as SLURM signals every task, but at different moments:
    rank 1 gets SIGTERM right after step 1 was written (after that step's agreement), rank 0 Ctrl-C during step 2.
    Both stop after step 2 (rank 1's signal counted one step later, SIGTERM over SIGINT), write the final outputs
    and both checkpoints (``last.ckpt`` off its schedule: both ranks save it), and exit 143. Resumed with 2
    processes, only rank 1 gets SIGTERM, after the last step's agreement: both still stop as signalled (the
    ``on_train_end`` agreement; without it rank 1 alone saved a checkpoint, a barrier, while rank 0 went into the
    final evaluation's collectives, and the exit statuses split 143 / 0), and every item ends bit for bit where a
    one-process run ends, losses included, at the same thread count (1 per process; the README gives the bound
    across thread counts). Lightning's handler broadcast from inside the signal handler: ranks signalled each hung
    in mismatched collectives."""
    def config(name: str, *extra, file: str | None = None) -> str:
        return write_config(tmp_path / f"{file or name}.yaml", tiny_pipeline_dir, tmp_path / name, steps=3,
                            prompts=["a red circle"], micro_batch=1, callbacks=OUTPUTS + [RARE_CHECKPOINT, *extra])

    def two_processes(*args) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "fit", *args, "--trainer.devices", "2",
                                 "--trainer.strategy", "seed_parallel"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish(proc: subprocess.Popen) -> tuple[str, str]:
        try:
            return proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # hung (the old handling): end both ranks, not only the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            raise

    def stopped(stdout: str, stderr: str, step: int, steps: int) -> None:
        # rank 0's exit status is the command's; each rank says on stderr that it took the stop branch, whose
        # agreed signal is also its exit status
        assert f"stopped by SIGTERM after step {step} of {steps}" in stdout and "--ckpt_path last" in stdout, stdout
        for rank in (0, 1):
            assert f"rank {rank}: SIGTERM: stopped after step {step}," in stderr, (rank, stderr[-3000:])

    def sigterm_after(step: int, hook: str, rank: int) -> dict:
        return {"class_path": "killer.KillAt", "init_args": {"step": step, "hook": hook, "rank": rank}}

    ctrl_c = {"class_path": "killer.KillAfter", "init_args": {"step": 1, "signal": "SIGINT", "mid_step": True, "rank": 0}}
    proc = two_processes("--config", config("two", sigterm_after(1, "on_train_epoch_end", 1), ctrl_c, file="killed"))
    torch.set_num_threads(1)  # what each of the 2 processes has (conftest restores the session's count)
    one = main(["fit", "--config", config("one")])  # meanwhile
    stdout, stderr = finish(proc)
    assert proc.returncode == 143, stderr[-3000:]
    stopped(stdout, stderr, 2, 3)
    run = tmp_path / "two/lightning_logs/version_0"
    recs = records(run)
    assert [(r["rank"], r["steps"]) for r in recs] == [(0, 2), (1, 2)] and all("final_loss" in r for r in recs)
    assert (run / "contact_sheet.png").is_file() and all(Path(r["final_image"]).is_file() for r in recs)
    for ckpt in ("last.ckpt", "last.ckpt.rank1"):
        assert torch.load(run / "checkpoints" / ckpt, weights_only=True)["global_step"] == 2, ckpt

    resumed = two_processes("--config", config("two", sigterm_after(3, "on_train_epoch_end", 1), file="resumed"),
                            "--ckpt_path", "last")
    stdout, stderr = finish(resumed)
    assert resumed.returncode == 143, stderr[-3000:]
    stopped(stdout, stderr, 3, 3)
    run = tmp_path / "two/lightning_logs/version_1"
    latents = {}
    for ckpt in ("last.ckpt", "last.ckpt.rank1"):  # saved only as the stopped step's: both ranks saved
        c = torch.load(run / "checkpoints" / ckpt, weights_only=True)
        assert c["global_step"] == 3
        latents.update({it["index"]: c["state_dict"]["latents"][j] for j, it in enumerate(c["doodl_items"])})
    assert sorted(latents) == [0, 1]
    for j, item in enumerate(one.model.local_items):
        assert torch.equal(latents[item.index], one.model.latents.detach()[j]), item.index
    without_rank = [{k: v for k, v in r.items() if k != "rank"} for r in strip_paths(records(run))]
    assert without_rank == [{k: v for k, v in r.items() if k != "rank"}
                            for r in strip_paths(records(tmp_path / "one/lightning_logs/version_0"))]


class _MaxWithOtherRank:
    """A stand-in strategy for a rank whose peer noted ``other``: ``reduce(max)`` as the all-reduce would give."""

    root_device = torch.device("cpu")

    def __init__(self, other: int):
        self.other = other

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "max"
        return torch.maximum(tensor, torch.tensor(self.other))


def test_each_rank_decides_on_the_agreed_signal_and_a_second_ctrl_c_still_abandons(monkeypatch):
    """In process, with stand-in trainers of a 2-process run. A rank that got Ctrl-C, agreed to stop for its peer's
    SIGTERM, still abandons the step at its second Ctrl-C (the agreed value overwrote its own signal, and the
    second Ctrl-C then only stopped it again). A rank that got nothing, when its peer's signal came after the last
    step's agreement, stops at on_train_end's agreement all the same: it saves the stopped step's last.ckpt
    (with its peer: a collective) and exits 143."""
    rank0 = StopOnSignal()
    trainer = SimpleNamespace(should_stop=False, world_size=2, global_rank=0, global_step=2,
                              strategy=_MaxWithOtherRank(signal.SIGTERM), checkpoint_callbacks=[])
    rank0._trainer = trainer
    rank0._on_sigint(signal.SIGINT, None)
    assert not trainer.should_stop  # several processes: the ranks agree at the end of the step
    rank0.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.should_stop
    with pytest.raises(KeyboardInterrupt):
        rank0._on_sigint(signal.SIGINT, None)
    assert rank0.signal == signal.SIGINT and rank0.stopped_by == signal.SIGTERM

    rank1, saved = StopOnSignal(), []
    ckpt = ModelCheckpoint(save_last=True, every_n_train_steps=100)
    # the stopped step's last.ckpt is saved through lightning_compat (Lightning's private save): recorded instead
    monkeypatch.setattr(cli, "save_unsaved_last_checkpoint", lambda cb, trainer: saved.append(trainer.global_step))
    trainer = SimpleNamespace(should_stop=False, world_size=2, global_rank=1, global_step=3,
                              strategy=_MaxWithOtherRank(0), checkpoint_callbacks=[ckpt])
    rank1._trainer = trainer
    rank1.on_train_batch_end(trainer, None, None, None, 0)  # the last step's agreement: nobody signalled yet
    assert not trainer.should_stop and rank1.stopped_by is None
    trainer.strategy.other = signal.SIGTERM  # the peer's signal lands after it
    rank1.on_train_end(trainer, None)
    assert rank1.signal is None and rank1.stopped_by == signal.SIGTERM and saved == [3]


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
