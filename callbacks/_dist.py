"""Gathering Python objects from every rank to all of them (a no-op on one process)."""
from __future__ import annotations

import torch.distributed as dist


def gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def output_dir(trainer, dirpath: str | None) -> str:
    return dirpath or trainer.log_dir or trainer.default_root_dir
