"""results.jsonl: one line per item, rewritten atomically as the run goes."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

from doodl_lightning.io import atomic_write_text, check_writable, link_or_copy, save_png

from ._dist import gather_objects, output_dir


def environment(device, trainer=None) -> dict:
    """Where a result was computed: device (and GPU name), torch threads, precision, library versions."""
    import diffusers
    import lightning

    device = torch.device(device)
    # plain str: torch.__version__ is a TorchVersion, which weights_only checkpoint loads refuse
    env = {"device": str(device), "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__),
           "diffusers": str(diffusers.__version__), "lightning": str(lightning.__version__)}
    if device.type == "cuda":
        env["device_name"] = str(torch.cuda.get_device_name(device))
    if trainer is not None:
        env["precision"] = str(trainer.precision)
    return env


class ResultsWriter(Callback):
    """Per item: prompt, seed, rank, steps run, initial / final / best total loss and per-guidance
    terms, and the paths of its final and best images. The best iteration is the one of the lowest reward loss
    (``Evaluation.reward``: the weighted guidance terms that are rewards, regularisers such as the noise-norm prior
    left out), the first of equals, as ReNO keeps its lowest ``total_reward_loss`` (``training/trainer.py``); without a
    regulariser it is the lowest total loss. With a regulariser the records also hold ``initial_reward_loss`` /
    ``best_reward_loss`` / ``final_reward_loss`` (``best_loss`` is then the total loss at that iteration).
    With held-out ``model.metrics``: ``initial_metrics`` / ``best_metrics`` / ``final_metrics``, their values on the
    same images (the best iteration is chosen by the loss, never by a metric).
    ``environment``: what the numbers depend on beyond the config (``environment()``): CPU trajectories
    differ across thread counts (float32 reduction order), GPU ones across devices and library versions.

    Every ``every_n_steps`` steps and at the end, each rank writes its items' improved best images
    and rank 0 rewrites ``results.jsonl`` atomically, so a killed run leaves complete lines and
    complete images only.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 1):
        self.dirpath, self.every_n_steps = dirpath, every_n_steps
        self.records: dict[int, dict] = {}  # local items, by global index

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.dir = check_writable(output_dir(trainer, self.dirpath))
        self.env = environment(pl_module.device, trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run writes a new folder, and its records (from the checkpoint) name images of the older one, e.g.
        # a best step before the resume: each rank brings its items' images here, so the folder is self-contained
        items = {it.index: it for it in pl_module.local_items}
        for index, rec in self.records.items():
            for key in [k for k in rec if k.endswith("_image") and rec[k]]:
                here, old = self._image_path(items[index], key[: -len("_image")]), Path(rec[key])
                if old.resolve() == Path(here).resolve():
                    continue
                if old.is_file():
                    link_or_copy(old, here)
                    rec[key] = here
                else:  # never a path that leads nowhere
                    warnings.warn(f"item {index}: its {key} {old}, named by the resumed checkpoint, is gone; "
                                  "results.jsonl names none until this run writes one", stacklevel=1)
                    rec[key] = None

    def _terms(self, ev, j: int) -> dict:
        return {k: float(v[j]) for k, v in ev.terms.items()}

    def _metrics(self, ev, kind: str, j: int) -> dict:
        """``{<kind>_metrics: {name: value}}`` of item ``j`` when the run has held-out metrics, else nothing."""
        metrics = getattr(ev, "metrics", None)
        return {f"{kind}_metrics": {k: float(v[j]) for k, v in metrics.items()}} if metrics else {}

    @staticmethod
    def _reward(ev, kind: str, j: int) -> dict:
        """``{<kind>_reward_loss: value}`` of item ``j`` when the run has a regulariser (the reward loss differs from
        the total), else nothing."""
        reward = getattr(ev, "reward", ev.total)
        return {} if reward is ev.total else {f"{kind}_reward_loss": float(reward[j])}

    def _image_path(self, item, kind: str) -> str:
        return str(self.dir / "images" / f"item{item.index:03d}_{kind}.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ev, step = pl_module.last, trainer.global_step - 1  # the evaluation happened before this step's update
        for j, item in enumerate(pl_module.local_items):
            total, reward = float(ev.total[j]), float(getattr(ev, "reward", ev.total)[j])
            rec = self.records.get(item.index)
            if rec is None:
                rec = self.records[item.index] = {
                    **item.to_dict(), "rank": trainer.global_rank, "initial_loss": total,
                    "initial_terms": self._terms(ev, j), "best_loss": float("inf"), **self._metrics(ev, "initial", j),
                    **self._reward(ev, "initial", j),
                }
            rec["environment"] = self.env  # this process's (a resumed run: the one that ran last)
            if bool(pl_module.stepped[j]) or rec.get("steps") is None:
                rec["steps"] = step + 1
            if reward < self._best_reward(rec):
                rec.update(best_loss=total, best_terms=self._terms(ev, j), best_step=step,
                           best_image=self._image_path(item, "best"), **self._metrics(ev, "best", j),
                           **self._reward(ev, "best", j))
                save_png(rec["best_image"], ev.images[j])
        if step % self.every_n_steps == 0:
            self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.records:
            return
        ev = pl_module.final_evaluation()
        for j, item in enumerate(pl_module.local_items):
            rec = self.records[item.index]
            total, reward = float(ev.total[j]), float(getattr(ev, "reward", ev.total)[j])
            rec.update(final_loss=total, final_terms=self._terms(ev, j), final_image=self._image_path(item, "final"),
                       **self._metrics(ev, "final", j), **self._reward(ev, "final", j))
            save_png(rec["final_image"], ev.images[j])
            if reward < self._best_reward(rec):  # the final latents are an iteration too
                rec.update(best_loss=total, best_terms=self._terms(ev, j), best_step=rec["steps"],
                           best_image=self._image_path(item, "best"), **self._metrics(ev, "best", j),
                           **self._reward(ev, "best", j))
                save_png(rec["best_image"], ev.images[j])
        self._write(trainer)

    @staticmethod
    def _best_reward(rec: dict) -> float:
        """The reward loss of the record's best iteration so far (inf before the first; without a regulariser the
        reward loss is the total, kept as ``best_loss``)."""
        return rec.get("best_reward_loss", rec["best_loss"])

    def _write(self, trainer) -> None:
        records = [r for part in gather_objects(list(self.records.values())) for r in part]
        if trainer.global_rank == 0:
            lines = [json.dumps(r, sort_keys=True) for r in sorted(records, key=lambda r: r["index"])]
            atomic_write_text(os.path.join(self.dir, "results.jsonl"), "\n".join(lines) + "\n")

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = {int(k): v for k, v in state_dict["records"].items()}
