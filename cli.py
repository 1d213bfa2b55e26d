"""``python cli.py fit --config experiments/quickstart.yaml``: the LightningCLI entry point."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import doodl_lightning.strategy  # noqa: F401  registers --trainer.strategy seed_parallel
from doodl_lightning.console import silence_irrelevant
from doodl_lightning.module import DOODL

TRAINER_DEFAULTS = {
    "max_steps": 50,        # optimisation steps (one batch = one step over all items)
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    silence_irrelevant()
    # subclass mode: ``model:`` without a class_path is a DOODL; ``class_path: doodl_lightning.best_of_n.BestOfN``
    # picks another search over the same items, guidance and outputs
    cli = LightningCLI(DOODL, subclass_mode_model=True, args=args, run=run, trainer_defaults=TRAINER_DEFAULTS,
                       seed_everything_default=0, save_config_kwargs={"overwrite": True})
    if run and cli.subcommand == "fit":
        report(cli.trainer)
    return cli


def report(trainer) -> None:
    """After a fit, on rank 0 (no collectives: the other ranks may have exited): each item's initial -> best
    loss and where its outputs are."""
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
    if lines:
        print("\n".join(["", "DOODL finished:"] + lines), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # bad input: one line naming the problem and the fix, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
