"""``doodl_lightning.lightning_compat`` against the installed Lightning: for each private name it uses, a test that
fails, saying what to update, when a Lightning release renames, removes or changes it; and each function's effect.
Plus the rule itself: no other project file touches those names."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from doodl_lightning import lightning_compat as compat

ROOT = Path(__file__).resolve().parents[1]
UPDATE = (f"Lightning {lightning.__version__} changed a private name that doodl_lightning/lightning_compat.py uses: "
          "update {fn} there (and the pin of lightning in pyproject.toml)")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


class Tiny(LightningModule):
    """One parameter, a step per batch, no data loading to speak of."""

    def __init__(self, width: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.w = torch.nn.Parameter(torch.zeros(width))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch) ** 2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(64, 1), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kwargs) -> Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs}
    return Trainer(**kwargs)


# -- attached_trainer: public API only --------------------------------------------------------------------
def test_attached_trainer_relies_on_the_public_trainer_property():
    module = Tiny()
    with pytest.raises(RuntimeError):  # what attached_trainer turns into None
        module.trainer  # noqa: B018
    assert compat.attached_trainer(module) is None, UPDATE.format(fn="attached_trainer")


def test_attached_trainer_is_the_trainer_it_runs_under(tmp_path):
    seen = []

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(compat.attached_trainer(pl_module) is trainer)

    module = Tiny()
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[Probe()])
    trainer.fit(module)
    assert seen == [True], UPDATE.format(fn="attached_trainer")
    assert compat.attached_trainer(module) is trainer  # stays attached after the fit, as the property says


# -- clear_received_sigterm: Trainer._signal_connector.received_sigterm ------------------------------------
def test_received_sigterm_is_still_the_signal_connectors_attribute(tmp_path):
    trainer = _trainer(tmp_path)
    connector = getattr(trainer, "_signal_connector", None)
    assert connector is not None and hasattr(connector, "received_sigterm"), \
        UPDATE.format(fn="clear_received_sigterm") + ": Trainer._signal_connector.received_sigterm is gone"
    connector.received_sigterm = True
    assert trainer.received_sigterm is True, UPDATE.format(fn="clear_received_sigterm") + \
        ": the public Trainer.received_sigterm no longer reads Trainer._signal_connector.received_sigterm"


def test_clear_received_sigterm_lowers_the_public_flag(tmp_path):
    trainer = _trainer(tmp_path)
    trainer._signal_connector.received_sigterm = True
    compat.clear_received_sigterm(trainer)
    assert trainer.received_sigterm is False, UPDATE.format(fn="clear_received_sigterm")


# -- save_unsaved_last_checkpoint: ModelCheckpoint's last-save internals ----------------------------------
def test_model_checkpoint_still_has_the_private_names_used():
    fn = "save_unsaved_last_checkpoint"
    cb = ModelCheckpoint(save_last=True)
    assert isinstance(getattr(cb, "_last_global_step_saved", None), int), \
        UPDATE.format(fn=fn) + ": ModelCheckpoint()._last_global_step_saved is no longer an int step"
    for name, params in (("_monitor_candidates", ["self", "trainer"]),
                         ("_save_last_checkpoint", ["self", "trainer", "monitor_candidates"])):
        method = getattr(ModelCheckpoint, name, None)
        assert callable(method), UPDATE.format(fn=fn) + f": ModelCheckpoint.{name} is gone"
        assert _params(method) == params, \
            UPDATE.format(fn=fn) + f": ModelCheckpoint.{name}{inspect.signature(method)}, " \
                                   f"expected ({', '.join(params)})"


@pytest.mark.parametrize("steps, saves", [(3, True), (2, False)])
def test_save_unsaved_last_checkpoint_saves_the_step_its_schedule_skipped(tmp_path, steps, saves):
    """Every 2 steps: a fit stopped at step 3 has saved step 2 only, and last.ckpt gets step 3; at step 2 there is
    nothing to save. Called from a callback's on_train_end, before ModelCheckpoint's own (Lightning puts
    checkpoint callbacks last), as cli.StopOnSignal does. Not at the epoch's end: Lightning before 2.6 saved
    last.ckpt there whatever the schedule, which would leave nothing to save here."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1,
                           save_on_train_epoch_end=False)
    said = []

    class Stopped(Callback):
        def on_train_end(self, trainer, pl_module):
            said.append(compat.save_unsaved_last_checkpoint(ckpt, trainer))

    _trainer(tmp_path, max_steps=steps, callbacks=[Stopped(), ckpt]).fit(Tiny())
    assert said == [saves], UPDATE.format(fn="save_unsaved_last_checkpoint")
    last = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert last["global_step"] == steps, UPDATE.format(fn="save_unsaved_last_checkpoint")
    assert ckpt.last_model_path == str(tmp_path / "ckpt/last.ckpt")


def test_save_unsaved_last_checkpoint_without_save_last_does_nothing(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False, every_n_train_steps=100)
    said = []

    class Stopped(Callback):
        def on_train_end(self, trainer, pl_module):
            said.append(compat.save_unsaved_last_checkpoint(ckpt, trainer))

    _trainer(tmp_path, max_steps=1, callbacks=[Stopped(), ckpt]).fit(Tiny())
    assert said == [False] and not (tmp_path / "ckpt/last.ckpt").exists()


# -- unfixed_version / set_version: the loggers' _version -------------------------------------------------
LOGGERS = [TensorBoardLogger, CSVLogger, FabricTensorBoardLogger, FabricCSVLogger]


@pytest.mark.parametrize("kind", LOGGERS, ids=lambda k: f"{k.__module__.split('.')[1]}.{k.__name__}")
def test_loggers_keep_the_given_version_in_version_attribute(tmp_path, kind):
    for given in (None, 3, "mine"):
        logger = kind(tmp_path, name="run", version=given)
        assert "_version" in vars(logger) and logger._version == given, \
            UPDATE.format(fn="unfixed_version and set_version") + \
            f": {kind.__name__}(version=...) is no longer _version"


@pytest.mark.parametrize("kind", LOGGERS, ids=lambda k: f"{k.__module__.split('.')[1]}.{k.__name__}")
def test_set_version_makes_a_fresh_logger_write_into_that_version(tmp_path, kind):
    (tmp_path / "run/version_0").mkdir(parents=True)  # listing would pick version_1
    logger = kind(tmp_path, name="run")
    assert compat.unfixed_version(logger)
    compat.set_version(logger, 7)
    assert not compat.unfixed_version(logger)
    assert logger.version == 7 and Path(logger.log_dir) == tmp_path / "run/version_7", \
        UPDATE.format(fn="set_version")
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert (tmp_path / "run/version_7").is_dir() and not (tmp_path / "run/version_1").exists(), \
        UPDATE.format(fn="set_version")
    assert not compat.unfixed_version(kind(tmp_path, name="run", version=0))


def test_unfixed_version_does_not_choose_one(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    assert compat.unfixed_version(logger) and compat.unfixed_version(logger)
    assert logger.version == 0  # the public property chooses by listing, and fixes it
    assert not compat.unfixed_version(logger), UPDATE.format(fn="unfixed_version")


# -- drop_hp_metric_placeholder: TensorBoardLogger._default_hp_metric -------------------------------------
def _scalar_tags(log_dir: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return events.Tags()["scalars"]


@pytest.mark.parametrize("kind", [TensorBoardLogger, FabricTensorBoardLogger], ids=lambda k: k.__module__)
def test_tensorboard_logger_keeps_default_hp_metric_in_its_attribute(tmp_path, kind):
    for given in (True, False):
        logger = kind(tmp_path, default_hp_metric=given)
        assert vars(logger).get("_default_hp_metric", None) is given, UPDATE.format(fn="drop_hp_metric_placeholder") \
            + f": {kind.__name__}(default_hp_metric=...) is no longer _default_hp_metric"


@pytest.mark.parametrize("disable", [False, True])
def test_drop_hp_metric_placeholder_stops_the_placeholder(tmp_path, disable):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    if disable:
        compat.drop_hp_metric_placeholder(logger)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    tags = _scalar_tags(logger.log_dir)
    assert ("hp_metric" in tags) is not disable, (UPDATE.format(fn="drop_hp_metric_placeholder") if disable else
                                                  "TensorBoardLogger no longer writes hp_metric by default: "
                                                  "drop_hp_metric_placeholder may be needless")


# -- CkptPathParsing: LightningCLI._parse_ckpt_path -------------------------------------------------------
def test_lightning_cli_still_calls_parse_ckpt_path_after_parsing():
    fn = "CkptPathParsing"
    method = getattr(LightningCLI, "_parse_ckpt_path", None)
    assert callable(method), UPDATE.format(fn=fn) + ": LightningCLI._parse_ckpt_path is gone"
    assert _params(method) == ["self"], \
        UPDATE.format(fn=fn) + f": LightningCLI._parse_ckpt_path{inspect.signature(method)}"
    init = inspect.getsource(LightningCLI.__init__)
    calls = [line.strip() for line in init.splitlines()]
    assert "self._parse_ckpt_path()" in calls, UPDATE.format(fn=fn) + ": LightningCLI.__init__ no longer calls it"
    order = [next(i for i, c in enumerate(calls) if c.startswith(s))
             for s in ("self.parse_arguments(", "self._parse_ckpt_path()", "self.before_instantiate_classes()")]
    assert order == sorted(order), UPDATE.format(fn=fn) + \
        ": LightningCLI.__init__ no longer calls it between parse_arguments and before_instantiate_classes"
    for name in ("parse_ckpt_path", "parse_ckpt_path_as_lightning"):
        assert not hasattr(LightningCLI, name), \
            UPDATE.format(fn=fn) + f": LightningCLI now has a {name} of its own, which CkptPathParsing's would replace"


class _Parsed(Exception):
    """Raised by the test CLIs once they have seen the config: nothing gets built or run."""


def _run_cli(cli_class, ckpt: Path) -> int:
    seen = []

    class Probe(cli_class):
        def before_instantiate_classes(self):
            seen.append(self.config.fit.model.width)
            raise _Parsed

    with pytest.raises(_Parsed):
        Probe(Tiny, args=["fit", "--model.width", "2", "--ckpt_path", str(ckpt)],
              trainer_defaults={"logger": False, "accelerator": "cpu"}, save_config_callback=None)
    return seen[0]


def test_ckpt_path_parsing_replaces_lightnings(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"width": 5}}, ckpt)
    paths = []

    class Mine(compat.CkptPathParsing, LightningCLI):
        def parse_ckpt_path(self):
            paths.append(self.config.fit.ckpt_path)

    class Default(compat.CkptPathParsing, LightningCLI):
        pass

    assert _run_cli(LightningCLI, ckpt) == 5  # Lightning's: the checkpoint's width replaces the config's
    assert _run_cli(Default, ckpt) == 5, UPDATE.format(fn="CkptPathParsing.parse_ckpt_path_as_lightning")
    assert _run_cli(Mine, ckpt) == 2 and paths == [str(ckpt)], UPDATE.format(fn="CkptPathParsing")


def test_the_project_cli_uses_the_hook():
    from cli import DOODLCLI

    assert issubclass(DOODLCLI, compat.CkptPathParsing)
    assert "parse_ckpt_path" in vars(DOODLCLI) and "_parse_ckpt_path" not in vars(DOODLCLI)


# -- the rule: only lightning_compat.py touches these names -----------------------------------------------
PRIVATE = re.compile(r"_signal_connector|_parse_ckpt_path|_save_last_checkpoint|_monitor_candidates|"
                     r"_last_global_step_saved|_default_hp_metric|\._version\b")


def test_only_lightning_compat_touches_lightnings_private_names():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    files = tracked.stdout.split() if tracked.returncode == 0 else \
        [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    offenders = []
    for name in files:
        path = ROOT / name
        if name.startswith("tests/") or name == "doodl_lightning/lightning_compat.py" or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{name}:{n}: {line.strip()}")
    assert not offenders, ("Lightning's private names outside doodl_lightning/lightning_compat.py (add a function "
                           "there and call it):\n" + "\n".join(offenders))


def test_the_pin_covers_the_installed_release():
    """pyproject.toml pins lightning to the releases these tests passed on: running them on another one means the
    pin (and the tested range it states) must be updated once they pass."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in deps if Requirement(d).name == "lightning")
    assert pin.specifier.contains(lightning.__version__, prereleases=True), (
        f"Lightning {lightning.__version__} is outside pyproject.toml's pin {pin}: if the tests here pass on it, widen "
        "the pin to include it; if not, update doodl_lightning/lightning_compat.py first")
