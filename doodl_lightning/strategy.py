"""DDP over seeds: one process per device, each optimising its own items, nothing averaged."""
from __future__ import annotations

import os

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class SeedParallelStrategy(DDPStrategy):
    """Launch and set up the process group like DDP, but never wrap the module in
    DistributedDataParallel: ranks own different items (``items[rank::world_size]``), so averaging
    their gradients or broadcasting rank 0's latents would mix unrelated images.

    Each rank also writes its own checkpoint (``last.ckpt`` on rank 0, ``last.ckpt.rank1`` ...) since
    each holds different latents and optimiser state; resume with the same number of processes.
    """

    strategy_name = "seed_parallel"

    def configure_ddp(self) -> None:
        pass  # no DistributedDataParallel wrapper: no parameter broadcast, no gradient all-reduce

    def _rank_path(self, path) -> str:
        path = str(path)
        return path if self.global_rank == 0 else f"{path}.rank{self.global_rank}"

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self.world_size == 1:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.checkpoint_io.save_checkpoint(checkpoint, self._rank_path(filepath), storage_options=storage_options)

    def remove_checkpoint(self, filepath) -> None:
        path = self._rank_path(filepath)
        if os.path.exists(path):
            self.checkpoint_io.remove_checkpoint(path)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return super().load_checkpoint(self._rank_path(checkpoint_path) if self.world_size > 1 else checkpoint_path,
                                       weights_only=weights_only)


if "seed_parallel" not in StrategyRegistry:
    StrategyRegistry.register("seed_parallel", SeedParallelStrategy,
                              description="DDP launch without gradient averaging: ranks optimise different seeds")
