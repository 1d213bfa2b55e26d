"""The run's summary in TensorBoard: HPARAMS with the guidance and the results, and the final evaluation."""
from __future__ import annotations

from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch import Callback

from doodl_lightning.console import describe_guidance
from doodl_lightning.lightning_compat import drop_hp_metric_placeholder

RESULT_METRICS = ("result/mean_best_loss", "result/mean_final_loss")


class TensorBoardSummary(Callback):
    """On in every ``cli.py`` run (its trainer defaults); for a run's TensorBoard loggers:

    - no ``hp_metric = -1``: Lightning's TensorBoard logger writes that placeholder when hyper-parameters
      are logged without metrics (``default_hp_metric``), which is switched off at set-up;
    - the final evaluation (the latents after the last step: the images ``results.jsonl`` calls final) is
      logged at its step under the per-step tags (``train/...``, ``items/...``), so every curve ends where
      the run ended (a last step can make an item worse);
    - HPARAMS: the model's hyper-parameters, each guidance term's class, weight and target
      (``guidance/<name>/...``), and the results ``result/mean_best_loss`` (the mean over items of each
      item's loss at its best iteration, the final evaluation included: its lowest loss, or with a regulariser the
      loss where its reward loss was lowest), ``result/mean_final_loss`` and, with held-out
      metrics, ``result/final_metrics/<name>``. Written at the end
      of the fit, so a run killed before it is not listed there.

    Its checkpoint state is each item's lowest loss so far, so a resumed fit's bests span the whole run.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        # a config that also lists this callback: the first one does the work
        self.active = next(cb for cb in trainer.callbacks if isinstance(cb, TensorBoardSummary)) is self
        self.module = pl_module
        # cli.py reuses this instance for every fit of a process: nothing carries over
        self.restored_best = self.restored_reward = None
        if self.active:
            for logger in self.tensorboard_loggers(trainer):
                # Lightning has no public switch once the logger exists; it reads this flag when it logs the
                # hyper-parameters, just after set-up
                drop_hp_metric_placeholder(logger)

    @staticmethod
    def tensorboard_loggers(trainer) -> list:
        return [lg for lg in trainer.loggers if isinstance(lg, FabricTensorBoardLogger)]

    @staticmethod
    def hyperparameters(trainer, pl_module) -> dict:
        """The model's hyper-parameters, the guidance terms and the trainer settings that change the result."""
        params = {k: v for k, v in pl_module.hparams.items() if not str(k).startswith("_")}
        params["items"] = len(getattr(pl_module, "items", ()))
        params["guidance"] = {d["name"]: {"class": d["class"], "weight": d["weight"], "target": d["target"] or "-"}
                              for d in describe_guidance(getattr(pl_module, "guidance", None))}
        if len(getattr(pl_module, "metrics", ())):  # held out: logged, never optimised
            params["metrics"] = {m.name: type(m).__name__ for m in pl_module.metrics}
        params["trainer"] = {"max_steps": trainer.max_steps, "precision": str(trainer.precision),
                             "world_size": trainer.world_size}
        return params

    # each item's lowest loss so far (``DOODL.item_best_loss``) is checkpointed here, so a resumed fit's
    # ``train/best_loss`` and ``result/mean_best_loss`` cover the steps before the resume too
    # (with its reward loss ``item_best_reward``, which chose that iteration: a regularised run's best is not
    # the lowest loss, so the resumed fit must go on comparing rewards)
    def state_dict(self) -> dict:
        module = getattr(self, "module", None)
        best = getattr(module, "item_best_loss", None)
        if best is None:
            return {}
        reward = getattr(module, "item_best_reward", None)
        return {"item_best_loss": best.clone(), **({} if reward is None else {"item_best_reward": reward.clone()})}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored_best = state_dict.get("item_best_loss")
        self.restored_reward = state_dict.get("item_best_reward")  # None in checkpoints made before it was kept

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(self, "restored_best", None) is not None and len(self.restored_best) == len(pl_module.items):
            pl_module.item_best_loss = self.restored_best.clone()
            reward = getattr(self, "restored_reward", None)
            pl_module.item_best_reward = (reward if reward is not None else self.restored_best).clone()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.module = None  # cli.py keeps this instance for the process: it must not keep the model alive

    def on_train_end(self, trainer, pl_module) -> None:
        if not getattr(self, "active", False) or not trainer.loggers or not hasattr(pl_module, "gathered_metrics"):
            return
        ev = pl_module.final_evaluation()  # cached: the image and results callbacks use the same one
        logs = pl_module.metric_logs(pl_module.gathered_metrics(ev))  # a collective: every rank comes here
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        results = dict(zip(RESULT_METRICS, (logs["train/best_loss"], logs["train/loss"])))
        # held-out metrics of the final evaluation: result/final_metrics/<name> (mean over items)
        results.update({f"result/final_{tag}": v for tag, v in logs.items() if tag.startswith("metrics/")})
        for logger in trainer.loggers:
            logger.log_metrics(logs, step=step)
        params = self.hyperparameters(trainer, pl_module)
        for logger in self.tensorboard_loggers(trainer):
            logger.log_hyperparams(params, metrics=results, step=step)
