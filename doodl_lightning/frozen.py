"""Frozen models are inputs, not results: their weights stay out of the optimisation's checkpoints."""
from __future__ import annotations

from torch import nn


def leave_out_of_checkpoints(module: nn.Module) -> None:
    """``module``'s keys are dropped from the ``state_dict()`` of every module that contains it, and not
    expected back by its ``load_state_dict`` (it is loaded from its own files), so a checkpoint holds only
    the latents and optimiser state. Its own ``state_dict()`` still holds its weights."""
    module._load_prefix = ""
    module.register_state_dict_post_hook(_drop_own_keys)
    module.register_load_state_dict_pre_hook(_remember_prefix)
    module.register_load_state_dict_post_hook(_forgive_own_missing_keys)


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not prefix:  # asked for its own weights, not as part of a container
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _remember_prefix(module: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    module._load_prefix = prefix


def _forgive_own_missing_keys(module: nn.Module, incompatible_keys) -> None:
    if module._load_prefix:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(module._load_prefix)]
