"""``python cli.py fit --config experiments/quickstart.yaml``: the LightningCLI entry point.

Besides parsing, it owns what a run does to the file system and the process (``DOODLCLI``): relative input
paths found from any working directory, a claimed and locked run directory, an atomic config.yaml, a
``--ckpt_path`` that must continue the same trajectory, SIGTERM / SIGINT ending the run after its step with
the final outputs written, and bad input ending in one line naming the problem and the fix (``run_cli``)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

import doodl_lightning.strategy  # noqa: F401  registers --trainer.strategy seed_parallel
from callbacks import ComputeMeter, DefaultProgressBar, RenormalizeLatents, TensorBoardSummary
from doodl_lightning.console import condense_parser_error, silence_irrelevant
from doodl_lightning.io import DirectoryBusyError, atomic_write_text, claim_version, lock_directory, read_checkpoint
from doodl_lightning.lightning_compat import (CkptPathParsing, clear_received_sigterm, save_unsaved_last_checkpoint,
                                              set_version, unfixed_version)
from doodl_lightning.search import NoiseSearch
from doodl_lightning.resume import mismatch, plain, trajectory

TRAINER_DEFAULTS = {
    "max_steps": 50,        # optimisation steps (one batch = one step over all items)
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    # in every run, after the config's own callbacks (LightningCLI appends these; they stay out of config.yaml):
    # the step k/N progress bar in place of Lightning's epoch bar (a bar the config names is kept), and
    # TensorBoard's summary (no hp_metric placeholder; HPARAMS with guidance and results; the final evaluation),
    # and the run's compute (UNet and guidance evaluations per image, seconds: compute.json), and the latents'
    # renormalisation after each update (DOODL's renormalize_latents; it does nothing for a module that does not ask)
    "callbacks": [DefaultProgressBar(), TensorBoardSummary(), ComputeMeter(), RenormalizeLatents()],
}


ROOT = Path(__file__).resolve().parent  # the repository: configs name the shipped weights relative to it

# keys under ``model:`` (and ``ckpt_path``) whose values are input files; output directories
# (default_root_dir, dirpath) stay relative to the working directory, where the user looks for them
INPUT_PATH_KEYS = {"model", "model_config", "prompt_file", "source_image", "pretrained", "head", "checkpoint",
                   "controlnet", "control_images", "vae", "ip_adapter", "ip_adapter_image",
                   "labels", "references", "path", "ckpt_path"}
UNION_ERROR = "Does not validate against any of the Union subtypes"


def find_input(value: str, config_dirs: list[Path]) -> str:
    """A relative input path as the working directory sees it when it exists there (what it always meant),
    else beside a config file (the last given first), else in the repository (the shipped weights), so a
    config runs from any directory; unchanged when found nowhere, so the loader's error names it as written."""
    if not value or os.path.isabs(value) or value.startswith("~") or os.path.exists(value):
        return value
    for base in [*config_dirs, ROOT]:
        candidate = base / value
        if candidate.exists():
            return str(candidate)
    return value


def _resolve_inputs(node, config_dirs: list[Path], is_input: bool = False):
    """``node`` (a parsed config) with the values of ``INPUT_PATH_KEYS`` passed through ``find_input``."""
    if isinstance(node, Namespace):
        for key, value in vars(node).items():
            setattr(node, key, _resolve_inputs(value, config_dirs, key in INPUT_PATH_KEYS))
        return node
    if isinstance(node, list):
        return [_resolve_inputs(v, config_dirs, is_input) for v in node]
    if isinstance(node, dict):  # e.g. references: {prompt: [images]}: the values are inputs, the keys are not
        return {k: _resolve_inputs(v, config_dirs, is_input) for k, v in node.items()}
    return find_input(node, config_dirs) if is_input and isinstance(node, str) else node


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first: int, again: int):
        super().__init__(f"key {key!r} at line {first} and again at line {again}")
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a mapping that gives one key twice (``DuplicateKeyError``): PyYAML, and so
    jsonargparse, keeps the last value silently (``guidance_scale: 2.5`` then ``guidance_scale: 25.0`` ran with 25)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults``: the keys beside it override the merged ones, as YAML means
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the constructor below says so
                continue
        return super().construct_mapping(node, deep)


def check_yaml(path: str) -> None:
    """A config file that is not valid YAML, or gives a key twice in one mapping: one line with the file, the place
    and the problem (jsonargparse's own message names neither the file nor, for a file, where; a duplicate key it
    does not mention at all, keeping the last value)."""
    p = Path(path)
    if not p.is_file():
        return  # jsonargparse says it is missing (or reads the value as inline YAML)
    try:
        yaml.load(p.read_bytes(), Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ValueError(f"config file {p} gives the key {e.key!r} twice, at line {e.first} and at line {e.again} "
                         f"(YAML would keep the last silently): delete one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {p} is not valid YAML{where}: {problem}; fix the syntax there") from None


def _root_cause(e: BaseException) -> BaseException:
    """The module's own error inside jsonargparse's "Does not validate against any of the Union subtypes"
    (``model:`` is a NoiseSearch subclass in subclass mode, so every error raised by its ``__init__`` arrives wrapped)."""
    while str(e).startswith(UNION_ERROR) and e.__cause__ is not None:
        e = e.__cause__
    return e


def _rank_zero_process() -> bool:
    """Whether this process will be global rank 0, before the strategy knows (torchrun, SLURM and Lightning's
    launcher say so in the environment): only rank 0 claims and locks output directories."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID",
                                                       "JSM_NAMESPACE_RANK"))


class AtomicSaveConfig(SaveConfigCallback):
    """``config.yaml`` written atomically: a run killed while writing it leaves the whole file or none. No
    overwrite check: every run claims its own directory (``DOODLCLI.before_fit``), and a directory named by
    the user is locked, so a config.yaml there belongs to a finished earlier run."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective: every rank calls it
        if trainer.is_global_zero:
            atomic_write_text(os.path.join(log_dir, self.config_filename),
                              self.parser.dump(self.config, skip_none=False))
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class StopOnSignal(Callback):
    """SIGTERM (what schedulers and SLURM pre-emption send) and SIGINT (Ctrl-C) end a run after the step in
    progress, as if it had reached max_steps: the final evaluation, images, contact sheet, ``results.jsonl`` and
    ``last.ckpt`` (with a ModelCheckpoint that has ``save_last``) are written, then ``cli.py`` exits 128 + the
    signal (143, 130). A second Ctrl-C abandons the step at once (exit 130; the previous step's outputs and
    checkpoint stay).

    The handlers do nothing but note the signal. One process: they set ``trainer.should_stop``, which Lightning
    reads before each step, so a signal at any moment of a step, or between two steps, ends the run with the
    outputs of the last finished step. Several processes: every rank must stop after the same step (the final
    evaluation and the checkpoints are collectives), so the ranks agree at the end of each step (one all-reduce
    of the signal number) and all stop when any was signalled; a signal that lands after that point stops them
    after the next step, or, after the last step, at the agreement that opens ``on_train_end``. Every decision
    there (the stopped step's checkpoint, the exit status) follows the agreed value, the same on every rank; a
    signal during the final evaluation lets it finish and the run ends as finished (exit 0). (Lightning's handler
    set a flag that became an exit without outputs at the end of the epoch, one step here; with several
    processes it broadcast from inside the handler, and ranks that were each signalled, as SLURM signals every
    task, hung in mismatched collectives.) Must be the FIRST callback: its ``on_train_end`` saves the stopped
    step's ``last.ckpt`` before the final evaluation changes the other callbacks' state."""

    def __init__(self):
        self.signal: int | None = None  # what reached this process (the second-Ctrl-C rule reads it)
        self.stopped_by: int | None = None  # what the run stopped for: agreed by every rank, the exit status
        self._ended = False  # on_train_end has decided: a later signal changes nothing but its message
        self.steps = 0  # steps finished by this process (every callback of the step done)
        self._trainer = None
        self._first_step = 0
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only: Lightning's handling stays
        self._trainer = trainer
        # Lightning's SIGTERM handler raises a flag that becomes an exit without outputs; Ctrl-C raises
        # KeyboardInterrupt wherever it lands (once it hung a minute in Lightning's shutdown): both become ours
        for signum, handler in ((signal.SIGINT, self._on_sigint), (signal.SIGTERM, self._on_sigterm)):
            self._previous[signum] = signal.signal(signum, handler)
        if trainer.received_sigterm:  # arrived after Lightning's handler was set, before ours
            clear_received_sigterm(trainer)
            self._stop(signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        self.signal = signum
        if self._trainer.world_size == 1:
            self._trainer.should_stop = True  # read by Lightning's loops before the next step
        # several processes: the ranks agree in on_train_batch_end

    def _on_sigterm(self, signum, frame) -> None:
        if self.signal is None:
            os.write(2, b"\nSIGTERM: writing the final outputs\n" if self._ended else
                     b"\nSIGTERM: stopping after this step, then writing the final outputs\n")
            self._stop(signal.SIGTERM)

    def _on_sigint(self, signum, frame) -> None:
        if self.signal == signal.SIGINT:  # this process's own Ctrl-C, whatever the ranks agreed on
            raise KeyboardInterrupt  # the second Ctrl-C: abandon the step (or the final outputs)
        self._stop(signal.SIGINT)
        os.write(2, b"\nCtrl-C: writing the final outputs (Ctrl-C again to abandon them)\n" if self._ended else
                 b"\nCtrl-C: stopping after this step, then writing the final outputs (Ctrl-C again to abandon the step)\n")

    def _agree(self, trainer) -> int:
        """The largest signal number any rank noted (SIGTERM 15 over SIGINT 2), 0 for none: one all-reduce that
        every rank calls at the same point."""
        mine = torch.tensor(self.signal or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(mine, reduce_op="max"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and self._trainer is not None:  # every rank, at the same point of every step
            agreed = self._agree(trainer)
            if agreed:  # self.signal stays this rank's own: a rank that got Ctrl-C may be agreed to SIGTERM
                self.stopped_by = agreed
                trainer.should_stop = True

    def _finished_steps(self, trainer) -> None:
        self.steps = trainer.global_step - self._first_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._finished_steps(trainer)  # the steps before this one

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._finished_steps(trainer)  # an epoch is one step: every callback of it has run

    def on_train_end(self, trainer, pl_module) -> None:
        self._finished_steps(trainer)
        if trainer.world_size > 1 and self._trainer is not None:
            # once more: a signal can land on one rank after the last step's agreement (in a later callback of
            # that step, or here). Deciding on it alone, that rank would save a checkpoint (a barrier) while the
            # others entered the final evaluation's collectives, and exit 143 while they exit 0
            agreed = self._agree(trainer)
            self.stopped_by = agreed or None
        else:
            self.stopped_by = self.signal
        self._ended = True  # a signal from here on lets the final outputs be written; the decision is made
        if self.stopped_by is None:
            return
        rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        print(f"\n{rank}{signal.Signals(self.stopped_by).name}: stopped after step {trainer.global_step}, writing the "
              "final outputs", file=sys.stderr, flush=True)
        for cb in trainer.checkpoint_callbacks:  # the stopped step's last.ckpt, when its schedule skipped that step
            if isinstance(cb, ModelCheckpoint):
                save_unsaved_last_checkpoint(cb, trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Lightning's teardown, before this hook, has already put back the handlers there were before the fit;
        # putting back what ours replaced (Lightning's SIGTERM handler) would leave that installed after the fit.
        # Only where ours is still installed is its predecessor put back.
        mine = {signal.SIGINT: self._on_sigint, signal.SIGTERM: self._on_sigterm}
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == mine[signum]:
                signal.signal(signum, handler)
        self._previous = {}


class DOODLCLI(CkptPathParsing, LightningCLI):
    """LightningCLI plus what a run does to the file system and the process (the README's "Faults, signals
    and resuming"): relative inputs found from any working directory, a YAML error naming its file, the
    module's own one-line errors, ``max_steps`` >= 1, ``--ckpt_path last`` and a checkpoint that must continue
    the same trajectory, a claimed and locked run directory, an atomic config.yaml, nothing left by a run that
    fails before its first step, and the signal a run was stopped by (``stopped_by``)."""

    stopped_by: int | None = None
    DEFAULT_METHOD = "doodl_lightning.module.DOODL"  # what ``model:`` without a class_path runs

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": self.DEFAULT_METHOD}})

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            for path in _config_files(list(sys.argv[1:] if args is None else args)):
                check_yaml(path)
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub:
            node = self.config[sub]
            dirs = [Path(p.absolute).parent for p in reversed(node.get("config") or [])]
            node.model = _resolve_inputs(node.get("model"), dirs)
            if isinstance(node.get("ckpt_path"), str):
                node.ckpt_path = find_input(node.ckpt_path, dirs)

    def parse_ckpt_path(self) -> None:  # in place of LightningCLI's (lightning_compat.CkptPathParsing)
        # Lightning's version replaces the model's settings by the checkpoint's hyper-parameters, so a resume
        # with another config silently ran the checkpoint's (and mixed in the new guidance). Here the config
        # is what runs; the checkpoint is only read, to fail early on a bad file, and before_fit compares.
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        self._checkpoint = read_checkpoint(path) if path and path not in ("last", "hpc", "best") else None

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            steps = self.config.fit.trainer.max_steps
            if steps is not None and (steps == 0 or steps < -1):
                raise ValueError(f"trainer.max_steps {steps} runs no optimisation step: give --trainer.max_steps N "
                                 "with N >= 1 (the samples before optimisation are step 0 of any run)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            raise _root_cause(e) from None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        self.stop_on_signal = StopOnSignal()
        trainer.callbacks.insert(0, self.stop_on_signal)  # first: see StopOnSignal
        return trainer

    def before_fit(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = self._last_checkpoint()
            self._checkpoint = read_checkpoint(cfg["ckpt_path"]) if cfg["ckpt_path"] else None
        node = self.config[self.subcommand]
        self.model.cli_settings = {key: _plain_setting(node.get(key)) for key in ("optimizer", "lr_scheduler")}
        saved = (self._checkpoint or {}).get("doodl_trajectory")
        if saved is not None:  # the same check as the module's on_load_checkpoint, before anything is written
            problem = mismatch(saved, trajectory(self.model, self.trainer), f"checkpoint {cfg['ckpt_path']}")
            if problem:
                raise ValueError(problem)
        self._checkpoint = None  # Lightning reads it again; do not hold two copies
        if cfg.get("ckpt_path"):  # a resume always writes a new version_N: ModelCheckpoint's note says nothing
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        self._claimed: list[Path] = []
        self._locks: list[int] = []
        if _rank_zero_process():
            try:
                self._claim_outputs()
            except BaseException:  # e.g. a callback's directory is busy: give back what was claimed
                self._abandon()
                raise

    def _last_checkpoint(self) -> str | None:
        """``--ckpt_path last``: the newest last.ckpt of this output directory's runs (Lightning's own "last"
        looks only in the new run's empty directory, so it never resumed anything here)."""
        trainer = self.trainer
        dirs = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        roots = [Path(lg.root_dir) for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, CSVLogger))]
        dirs |= {v / "checkpoints" for root in roots for v in root.glob("version_*")}
        if not trainer.loggers:
            dirs.add(Path(trainer.default_root_dir) / "checkpoints")
        found = [f for d in dirs for f in d.glob("last*.ckpt") if f.is_file()]
        if not found:
            print(f"--ckpt_path last: no last.ckpt under {trainer.default_root_dir} yet, starting from the beginning",
                  file=sys.stderr, flush=True)
            return None
        newest = str(max(found, key=lambda f: f.stat().st_mtime))
        print(f"--ckpt_path last: resuming from {newest}", file=sys.stderr, flush=True)
        return newest

    def _claim_outputs(self) -> None:
        """Give every logger without a fixed version its own ``version_N`` (created atomically) and lock the
        directories this run writes, so runs started at once in one output directory never share one."""
        trainer = self.trainer
        versions: dict[str, int] = {}
        outputs = []
        for logger in trainer.loggers:
            if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
                continue
            if unfixed_version(logger):  # Lightning would pick max(version_N) + 1 by listing: two runs get one N
                root = os.path.realpath(logger.root_dir)
                if root not in versions:
                    versions[root] = claim_version(root)
                    self._claimed.append(Path(root) / f"version_{versions[root]}")
                set_version(logger, versions[root])
            outputs.append(logger.log_dir)
        if not trainer.loggers:
            outputs.append(trainer.default_root_dir)
        outputs += [cb.dirpath for cb in trainer.callbacks if isinstance(getattr(cb, "dirpath", None), (str, Path))]
        for d in dict.fromkeys(os.path.realpath(p) for p in outputs):
            fd = lock_directory(d)
            if fd is not None:
                self._locks.append(fd)

    def fit(self, model, **kwargs) -> None:
        try:
            self.trainer.fit(model, **kwargs)
        except BaseException as e:
            self._abandon()
            if isinstance(e, SIGTERMException):  # a SystemExit without a code (exit 0): say SIGTERM
                # StopOnSignal clears Lightning's flag in on_train_start and holds the handler until Lightning's
                # teardown, so only a SIGTERM that Lightning's handler took before that, in a run of several
                # processes, gets here: its broadcast from inside the handler meets another rank's per-step
                # broadcast of the flag, which raises this there
                self.stopped_by = signal.SIGTERM
                raise SystemExit(128 + signal.SIGTERM) from None
            if isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt):  # Lightning exits 1
                self.stopped_by = signal.SIGINT
                raise SystemExit(128 + signal.SIGINT) from None
            if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
                # a full disk met by a writer that names no file (a checkpoint, a TensorBoard event): name the run's
                root = getattr(self.trainer.logger, "log_dir", None) or self.trainer.default_root_dir
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root)) from e
            raise
        self._release_locks()
        if self.stop_on_signal.stopped_by is not None:  # agreed by every rank: all exit with the same status
            self.stopped_by = self.stop_on_signal.stopped_by
        elif self.trainer.received_sigterm:
            # Lightning's handler took a SIGTERM and no on_train_start saw it: a fit with nothing to run (resumed
            # at max_steps) skips the training hooks, and Lightning's flag does nothing there
            self.stopped_by = signal.SIGTERM

    def _release_locks(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def _abandon(self) -> None:
        """A run that fails before finishing a step leaves nothing: its claimed directory held only the config,
        hyper-parameters, an empty TensorBoard file and empty folders. Anything else there stays."""
        self._release_locks()
        if self.stop_on_signal.steps:
            return
        for d in self._claimed:
            for f in [d / "config.yaml", d / "hparams.yaml", d / "metrics.csv", *d.glob("events.out.tfevents.*")]:
                f.unlink(missing_ok=True)
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only if empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _plain_setting(value):
    """A config node (jsonargparse Namespace: class_path + init_args) as plain data for the trajectory."""
    return plain(value.as_dict() if isinstance(value, Namespace) else value)


def main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> LightningCLI:
    """``exit_on_error=False``: a parse error raises jsonargparse's ``ArgumentError`` instead of printing the usage
    and exiting (``run_cli`` condenses it to one line)."""
    silence_irrelevant()
    # subclass mode over the search methods: ``model:`` without a class_path is a DOODL (DOODLCLI.DEFAULT_METHOD);
    # ``class_path: doodl_lightning.best_of_n.BestOfN`` picks another search over the same items, guidance and outputs
    cli = DOODLCLI(NoiseSearch, subclass_mode_model=True, args=args, run=run, trainer_defaults=TRAINER_DEFAULTS,
                   seed_everything_default=0, save_config_callback=AtomicSaveConfig,
                   parser_kwargs={"exit_on_error": exit_on_error})
    if run and cli.subcommand == "fit":
        report(cli.trainer, cli.stopped_by)
    return cli


def report(trainer, stopped_by: int | None = None) -> None:
    """After a fit, on rank 0 (no collectives: the other ranks may have exited): each item's initial -> best
    loss and where its outputs are; for a run stopped by a signal, how to resume it."""
    from callbacks import ImageLogger, ResultsWriter

    if trainer.global_rank != 0:
        return
    lines = []
    for cb in trainer.callbacks:
        if isinstance(cb, ResultsWriter) and (Path(cb.dir) / "results.jsonl").is_file():
            path = Path(cb.dir) / "results.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            lines += [f"  item {r['index']:3d}  seed {r['seed']:<6d} loss {r['initial_loss']:.4f} -> best "
                      f"{r['best_loss']:.4f} (step {r.get('best_step', '-')})  {r['prompt']}" for r in records]
            lines.append(f"results:       {path}")
        if isinstance(cb, ImageLogger) and (Path(cb.dir) / "contact_sheet.png").is_file():
            lines.append(f"contact sheet: {Path(cb.dir) / 'contact_sheet.png'}")
    log_dir = getattr(trainer.logger, "log_dir", None)  # not trainer.log_dir: that is a collective, and the
    if log_dir:                                          # other ranks have left by now
        lines.append(f"tensorboard:   tensorboard --logdir {log_dir}")
    method = type(trainer.lightning_module).__name__  # DOODL, BestOfN, ...
    head = f"{method} finished:"
    if stopped_by is not None:
        head = (f"{method} stopped by {signal.Signals(stopped_by).name} after step {trainer.global_step} of "
                f"{trainer.max_steps} (final outputs written); resume with the same command and --ckpt_path last:")
    if lines:
        print("\n".join(["", head] + lines), flush=True)


def run_cli(args: list[str] | None = None) -> int:
    """``python cli.py ...``: the exit status. Bad input ends in one line ``error: ...`` naming the problem and
    the fix, not a traceback (2); a run stopped by SIGTERM / SIGINT exits 143 / 130 after writing its outputs.
    A parser error (jsonargparse: the usage, then up to 17 lines of Union alternatives) is condensed to its key,
    problem and fix (``console.condense_parser_error``); ``--verbose`` adds the parser's whole message."""
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        verbose = "--verbose" in sys.argv[1:]
        sys.argv = [a for a in sys.argv if a != "--verbose"]
    else:
        verbose = "--verbose" in args
        args = [a for a in args if a != "--verbose"]
    try:
        cli = main(args, exit_on_error=False)
    except KeyboardInterrupt:  # before the trainer started: nothing was written
        print("error: interrupted before the first step; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    except ArgumentError as e:
        print(f"error: {condense_parser_error(str(e))}", file=sys.stderr)
        if verbose:
            print(str(e), file=sys.stderr)
        return 2
    except (ValueError, OSError, DirectoryBusyError) as e:
        sys.stdout.flush()  # the progress bar's line (stdout) ends before the error (stderr) on a terminal
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = Path(e.filename) if e.filename else None
            where = f" of {where if where.is_dir() else where.parent}" if where else ""
            print(f"error: no space left on the device{where}: free space there, or write the run elsewhere with "
                  "--trainer.default_root_dir", file=sys.stderr)
            return 2
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 128 + cli.stopped_by if cli.stopped_by is not None else 0


if __name__ == "__main__":
    sys.exit(run_cli())
