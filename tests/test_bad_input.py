"""Bad input that used to give a wrong result with exit 0, or an error that was not one line: a model whose
weights files have other keys, a NaN loss mid-run, a YAML key given twice, guidance weights of 0 or below, NaN and
infinite settings, a full disk, and jsonargparse's multi-line parser errors. ``cli.py`` as its own process where what
is tested is the process's output (the libraries' warnings, the progress bar's line); the tiny random pipeline of
``conftest.py`` everywhere, a few steps of a 4-step chain."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file

from cli import run_cli
from doodl_lightning.guidance.base import Guidance

from test_faults import ROOT, last_error_line

UNET = "unet/diffusion_pytorch_model"


def cli_process(*args, merged: bool = False) -> subprocess.CompletedProcess:
    """``python cli.py *args`` as its own process (``test_faults.cli_process``'s environment); ``merged``: stderr
    into stdout, one stream in the order written, as a terminal shows them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE, timeout=300)


def prefixed_pipeline(src: str, dst: Path, suffix: str = ".safetensors") -> Path:
    """A copy of the pipeline whose UNet weights carry the ``model.diffusion_model.`` prefix of original-layout
    checkpoints, as a .safetensors or a tensors-only .bin (what diffusers read with random weights, exit 0)."""
    shutil.copytree(src, dst)
    weights = load_file(str(Path(src) / f"{UNET}.safetensors"))
    renamed = {f"model.diffusion_model.{k}": v for k, v in weights.items()}
    (dst / f"{UNET}.safetensors").unlink()
    if suffix == ".safetensors":
        save_file(renamed, str(dst / f"{UNET}.safetensors"))
    else:
        torch.save(renamed, dst / f"{UNET}.bin")
    return dst / f"{UNET}{suffix}"


def test_a_model_whose_weights_have_other_keys_is_one_line_naming_the_file_and_keys(tmp_path, tiny_pipeline_dir,
                                                                                   write_config):
    """The whole of stderr is the one line (diffusers' hundreds of key names held back), nothing is written."""
    weights = prefixed_pipeline(tiny_pipeline_dir, tmp_path / "pipe")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", str(tmp_path / "pipe"), out, steps=1)
    proc = cli_process("fit", "--config", cfg)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: model weights file {weights} does not fit UNet2DConditionModel: "), lines[0]
    assert "not in the file (e.g. " in lines[0] and "model.diffusion_model." in lines[0], lines[0]
    assert "convert it to the diffusers layout" in lines[0], lines[0]  # the fix
    assert not out.exists()


def test_a_tensors_only_bin_and_a_single_file_with_other_keys_are_one_line(tmp_path, tiny_pipeline_dir, write_config,
                                                                           capsys):
    weights = prefixed_pipeline(tiny_pipeline_dir, tmp_path / "pipe_bin", ".bin")
    single = tmp_path / "unet_only.safetensors"  # a UNet alone where a whole original-layout pipeline file belongs
    save_file(load_file(str(Path(tiny_pipeline_dir) / f"{UNET}.safetensors")), str(single))
    cases = [
        (["--model.model", str(tmp_path / "pipe_bin")],
         f"error: model weights file {weights} does not fit UNet2DConditionModel: "),
        (["--model.model", str(single), "--model.model_config", tiny_pipeline_dir],
         f"error: model weights file {single} does not fit StableDiffusionPipeline: "),
    ]
    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, tmp_path / "unused", steps=1)
    for extra, expected in cases:
        out = tmp_path / "out"
        assert run_cli(["fit", "--config", cfg, "--trainer.default_root_dir", str(out), *extra]) == 2, extra
        line = last_error_line(capsys.readouterr().err)
        assert line.startswith(expected), line
        assert not out.exists()


# -- a loss that turns NaN ---------------------------------------------------------------------------------
class NaNAfter(Guidance):
    """Symmetry's mirror loss, NaN from its ``after + 1``-th evaluation on: a term that breaks mid-run (with
    ``sampler: ddim`` one evaluation per step)."""

    default_name = "nan_after"

    def __init__(self, after: int = 2, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        self.after, self.calls = after, 0
        self.freeze()

    def loss(self, images, prompts, generators):
        self.calls += 1
        loss = (images - images.flip(-1)).pow(2).mean(dim=(1, 2, 3))
        return loss * float("nan") if self.calls > self.after else loss


def nan_config(tmp_path: Path, pipe: str, write_config, after: int) -> tuple[str, Path]:
    out = tmp_path / f"out{after}"
    cfg = write_config(tmp_path / f"nan{after}.yaml", pipe, out, steps=4, sampler="ddim", prompts=["a red circle"], seeds=[0],
                       guidance=[{"class_path": "test_bad_input.NaNAfter", "init_args": {"after": after}}])
    return cfg, out


def test_a_nan_loss_mid_run_stops_before_the_update_and_keeps_the_finite_results(tmp_path, tiny_pipeline_dir,
                                                                                  write_config, capsys):
    cfg, out = nan_config(tmp_path, tiny_pipeline_dir, write_config, after=2)
    assert run_cli(["fit", "--config", cfg]) == 2
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("error: step 2: item 0 (a red circle | seed 0): its loss is nan; stopped before "
                           "updating"), line
    assert "lower grad_scale" in line, line
    [run] = list(out.glob("lightning_logs/version_*"))
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [2]  # steps 0 and 1 ran; step 2 stopped before its update
    assert all(math.isfinite(r[k]) for r in records for k in ("initial_loss", "best_loss")), records
    assert records[0]["best_step"] in (0, 1) and Path(records[0]["best_image"]).is_file()
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and torch.isfinite(ckpt["state_dict"]["latents"]).all()


def test_a_nan_loss_before_any_update_is_one_line_and_leaves_nothing(tmp_path, tiny_pipeline_dir, write_config,
                                                                     capsys):
    cfg, out = nan_config(tmp_path, tiny_pipeline_dir, write_config, after=0)
    assert run_cli(["fit", "--config", cfg]) == 2
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("error: before any update, item 0 (a red circle | seed 0): its loss is nan: the model or "
                           "a guidance term computes NaN/inf"), line
    assert not list(out.rglob("*.*")), list(out.rglob("*"))  # no config.yaml, results or images


# -- config files and values -----------------------------------------------------------------------------
def test_a_yaml_key_given_twice_is_one_line_with_the_file_and_lines(tmp_path, tiny_pipeline_dir, write_config, capsys):
    cfg = Path(write_config(tmp_path / "run.yaml", tiny_pipeline_dir, tmp_path / "out", steps=1))
    text = cfg.read_text()
    assert "  guidance_scale: 3.0\n" in text
    dup = tmp_path / "dup.yaml"
    dup.write_text(text.replace("  guidance_scale: 3.0\n", "  guidance_scale: 2.5\n  guidance_scale: 25.0\n"))
    first = dup.read_text().splitlines().index("  guidance_scale: 2.5") + 1
    assert run_cli(["fit", "--config", str(dup)]) == 2
    assert last_error_line(capsys.readouterr().err) == (
        f"error: config file {dup} gives the key 'guidance_scale' twice, at line {first} and at line {first + 1} "
        "(YAML would keep the last silently): delete one of them")
    assert not (tmp_path / "out").exists()
    # a merge key (<<) and the keys beside it are not duplicates: YAML's override, accepted
    merged = tmp_path / "merged.yaml"
    merged.write_text("defaults: &d {max_steps: 1, accelerator: cpu}\n" + text.replace("trainer:\n", "trainer:\n  <<: *d\n", 1))
    from cli import check_yaml

    check_yaml(str(merged))


def test_guidance_weight_zero_alone_is_refused_and_a_negative_weight_warns(tmp_path, tiny_pipeline_dir, write_config,
                                                                           capsys):
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.objective import check_guidance

    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, tmp_path / "out", steps=1,
                       guidance=[{"class_path": "doodl_lightning.guidance.SymmetryGuidance",
                                  "init_args": {"weight": 0.0}}])
    assert run_cli(["fit", "--config", cfg]) == 2
    assert last_error_line(capsys.readouterr().err) == (
        "error: every guidance term has weight 0 (symmetry): nothing to optimise; give the term a non-zero weight "
        "(e.g. weight: 1.0)")
    assert not (tmp_path / "out").exists()
    check_guidance([SymmetryGuidance(weight=0.0, name="off"), SymmetryGuidance()])  # 0 beside a real term: allowed
    with pytest.warns(UserWarning, match="guidance away has weight -1 < 0: it steers AWAY from its target"):
        check_guidance([SymmetryGuidance(weight=-1.0, name="away")])


NON_FINITE_SETTINGS = ["grad_scale", "clip_grad_val", "momentum", "perturb_grad_scale", "lr", "max_grad_norm",
                       "guidance_scale", "controlnet_scale", "drift_tolerance", "mix_weight"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_numeric_setting_refuses_nan_and_infinity_from_the_python_api(tiny_pipeline_dir, value):
    """Before any model loads (the model path is never read)."""
    from callbacks import ItemEarlyStopping
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.guidance.augment import Cutouts
    from doodl_lightning.module import DOODL

    for key in NON_FINITE_SETTINGS:
        with pytest.raises(ValueError, match=key) as e:
            DOODL(model="/not/read", guidance=[SymmetryGuidance()], **{key: value})
        assert "finite" in str(e.value) or "must be in" in str(e.value), (key, e.value)
    for make, key in [(lambda: SymmetryGuidance(weight=value), "symmetry: weight"),
                      (lambda: Cutouts(224, cut_power=value), "cut_power"),
                      (lambda: ItemEarlyStopping(min_delta=value), "min_delta"),
                      (lambda: ItemEarlyStopping(stop_at=value), "stop_at")]:
        with pytest.raises(ValueError, match=f"{key} must be a finite number, got {value}"):
            make()


# -- a full disk -------------------------------------------------------------------------------------------
class DiskFullAfter(Callback):
    """From the end of step ``step`` on, every file ``doodl_lightning.io`` writes fails as a full disk does: write()
    raising ENOSPC with no file name. Only io's own ``os`` is replaced, so Lightning's files still write."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import doodl_lightning.io as io

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class FullDisk:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def fdopen(fd, *args, **kwargs):
                os.close(fd)
                return Full()

        io.os = FullDisk()


def test_a_full_disk_is_one_line_of_its_own_naming_the_directory(tmp_path, tiny_pipeline_dir, write_config):
    """The disk fills after step 2 of 3: the error is a line of its own after the progress bar's (on a terminal both
    share one screen), names the directory, and the outputs of the finished steps stay."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, out, steps=3, prompts=["a red circle"],
                       callbacks=[{"class_path": "test_bad_input.DiskFullAfter", "init_args": {"step": 2}},
                                  {"class_path": "callbacks.ResultsWriter"}])
    Path(cfg).write_text(Path(cfg).read_text().replace("enable_progress_bar: false", "enable_progress_bar: true"))
    proc = cli_process("fit", "--config", cfg, merged=True)  # the bar's stdout and the error's stderr, as on a terminal
    assert proc.returncode == 2, proc.stdout[-3000:]
    [run] = list(out.glob("lightning_logs/version_*"))
    assert (run / "results.jsonl").is_file()  # written at step 1, before the disk filled
    fix = ": free space there, or write the run elsewhere with --trainer.default_root_dir"
    # the first write after the disk filled: the new best image (images/) or results.jsonl (the run's directory)
    assert (f"\nerror: no space left on the device of {run}{fix}\n" in proc.stdout
            or f"\nerror: no space left on the device of {run / 'images'}{fix}\n" in proc.stdout), proc.stdout[-3000:]
    assert "step 1/3" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-3000:]


class CheckpointDiskFull(Callback):
    """At the end of step ``step`` a write that names no file fails as on a full disk (what torch.save of a
    checkpoint or a TensorBoard event raise)."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_met_by_a_writer_naming_no_file_names_the_run_directory(tmp_path, tiny_pipeline_dir, write_config,
                                                                           capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, out, steps=3, prompts=["a red circle"], seeds=[0],
                       callbacks=[{"class_path": "test_bad_input.CheckpointDiskFull"}])
    assert run_cli(["fit", "--config", cfg]) == 2
    assert last_error_line(capsys.readouterr().err) == (
        f"error: no space left on the device of {out / 'lightning_logs/version_0'}: free space there, or write the "
        "run elsewhere with --trainer.default_root_dir")


# -- the parser's errors -----------------------------------------------------------------------------------
def test_parser_errors_are_one_line_with_the_key_the_problem_and_the_fix(tmp_path, tiny_pipeline_dir, write_config,
                                                                         capsys):
    cfg = write_config(tmp_path / "run.yaml", tiny_pipeline_dir, tmp_path / "out", steps=1)
    tail = " (cli.py fit --help lists every key and its type; --verbose shows the parser's whole message)"
    cases = [
        (["--model.guidance_scale", "abc"], "error: model.guidance_scale: expected a float, got 'abc': give one"),
        (["--model.grad_scale", "nan"], "error: model.grad_scale: expected a float, got 'nan': give one"),
        (["--trainer.max_steps", "x"], "error: trainer.max_steps: expected an int, got 'x': give one"),
        (["--model.guidance", '[{"class_path": "doodl_lightning.guidance.SymmetryGuidance", '
                              '"init_args": {"wieght": 1}}]'],
         "error: model.guidance (SymmetryGuidance): unknown key 'wieght': check its spelling"),
        (["--model.guidance", '[{"class_path": "doodl_lightning.guidance.SymmetryGuidance", '
                              '"init_args": {"weight": "x"}}]'],
         "error: model.guidance (SymmetryGuidance) weight: expected a float, got 'x': give one"),
    ]
    for extra, expected in cases:
        assert run_cli(["fit", "--config", cfg, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err == expected + tail + "\n", err[-3000:]  # one line: no usage, no Union alternatives
    assert run_cli(["fit", "--config", cfg, "--verbose", *cases[0][0]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == cases[0][1] + tail and "Does not validate against any of the Union subtypes" in err[2], err
    assert not (tmp_path / "out").exists()


def test_a_failure_before_the_progress_bar_exists_keeps_its_own_error():
    """The bar's on_exception runs for a failure in setup / on_fit_start too, before Lightning made the bar, whose
    train_progress_bar property then raises TypeError: that must not replace the run's own one-line error."""
    from callbacks.progress import StepProgressBar

    StepProgressBar().on_exception(None, None, ValueError("the run's own error"))  # no TypeError
