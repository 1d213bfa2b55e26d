"""Faults and hostile input through ``cli.py fit``: signals, resuming, concurrent runs and paths
from another directory, half-written files, corrupt inputs. Real subprocesses where the behaviour is the process's (exit
status, signals, parallel runs); the tiny random pipeline of ``conftest.py`` everywhere."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from cli import main, run_cli

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0}}
OUTPUTS = [{"class_path": "callbacks.ResultsWriter"},
           {"class_path": "callbacks.ImageLogger", "init_args": {"every_n_steps": 1}}]


def cli_process(*args, cwd=ROOT, wait=True, **kw):
    """``python cli.py *args`` as its own process, with this process's thread count (so its float32 numbers
    are this process's) and the tests on the path (for ``killer.KillAfter``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


# the shipped shapes-CLIP weights named relative to the repository, as experiments/quickstart.yaml names them
SHAPES_CLIP = "doodl_lightning/shapes/weights/shapes-clip"
SHAPES_CLIP_GUIDANCE = [{"class_path": "doodl_lightning.guidance.CLIPTextGuidance",
                         "init_args": {"model_config": f"{SHAPES_CLIP}/shapes-clip.json",
                                       "pretrained": f"{SHAPES_CLIP}/open_clip_model.safetensors", "num_cuts": 1}}]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]


def strip_paths(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_image")} for r in recs]


def last_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_pipeline_dir, write_config):
    """One finished 2-step run (its config and checkpoint are the material of several tests)."""
    tmp = tmp_path_factory.mktemp("done")
    cfg = write_config(tmp / "run.yaml", tiny_pipeline_dir, tmp / "out", steps=2, callbacks=OUTPUTS + [CHECKPOINT])
    main(["fit", "--config", cfg])
    return cfg, tmp / "out/lightning_logs/version_0"


# -- 1. signals ----------------------------------------------------------------------------------------
def killed_run(tmp_path: Path, pipe: str, write_config, name: str, signal: str, times: int = 1, rarely: bool = False):
    """``cli.py fit`` (4 steps, 2 items) started in its own process, sent ``signal`` ``times`` times during step 3;
    ``rarely``: its ModelCheckpoint would save only every 100 steps. Returns (process, config writer)."""
    ckpt = {**CHECKPOINT, "init_args": {**CHECKPOINT["init_args"], "every_n_train_steps": 100 if rarely else 1}}
    killer = {"class_path": "killer.KillAfter", "init_args": {"step": 2, "signal": signal, "mid_step": True, "times": times}}

    def config(*extra):  # its own file per variant: the process may still be reading the killer's
        return write_config(tmp_path / f"{name}{'-killed' if extra else ''}.yaml", pipe, tmp_path / name, steps=4,
                            prompts=["a red circle"], callbacks=OUTPUTS + [ckpt, *extra])

    return cli_process("fit", "--config", config(killer), wait=False), config


# SIGINT's subprocess is slow (its handler's first press is the fast twin's first assertion,
# test_a_second_ctrl_c_abandons_the_step_fast); SIGTERM's runs by default
@pytest.mark.parametrize("sig,status", [("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)])
def test_sigterm_and_ctrl_c_finish_the_step_write_the_final_state_and_exit_nonzero_then_resume_bit_identical(
        tmp_path, tiny_pipeline_dir, write_config, sig, status):
    """SIGTERM (or a first Ctrl-C) lands during step 3 of 4: that step completes, then the final evaluation, images,
    contact sheet, results.jsonl and last.ckpt are written (last.ckpt although its schedule would skip step 3) and
    the exit status is 143 (130). The same command with ``--ckpt_path last`` then ends bit for bit where an
    uninterrupted run ends."""
    proc, config = killed_run(tmp_path, tiny_pipeline_dir, write_config, sig, sig, rarely=True)
    full = main(["fit", "--config", config(), "--trainer.default_root_dir", str(tmp_path / "full")])  # meanwhile
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == status, (sig, stderr[-2000:])
    assert f"stopped by {sig} after step 3 of 4" in stdout
    run = tmp_path / sig / "lightning_logs/version_0"
    recs = records(run)
    assert [rec["steps"] for rec in recs] == [3, 3] and all("final_loss" in rec for rec in recs)
    assert all(Path(rec["final_image"]).is_file() for rec in recs) and (run / "contact_sheet.png").is_file()
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    resumed = main(["fit", "--config", config(), "--ckpt_path", "last"])  # the same command, resumed
    assert resumed.trainer.global_step == 4
    assert torch.equal(resumed.model.latents, full.model.latents)
    assert strip_paths(records(tmp_path / f"{sig}/lightning_logs/version_1")) == strip_paths(
        records(tmp_path / "full/lightning_logs/version_0"))


@pytest.mark.slow  # fast twin: test_a_second_ctrl_c_abandons_the_step_fast
def test_a_second_ctrl_c_abandons_the_step_and_keeps_the_previous_one(tmp_path, tiny_pipeline_dir, write_config):
    proc, _ = killed_run(tmp_path, tiny_pipeline_dir, write_config, "twice", "SIGINT", times=2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    run = tmp_path / "twice/lightning_logs/version_0"
    recs = records(run)  # step 2's, complete; no final evaluation
    assert [r["steps"] for r in recs] == [2, 2] and not any("final_loss" in r for r in recs)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


class InterruptAt(Callback):
    """Raise KeyboardInterrupt at the start of step ``step + 1``, where the second Ctrl-C's handler raises it
    (``class_path: test_faults.InterruptAt``): in process, without a real signal reaching pytest."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_a_second_ctrl_c_abandons_the_step_fast(tmp_path, tiny_pipeline_dir, write_config):
    """The default-suite twin of the slow test above: the handler stops after the step at the first Ctrl-C and
    raises at the second; that KeyboardInterrupt mid-step exits 130 and keeps the previous step's outputs."""
    import signal
    from types import SimpleNamespace

    from cli import StopOnSignal

    stopper = StopOnSignal()
    stopper._trainer = SimpleNamespace(should_stop=False, world_size=1)  # one process: the handler stops it
    stopper._on_sigint(signal.SIGINT, None)
    assert stopper._trainer.should_stop and stopper.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stopper._on_sigint(signal.SIGINT, None)
    out = tmp_path / "twice"
    cfg = write_config(tmp_path / "twice.yaml", tiny_pipeline_dir, out, steps=4, prompts=["a red circle"],
                       callbacks=OUTPUTS + [CHECKPOINT, {"class_path": "test_faults.InterruptAt", "init_args": {"step": 2}}])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", cfg, "--model.steps", "2"])
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is handler  # the handlers given back
    run = out / "lightning_logs/version_0"
    recs = records(run)  # step 2's, complete; no final evaluation
    assert [r["steps"] for r in recs] == [2, 2] and not any("final_loss" in r for r in recs)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


# -- 2. resume safety --------------------------------------------------------------------------------------
def test_resume_with_different_settings_is_one_line_listing_the_keys_and_writes_nothing(done, tmp_path):
    cfg, run = done
    ckpt = str(run / "checkpoints/last.ckpt")
    out = tmp_path / "resumed"
    changed = ["--model.seeds", "[5, 6]", "--model.steps", "6", "--model.grad_scale", "2.0",
               "--model.guidance", '[{"class_path": "doodl_lightning.guidance.SymmetryGuidance", "init_args": {"weight": 3.0}}]']
    with pytest.raises(ValueError) as e:
        main(["fit", "--config", cfg, "--trainer.default_root_dir", str(out), "--ckpt_path", ckpt, *changed])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {ckpt} was made by a different run")
    for key in ("model.items (prompts x seeds) [0] ['a red circle', 0] -> ['a red circle', 5]", "model.steps 4 -> 6",
                "model.grad_scale 1.0 -> 2.0", "model.guidance[0].weight 1.0 -> 3.0"):
        assert key in msg, (key, msg)
    assert "config.yaml" in msg and not out.exists()


def test_resume_with_another_cli_optimizer_is_refused(done, tmp_path):
    """--optimizer / --lr_scheduler replace the module's update; torch's load_state_dict would restore the
    checkpoint's lr over the one asked for, so a resume with another one ran silently with the old lr."""
    cfg, run = done
    ckpt = str(run / "checkpoints/last.ckpt")
    out = tmp_path / "other_optimizer"
    with pytest.raises(ValueError) as e:
        main(["fit", "--config", cfg, "--trainer.default_root_dir", str(out), "--ckpt_path", ckpt,
              "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.5"])
    msg = str(e.value)
    assert "\n" not in msg and "optimizer None -> {'class_path': 'torch.optim.Adam'" in msg, msg
    assert not out.exists()


def test_the_module_itself_refuses_a_checkpoint_of_another_trajectory(done, tiny_pipeline_dir):
    """The same check in ``on_load_checkpoint``, for fits that do not come through cli.py."""
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.module import DOODL

    _, run = done
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    kw = dict(model=tiny_pipeline_dir, prompts=["a red circle", "a blue square"], seeds=[0, 1], steps=4,
              guidance_scale=3.0, grad_scale=1.0, clip_grad_val=0.025)
    same = DOODL(guidance=[SymmetryGuidance()], **kw).prepare()
    same.on_load_checkpoint(ckpt)  # what it was made with: accepted
    other = DOODL(guidance=[SymmetryGuidance()], **{**kw, "mix_weight": 0.9}).prepare()
    with pytest.raises(ValueError, match=r"model.mix_weight 0.93 -> 0.9\)"):
        other.on_load_checkpoint(ckpt)


def test_resume_runs_the_config_not_the_checkpoints_hyperparameters(done, tmp_path):
    """LightningCLI used to replace the model's settings by the checkpoint's; a setting that does not change
    the trajectory (micro_batch) now takes the config's value, and the resume goes on."""
    cfg, run = done
    cli = main(["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
                "--model.micro_batch", "1", "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    assert cli.model.hparams.micro_batch == 1 and cli.trainer.global_step == 3


# -- 3. concurrent runs, 7. paths relative to the config file or the repository -----------------------------
@pytest.mark.slow  # fast twin: test_a_config_run_from_another_directory_finds_its_inputs
def test_runs_started_at_once_from_another_directory_find_their_inputs_and_get_a_run_directory_each(
        tmp_path, tiny_pipeline_dir, write_config):
    """Two runs started at once from an unrelated working directory, into the same output directory: each finds
    the prompt file beside its config and the shipped shapes-CLIP weights in the repository (named as in
    experiments/quickstart.yaml), and each gets its own version_N with its own config, results and checkpoint
    (Lightning picked N by listing the folder: runs started together shared one)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "prompts.txt").write_text("a green circle\n")
    weights, guidance = SHAPES_CLIP, SHAPES_CLIP_GUIDANCE
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    procs = [cli_process("fit", "--config", write_config(
        configs / f"seed{seed}.yaml", tiny_pipeline_dir, Path("out"), steps=1, prompts=None, prompt_file="prompts.txt",
        seeds=[seed], guidance=guidance, callbacks=[{"class_path": "callbacks.ResultsWriter"}, CHECKPOINT]),
        cwd=elsewhere, wait=False) for seed in (0, 1)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
    runs = sorted((elsewhere / "out/lightning_logs").iterdir())  # outputs: relative to the working directory
    assert [d.name for d in runs] == ["version_0", "version_1"]
    seeds = []
    for d in runs:
        saved = yaml.safe_load((d / "config.yaml").read_text())["model"]["init_args"]
        assert saved["prompt_file"] == str(configs / "prompts.txt")  # config.yaml records what was read
        assert saved["guidance"][0]["init_args"]["pretrained"] == str(ROOT / weights / "open_clip_model.safetensors")
        assert [(r["prompt"], r["seed"]) for r in records(d)] == [("a green circle", s) for s in saved["seeds"]]
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["last.ckpt"]
        seeds += saved["seeds"]
    assert sorted(seeds) == [0, 1]


def test_a_config_run_from_another_directory_finds_its_inputs(tmp_path, tiny_pipeline_dir, write_config, monkeypatch):
    """The default-suite twin of the slow test above (one run, in process, 1 step): from an unrelated working
    directory the prompt file is found beside its config and the shipped weights in the repository."""
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    configs.mkdir()
    elsewhere.mkdir()
    (configs / "prompts.txt").write_text("a green circle\n")
    weights, guidance = SHAPES_CLIP, SHAPES_CLIP_GUIDANCE
    cfg = write_config(configs / "run.yaml", tiny_pipeline_dir, Path("out"), steps=1, prompts=None,
                       prompt_file="prompts.txt", seeds=[0], guidance=guidance, callbacks=[])
    monkeypatch.chdir(elsewhere)
    cli = main(["fit", "--config", cfg])
    assert [it.prompt for it in cli.model.items] == ["a green circle"]
    saved = yaml.safe_load((elsewhere / "out/lightning_logs/version_0/config.yaml").read_text())["model"]["init_args"]
    assert saved["prompt_file"] == str(configs / "prompts.txt")  # config.yaml records what was read
    assert saved["guidance"][0]["init_args"]["pretrained"] == str(ROOT / weights / "open_clip_model.safetensors")


def test_claimed_run_directories_are_unique_under_a_race(tmp_path):
    """32 threads claim at once, after listing the same folder: each gets its own version_N."""
    import threading

    from doodl_lightning.io import claim_version

    start, got = threading.Barrier(32), []

    def claim():
        start.wait()
        got.append(claim_version(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(32)) and len(list(tmp_path.iterdir())) == 32


def test_a_directory_another_run_is_writing_is_refused_in_one_line(done, tmp_path, capsys):
    """A run directory named by the user (a fixed logger version) is locked while a run writes it."""
    from doodl_lightning.io import lock_directory

    cfg, _ = done
    busy = tmp_path / "lightning_logs/fixed"
    fd = lock_directory(busy)  # flock: another open file description, as another process would hold
    try:
        rc = run_cli(["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger",
                      '{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": '
                      f'{{"save_dir": "{tmp_path}", "version": "fixed"}}}}'])
    finally:
        os.close(fd)
    assert rc == 2
    assert last_error_line(capsys.readouterr().err) == (
        f"error: output directory {busy} is in use by another run that is still writing to it: wait for it, "
        "or give this run another --trainer.default_root_dir (or callback dirpath)")
    assert list(busy.iterdir()) == []


# -- 4. nothing half-written -----------------------------------------------------------------------------
def test_a_run_refused_for_a_bad_value_leaves_nothing(tmp_path, tiny_pipeline_dir, write_config, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_pipeline_dir, out)
    assert run_cli(["fit", "--config", cfg, "--model.grad_scale", "-1"]) == 2
    assert last_error_line(capsys.readouterr().err) == "error: grad_scale must be > 0 (it multiplies the loss), got -1.0"
    assert not out.exists()


class FailAtStart(Callback):
    """Fails after the run directory has its config.yaml and TensorBoard file, before the first step."""

    def on_train_start(self, trainer, pl_module):
        assert (Path(trainer.log_dir) / "config.yaml").is_file()  # the situation this test is about
        raise ValueError("failed before the first step")


def test_a_run_failing_before_its_first_step_leaves_nothing(tmp_path, tiny_pipeline_dir, write_config):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_pipeline_dir, out,
                       callbacks=OUTPUTS + [CHECKPOINT, {"class_path": "test_faults.FailAtStart"}])
    with pytest.raises(ValueError, match="failed before the first step"):
        main(["fit", "--config", cfg])
    assert list((out / "lightning_logs").iterdir()) == []


def test_config_yaml_is_written_whole_or_not_at_all(tmp_path, tiny_pipeline_dir, write_config, monkeypatch):
    """The process dies between writing config.yaml and making it visible (``os.replace`` fails): the run
    directory, named by the user and so kept, has no config.yaml, whole or half, and no temporary file."""
    import doodl_lightning.io

    def dies(src, dst):
        raise OSError(f"killed before {dst} was complete")

    monkeypatch.setattr(doodl_lightning.io.os, "replace", dies)
    out = tmp_path / "out"
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(out), "version": "v"}}
    with pytest.raises(OSError, match="config.yaml was complete"):
        main(["fit", "--config", write_config(tmp_path / "c.yaml", tiny_pipeline_dir, out), "--trainer.logger",
              json.dumps(logger)])
    run = out / "lightning_logs/v"
    assert run.is_dir() and sorted(p.name for p in run.iterdir() if "config" in p.name) == []


# -- 5. one-line errors naming the file and the fix --------------------------------------------------------
def truncated_copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def pickled(dst: Path, obj) -> Path:
    """A real pickle with more than tensors in it (an argparse.Namespace): what weights-only loading refuses."""
    torch.save({"state": obj, "meta": argparse.Namespace(note="not a tensor")}, dst)
    return dst


def corrupt_cases(tmp: Path, pipe: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra CLI arguments, the start of the one-line error)."""
    unet = "unet/diffusion_pytorch_model"
    trunc_dir = tmp / "pipe_truncated"
    shutil.copytree(pipe, trunc_dir)
    truncated_copy(pipe / f"{unet}.safetensors", trunc_dir / f"{unet}.safetensors")
    bin_dir = tmp / "pipe_bin"
    shutil.copytree(pipe, bin_dir)
    from safetensors.torch import load_file

    unet_weights = load_file(str(pipe / f"{unet}.safetensors"))
    (bin_dir / f"{unet}.safetensors").unlink()
    pickled(bin_dir / f"{unet}.bin", unet_weights)
    ckpt = run / "checkpoints/last.ckpt"
    return {
        "truncated safetensors in the model directory": (
            ["--model.model", str(trunc_dir)],
            f"error: model weights file {trunc_dir / unet}.safetensors is truncated or corrupt"),
        "pickled .bin in the model directory": (
            ["--model.model", str(bin_dir)],
            f"error: model weights file {bin_dir / unet}.bin is a pickle that holds more than tensors (found argparse.Namespace)"),
        "pickle as the single-file model": (
            ["--model.model", str(pickled(tmp / "model.ckpt", unet_weights)), "--model.model_config", str(pipe)],
            f"error: model weights file {tmp / 'model.ckpt'} is a pickle that holds more than tensors"),
        "truncated checkpoint": (
            ["--ckpt_path", str(truncated_copy(ckpt, tmp / "truncated.ckpt"))],
            f"error: checkpoint {tmp / 'truncated.ckpt'} cannot be read: it is truncated or corrupt"),
        "pickled checkpoint": (
            ["--ckpt_path", str(pickled(tmp / "pickled.ckpt", torch.load(ckpt, weights_only=True)))],
            f"error: checkpoint {tmp / 'pickled.ckpt'} cannot be read: it is a pickle that holds more than tensors"),
    }


def test_corrupt_models_and_checkpoints_are_one_line_naming_the_file(done, tmp_path, tiny_pipeline_dir, capsys):
    cfg, run = done
    for name, (extra, expected) in corrupt_cases(tmp_path, Path(tiny_pipeline_dir), run).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        assert run_cli(["fit", "--config", cfg, "--trainer.default_root_dir", str(out), *extra]) == 2, name
        line = last_error_line(capsys.readouterr().err)
        assert line.startswith(expected), (name, line)
        assert "re-download" in line or "resume from an intact checkpoint" in line, line  # the fix
        assert not out.exists(), name


def test_bad_output_directories_are_one_line(done, tmp_path, capsys, monkeypatch):
    cfg, _ = done
    (tmp_path / "file").write_text("a regular file")
    assert run_cli(["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp_path / "file/out")]) == 2
    assert last_error_line(capsys.readouterr().err) == (
        f"error: output directory {tmp_path / 'file/out/lightning_logs'} is not writable (Not a directory): "
        "choose another with --trainer.default_root_dir or the callback's dirpath")
    # a read-only file system: no unprivileged test can mount one, so the OS's answer is given by hand
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert run_cli(["fit", "--config", cfg, "--trainer.default_root_dir", str(tmp_path / "ro")]) == 2
    assert last_error_line(capsys.readouterr().err).startswith(
        f"error: output directory {tmp_path / 'ro/lightning_logs'} is not writable (Read-only file system): choose another")


def test_bad_config_and_prompt_files_are_one_line_naming_the_file(done, tmp_path, capsys):
    cfg, run = done
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(Path(cfg).read_text().replace("seeds:", "seeds: [0, 1\n  x:", 1))
    png = next(run.rglob("*.png"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\xe9\n".encode("latin-1"))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a red circle\na blue\x00square\n")
    cases = [
        (["--config", str(bad_yaml)], f"error: config file {bad_yaml} is not valid YAML at line "),
        (["--config", cfg, "--model.prompts", "null", "--model.prompt_file", str(png)],
         f"error: prompt file {png} contains NUL bytes"),
        (["--config", cfg, "--model.prompts", "null", "--model.prompt_file", str(nul)],
         f"error: prompt file {nul} contains NUL bytes (byte 19), so it is not a text file: give a UTF-8 .txt"),
        (["--config", cfg, "--model.prompts", "null", "--model.prompt_file", str(latin1)],
         f"error: prompt file {latin1} is not UTF-8 text (byte 6: b'\\xe9'): save it as UTF-8"),
        (["--config", cfg, "--trainer.max_steps", "0"],
         "error: trainer.max_steps 0 runs no optimisation step: give --trainer.max_steps N with N >= 1"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        assert run_cli(["fit", *args, "--trainer.default_root_dir", str(out)]) == 2, args
        assert last_error_line(capsys.readouterr().err).startswith(expected), args
        assert not out.exists()


