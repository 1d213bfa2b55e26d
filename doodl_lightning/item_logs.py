"""What a noise search logs each step: every per-item metric gathered over all processes, its mean over items,
each item's own line, and the TensorBoard layout that draws them (a mixin of ``search.NoiseSearch``)."""
from __future__ import annotations

import functools
import math
import re

import torch
from torch import Tensor

from .data import unshard
from .lightning_compat import attached_trainer
from .objective import Evaluation


class ItemLogging:
    """Per-item logging for a LightningModule with ``items``, ``local_items``, ``latents`` and ``active``."""

    def gather_items(self, values: Tensor) -> Tensor:
        """A per-local-item vector -> the vector over ALL items (in item order), on every rank."""
        trainer = attached_trainer(self)
        world = trainer.world_size if trainer is not None else 1
        values = values.detach().float()
        if world == 1:
            return values.cpu()
        padded = torch.full((math.ceil(len(self.items) / world),), float("nan"), device=values.device)
        padded[: len(values)] = values
        return unshard(self.all_gather(padded).reshape(world, -1).cpu(), len(self.items))

    @functools.cached_property
    def item_names(self) -> list[str]:
        """Each item's name in TensorBoard, ``prompt | seed N`` (``console.item_labels``), in item order."""
        from .console import item_labels

        return item_labels(self.items)

    def gathered_metrics(self, ev: Evaluation, grad: Tensor | None = None) -> dict[str, Tensor]:
        """Each per-item metric of ``ev`` over ALL items (gathered from every rank; a collective): ``loss``,
        ``loss_<guidance>``, ``latent_norm``, ``metric_<name>`` (the held-out metrics) and, given the gradient,
        ``grad_norm``."""
        per_item = {"loss": ev.total, "latent_norm": self.latents.detach()[:, 0].flatten(1).norm(dim=1),
                    # with a regulariser: the reward terms' weighted sum, which chooses the best iteration (ReNO's)
                    **({"reward_loss": ev.reward} if ev.reward is not ev.total else {}),
                    **{f"loss_{k}": v for k, v in ev.terms.items()},
                    **{f"metric_{k}": v for k, v in ev.metrics.items()}}
        if grad is not None:  # a search without gradients (best-of-N) has none
            per_item["grad_norm"] = grad.flatten(1).norm(dim=1)
        return {k: self.gather_items(v) for k, v in per_item.items()}

    def metric_logs(self, gathered: dict[str, Tensor]) -> dict[str, float]:
        """What a step logs of ``gathered_metrics``: ``train/<metric>`` (mean over items), ``items/<metric>/<name>``
        (each item under its ``item_names`` entry, so a tag means the same item in every run) and
        ``train/best_loss``, the mean over items of each item's loss at its best iteration so far (``item_best_loss``,
        all items, updated here; it restarts with a resumed process). The best iteration is the one of the lowest
        reward loss (``item_best_reward``; ``Evaluation.reward``, regularisers excluded, as ReNO), so without a
        regulariser ``train/best_loss`` is each item's lowest loss. A held-out metric's mean is ``metrics/<name>``."""
        loss = gathered["loss"]
        reward = gathered.get("reward_loss", loss)
        best, best_reward = getattr(self, "item_best_loss", None), getattr(self, "item_best_reward", None)
        if best is None or best.shape != loss.shape:
            self.item_best_loss, self.item_best_reward = loss.clone(), reward.clone()
        else:
            if best_reward is None or best_reward.shape != loss.shape:
                best_reward = best  # restored from a checkpoint that kept the loss only
            better = reward < best_reward  # strict: the first of equal iterations is kept, as results.jsonl and ReNO
            self.item_best_loss = torch.where(better, loss, best)
            self.item_best_reward = torch.where(better, reward, best_reward)
        logs = {self.mean_tag(k): float(v.mean()) for k, v in gathered.items()}
        logs["train/best_loss"] = float(self.item_best_loss.mean())
        names = self.item_names
        logs.update({f"items/{k}/{names[i]}": float(v[i]) for k, v in gathered.items() for i in range(len(names))})
        return logs

    @staticmethod
    def mean_tag(metric: str) -> str:
        """The tag of a metric's mean over items: ``train/<metric>``; a held-out metric's ``metrics/<name>``."""
        return f"metrics/{metric[len('metric_'):]}" if metric.startswith("metric_") else f"train/{metric}"

    def write_tensorboard_layout(self, metrics: list[str]) -> None:
        """Once per TensorBoard run, on rank 0: a custom-scalars layout (TensorBoard's CUSTOM SCALARS tab) with one
        chart per metric in which every item is its own line, named ``items/<metric>/<prompt | seed>``, beside
        the run-level mean ``train/<metric>`` (and, for the loss, ``train/best_loss``). The Scalars tab gives one
        card per tag; only a Multiline chart draws several tags as lines of one chart. The charts are regexes
        over tags, the same in every run, so TensorBoard merges the layouts of the runs it shows."""
        if attached_trainer(self) is None or self.global_rank != 0:
            return
        written = self.__dict__.setdefault("_tensorboard_layouts", [])
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if not hasattr(exp, "add_custom_scalars") or any(exp is w for w in written):
                continue
            charts = {}
            for m in metrics:
                tags = [f"^items/{re.escape(m)}/", f"^{re.escape(self.mean_tag(m))}$"]
                if m == "loss":
                    tags.append("^train/best_loss$")
                charts[m] = ["Multiline", tags]
            exp.add_custom_scalars({"DOODL: every item (prompt | seed) and the mean (train/...)": charts})
            written.append(exp)

    def log_step(self, ev: Evaluation, grad: Tensor | None) -> None:
        """Log one step (see ``metric_logs``) plus ``train/active_items`` and, with ``reversible``, the drift.
        ``grad`` None: a search without gradients (best-of-N), no ``grad_norm``."""
        gathered = self.gathered_metrics(ev, grad)
        logs = self.metric_logs(gathered)
        logs["train/active_items"] = float(self.gather_items(self.active.float()).sum())
        if "reversible_drift" in ev.info:
            logs["train/reversible_drift"] = float(ev.info["reversible_drift"])
        self.write_tensorboard_layout(list(gathered))
        self.log("loss", logs["train/loss"], prog_bar=True, logger=False, batch_size=len(self.items))
        self.log_dict(logs, batch_size=len(self.items))
