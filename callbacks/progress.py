"""The console's progress bar: optimisation steps, not epochs."""
from __future__ import annotations

import math
import sys

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole fit::

        step 7/15 |█████▏      | 3.52s/step, ETA 00:28, elapsed 00:24, loss 0.8540 · best 0.7901 · active 4/4

    ``loss``: this step's mean over all items; ``best``: the mean over items of each item's lowest loss so far
    (what ``results.jsonl`` keeps as ``best_loss``); ``active``: items still optimised (early stopping) / all.
    Read from what ``NoiseSearch.log_step`` logs (``train/loss``, ``train/best_loss``, ``train/active_items``).

    Lightning's bar counts batches within an epoch; a DOODL epoch is one batch, so it read ``Epoch 14/-2 ...
    1/1 0.00it/s``. This bar counts ``trainer.global_step`` against ``max_steps`` and starts a resumed fit
    at its step, so the rate and ETA cover the steps this process runs.
    """

    # tqdm puts ", " before the postfix itself
    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:12}| {rate_inv_fmt}, ETA {remaining}, elapsed {elapsed}{postfix}"

    def init_train_tqdm(self, total: int | None = None, initial: int = 0) -> Tqdm:
        return Tqdm(desc="step", total=total, initial=initial, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    unit="step", bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed fit counts from its step (``initial``), so the rate and ETA cover the steps run here
        self.train_progress_bar = self.init_train_tqdm(self.total_steps(trainer), trainer.global_step)

    @staticmethod
    def total_steps(trainer) -> int | None:
        """``max_steps``, else what Lightning estimates from ``max_epochs`` (one step per epoch here); None: open-ended."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - only the bar's total depends on it
            return None
        return None if total is None or math.isinf(total) else int(total)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole fit: Lightning's would reset it every epoch (= every step here)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_postfix_str(self.summary(trainer, pl_module), refresh=True)  # one refresh: step and metrics
        if bar.total is not None and bar.n >= bar.total:
            # closed now, not after the final evaluation and images: Lightning's "fit stopped" line and the
            # end-of-run report then start on lines of their own, and the rate is that of the steps
            bar.close()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.should_stop and self.train_progress_bar is not None:
            self.train_progress_bar.close()  # early stopping: as above

    def on_exception(self, trainer, pl_module, exception) -> None:
        # the run failed (a full disk, a NaN loss): end the bar's line, so cli.py's error is a line of its own
        try:
            bar = self.train_progress_bar
        except TypeError:  # Lightning's property raises before the bar is made: a failure in setup / on_fit_start
            return         # must still reach cli.py as its one line, not as this TypeError
        if bar is not None and not bar.disable:
            bar.close()

    @staticmethod
    def summary(trainer, pl_module) -> str:
        """``loss 0.8540 · best 0.7901 · active 4/4`` from the metrics logged at this step."""
        metrics = trainer.callback_metrics
        parts = []
        for key, name in (("train/loss", "loss"), ("train/best_loss", "best")):
            if key in metrics:
                parts.append(f"{name} {float(metrics[key]):.4f}")
        if "train/active_items" in metrics:
            n = len(getattr(pl_module, "items", ()) or ())
            parts.append(f"active {int(float(metrics['train/active_items']))}" + (f"/{n}" if n else ""))
        return " · ".join(parts)

    def get_metrics(self, trainer, pl_module) -> dict:
        return {}  # Lightning's postfix (v_num, every prog_bar metric): the summary above replaces it


class DefaultProgressBar(Callback):
    """Puts ``StepProgressBar`` in place of the bar Lightning adds by itself (cli.py turns this on).

    Why not list ``StepProgressBar`` in the trainer's defaults: Lightning then refuses
    ``trainer.enable_progress_bar: false`` and any other bar a config names (one progress bar only). This
    swaps only Lightning's own default, which Lightning appends after the callbacks a config lists, so a bar
    named in the config (before this callback) or no bar at all is left as it is.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        callbacks = trainer.callbacks
        bars = [k for k, cb in enumerate(callbacks) if isinstance(cb, ProgressBar)]
        me = next(k for k, cb in enumerate(callbacks) if cb is self)
        if len(bars) == 1 and type(callbacks[bars[0]]) in (TQDMProgressBar, RichProgressBar) and bars[0] > me:
            bar = StepProgressBar()
            callbacks[bars[0]] = bar
            # Lightning calls setup on the list it is walking, which now holds the new bar further on; calling
            # it here too is harmless (it only records the trainer) and does not rely on that
            bar.setup(trainer, pl_module, stage)
