"""``python cli.py fit --config experiments/quickstart.yaml``: the LightningCLI entry point."""
from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

import doodl_lightning.strategy  # noqa: F401  registers --trainer.strategy seed_parallel
from doodl_lightning.module import DOODL

TRAINER_DEFAULTS = {
    "max_steps": 50,        # optimisation steps (one batch = one step over all items)
    "max_epochs": -1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(DOODL, args=args, run=run, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # bad input: one line naming the problem and the fix, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
