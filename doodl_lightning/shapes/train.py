"""Train one shapes-world model from a YAML: ``python -m doodl_lightning.shapes.train fit --config
experiments/shapes/vae.yaml`` (LightningCLI; ``model.class_path`` picks the module)."""
from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from .base_module import ShapesModule


def main(args=None, run=True):
    torch.set_float32_matmul_precision("high")
    return LightningCLI(ShapesModule, None, subclass_mode_model=True, args=args, run=run,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
