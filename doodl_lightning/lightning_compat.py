"""The one place where the project touches Lightning's private names.

Everything else uses Lightning's public API only. Each function here does one thing that no public API does,
and says which private name it uses and why; ``tests/test_lightning_compat.py`` checks every one of those names
against the installed Lightning, so an upgrade that moves one fails there, naming the function to update, and
not somewhere in a run. ``pyproject.toml`` pins Lightning to the releases those tests passed on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["attached_trainer", "clear_received_sigterm", "save_unsaved_last_checkpoint", "unfixed_version",
           "set_version", "drop_hp_metric_placeholder", "CkptPathParsing"]


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or None when it is not attached to one.

    No private name: the public ``LightningModule.trainer`` property raises ``RuntimeError`` when the module is not
    attached (it returns the private ``_trainer`` otherwise), so the RuntimeError means None. A module attached to a
    ``Fabric`` instead gets a Fabric shim from that property, not a trainer: None as well, as the private
    ``_trainer`` (what the project read before) is then."""
    if getattr(module, "fabric", None) is not None:
        return None
    try:
        return module.trainer
    except RuntimeError:
        return None


def clear_received_sigterm(trainer: Trainer) -> None:
    """Lower Lightning's "SIGTERM received" flag, so that its loops do not turn that SIGTERM into an exit without
    outputs (``cli.StopOnSignal`` takes it over and ends the run after its step, the outputs written).

    Private name: ``trainer._signal_connector.received_sigterm``, the flag Lightning's own SIGTERM handler raises.
    The public ``Trainer.received_sigterm`` is a read-only property of it, and nothing public lowers it."""
    trainer._signal_connector.received_sigterm = False


def save_unsaved_last_checkpoint(checkpoint: ModelCheckpoint, trainer: Trainer) -> bool:
    """Save ``last.ckpt`` for the current step when ``checkpoint`` has ``save_last`` and its schedule
    (``every_n_train_steps``, ...) did not save this step; True when it saved. For a run stopped by a signal
    before the step its schedule would have saved.

    Private names: ``ModelCheckpoint._last_global_step_saved`` (the step it last saved),
    ``ModelCheckpoint._monitor_candidates(trainer)`` (the metrics its file names are formatted with) and
    ``ModelCheckpoint._save_last_checkpoint(trainer, monitor_candidates)`` (what writes ``last.ckpt``, with its
    versioning, linking and removal of the previous one). ModelCheckpoint has no public "save last now":
    ``on_train_end`` saves only when it has saved nothing at all in the fit, and ``trainer.save_checkpoint`` to
    a path of our own would bypass its ``last_model_path`` bookkeeping, which the next resume reads."""
    if not checkpoint.save_last or checkpoint._last_global_step_saved == trainer.global_step:
        return False
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
    return True


def unfixed_version(logger) -> bool:
    """Whether a ``TensorBoardLogger`` / ``CSVLogger`` (Lightning's or Fabric's) has no version yet: none was given
    and none has been chosen, so it would pick ``max(version_N) + 1`` by listing its directory when first asked.

    Private name: ``logger._version`` (the version given, or None). The public ``logger.version`` cannot tell: reading
    it chooses and fixes the version by that listing, the race ``cli.py`` avoids by claiming one itself."""
    return logger._version is None


def set_version(logger, version: int | str) -> None:
    """Make a ``TensorBoardLogger`` / ``CSVLogger`` (Lightning's or Fabric's) write into ``version_<version>`` (or
    ``<version>`` for a string), as if built with ``version=...``. Call before it writes anything (its ``log_dir``
    and experiment are made from the version when first used).

    Private name: ``logger._version``, what the constructor's ``version`` argument sets. The public ``version`` is a
    read-only property, and ``cli.py`` gets the loggers already built by LightningCLI from the config."""
    logger._version = version


def drop_hp_metric_placeholder(logger) -> None:
    """Stop a ``TensorBoardLogger`` (Lightning's or Fabric's) from writing the ``hp_metric = -1`` placeholder when
    hyper-parameters are logged without metrics, as if built with ``default_hp_metric=False``.

    Private name: ``logger._default_hp_metric``, what that constructor argument sets and ``log_hyperparams`` reads.
    Nothing public changes it once the logger exists, and the loggers come built from the user's config."""
    logger._default_hp_metric = False


class CkptPathParsing:
    """Mixin for a ``LightningCLI`` subclass (put it first among the bases): ``parse_ckpt_path()`` replaces what
    LightningCLI does with ``--ckpt_path`` right after parsing the arguments. Override it; the default is
    Lightning's (``parse_ckpt_path_as_lightning``).

    Private name: ``LightningCLI._parse_ckpt_path()``, called by ``LightningCLI.__init__`` after
    ``parse_arguments`` and before ``before_instantiate_classes``. Lightning's replaces the model's settings in
    the config by the checkpoint's hyper-parameters; LightningCLI has no public hook or switch for it."""

    def _parse_ckpt_path(self) -> None:  # LightningCLI.__init__ calls this
        self.parse_ckpt_path()

    def parse_ckpt_path(self) -> None:
        """What to do with ``--ckpt_path`` once the arguments are parsed (``self.config``); default: Lightning's."""
        self.parse_ckpt_path_as_lightning()

    def parse_ckpt_path_as_lightning(self) -> None:
        """Lightning's own handling: the checkpoint's hyper-parameters replace the model's settings in the config."""
        super()._parse_ckpt_path()
