"""What defines a run's trajectory, saved in its checkpoints and compared on resume.

A resumed run must continue the trajectory its checkpoint holds. ``trajectory(module)`` describes it as a
flat ``{key: value}``: the items (prompt x seed), every module setting except those that only change how
the same numbers are computed (``NOT_TRAJECTORY``), each guidance's class, settings and weights, the
frozen model's weights and noise schedule, the precision and the number of processes. ``mismatch`` lists
the keys that differ in one line. Weights are compared by a fingerprint (a few values of every tensor),
not by path: a model directory that moved is the same model, a retrained one at the same path is not.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch
from torch import nn

__all__ = ["NOT_TRAJECTORY", "trajectory", "mismatch", "plain"]

# module settings that change how the numbers are computed but not which numbers (memory, speed, where
# the weights are read from), or that the item list already covers
NOT_TRAJECTORY = {"micro_batch", "backprop", "drift_tolerance", "vae_checkpointing", "cuda_graphs",
                  "local_files_only", "model", "model_config", "prompts", "seeds", "prompt_file"}
def plain(value):
    """``value`` as plain comparable data, or None when it is not settings-like (a tensor, a model, ...).
    Exact built-in types: a subclass (an enum, torch's version string) would make the checkpoint one that
    ``torch.load(weights_only=True)`` refuses."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool before int: it is one
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict):
        items = {str(k): plain(v) for k, v in value.items()}
        return None if any(items[str(k)] is None and v is not None for k, v in value.items()) else items
    return None


def _settings(module: nn.Module) -> dict:
    """The public, settings-like attributes of one module (not its submodules, tensors or caches)."""
    out = {}
    for name, value in vars(module).items():
        # gradient checkpointing (vae_checkpointing) changes memory, not the numbers
        if name.startswith("_") or name in ("training", "gradient_checkpointing"):
            continue
        setting = plain(value)
        if setting is not None or value is None:
            out[name] = setting
    return out


def _fingerprint(module: nn.Module, dtype: torch.dtype | None) -> str:
    """A short hash of every submodule's settings and of up to 8 values of every weight tensor.

    Floating-point values are rounded to ``dtype``, the dtype the frozen weights run in under the precision:
    a checkpoint is saved after Lightning's ``-true`` precisions cast the module and compared before they
    do, and rounding float32 to that dtype is the cast itself, so both sides agree exactly."""
    h = hashlib.sha256()
    for name, sub in sorted(module.named_modules(), key=lambda kv: kv[0]):
        h.update(repr((name, type(sub).__qualname__, sorted(_settings(sub).items()))).encode())
    tensors = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda kv: kv[0])
    samples = []
    for name, t in tensors:
        h.update(repr((name, tuple(t.shape), t.is_floating_point())).encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(8, flat.numel()), device=flat.device).long()
            s = flat[idx]
            if s.is_floating_point() and dtype is not None:
                s = s.to(dtype)
            samples.append(s.double())
    if samples:  # one transfer from the device for all the samples
        h.update(repr(torch.cat(samples).cpu().tolist()).encode())
    return h.hexdigest()[:16]


def trajectory(module, trainer=None) -> dict:
    """The flat ``{key: value}`` description of what ``module`` (a ``DOODL``) computes, keyed as in the config;
    ``trainer``: the one it will run under, when not yet attached (a check before the fit starts)."""
    from .lightning_compat import attached_trainer
    from .precision import frozen_dtype

    trainer = trainer if trainer is not None else attached_trainer(module)
    dtype = frozen_dtype(trainer.precision) if trainer is not None else None
    out = {"model.class": f"{type(module).__module__}.{type(module).__qualname__}",
           "model.items (prompts x seeds)": [[it.prompt, it.seed] for it in module.items]}
    for key, value in module.hparams.items():
        if key.startswith("_") or key in NOT_TRAJECTORY:
            continue
        if key == "source_image" and isinstance(value, str) and os.path.exists(value):
            value = os.path.realpath(value)  # the same image from another working directory
        out[f"model.{key}"] = plain(value)
    backbone = module.backbone
    main = [backbone.unet, backbone.vae, backbone.text_encoder]
    out["model.model (weights)"] = _fingerprint(nn.ModuleList(main), dtype)
    # the frozen parts beyond those three (SDXL's second text encoder, SD3's and FLUX's text encoders 2-3 (held
    # outside the module tree), a ControlNet): a key of their own, so a checkpoint made before they were recorded
    # still resumes (a key only one side has is not compared); absent for SD-1.x without a ControlNet
    seen = {id(m) for m in main}
    others = [m for m in [*(m for _, m in backbone.named_children()), *getattr(backbone, "text_encoders", [])]
              if isinstance(m, nn.Module) and id(m) not in seen and not seen.add(id(m))]
    if others:
        out["model.model (other weights: text encoders, ControlNet)"] = _fingerprint(nn.ModuleList(others), dtype)
    out["model.model (noise schedule)"] = {k: plain(v) for k, v in sorted(backbone.scheduler.config.items())
                                           if not k.startswith("_")}
    for i, g in enumerate(module.guidance):
        out[f"model.guidance[{i}].class"] = f"{type(g).__module__}.{type(g).__qualname__}"
        for name, value in sorted(_settings(g).items()):
            out[f"model.guidance[{i}].{name}"] = value
        for path, sub in g.named_modules():  # our own parts by name (cutouts: num_cuts, cut_power); the
            if path and type(sub).__module__.startswith("doodl_lightning."):  # loaded models by fingerprint
                for name, value in sorted(_settings(sub).items()):
                    out[f"model.guidance[{i}].{path}.{name}"] = value
        out[f"model.guidance[{i}] (models and weights)"] = _fingerprint(g, dtype)
    # LightningCLI's --optimizer / --lr_scheduler replace the module's own update: cli.py records them on the module
    # (``cli_settings``) so a resume with another lr is refused, where torch's load_state_dict would have run on
    # silently with the checkpoint's param groups (absent for fits that do not come through cli.py)
    for key, value in getattr(module, "cli_settings", {}).items():
        out[key] = value
    if trainer is not None:
        out["trainer.precision"] = str(trainer.precision)
        out["trainer.devices x num_nodes (processes)"] = trainer.world_size
    return out


def _short(value, limit: int = 48) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def mismatch(saved: dict, now: dict, source: str = "the checkpoint") -> str | None:
    """None when every key present on both sides is equal; otherwise one line naming each differing key with
    its saved and current value, and the fix. A key only one side has is not compared: a setting added to
    the code later is, at its default, what older checkpoints ran."""
    keys = [k for k in saved if k in now and not _same(saved[k], now[k])]
    if "trainer.precision" in keys:  # weights fingerprints are rounded to the precision: that key says it all
        keys = [k for k in keys if "weights" not in k]
    if not keys:
        return None
    diffs = ", ".join(f"{k} {_difference(saved[k], now[k])}" for k in keys)
    return (f"{source} was made by a different run ({diffs}): resume with the settings it was made with "
            "(the config.yaml in its run directory), or start a new run without --ckpt_path")


def _difference(old, new) -> str:
    if isinstance(old, list) and isinstance(new, list):  # long lists (the items): where they part
        if len(old) != len(new):
            return f"{len(old)} -> {len(new)} entries"
        i = next(i for i, (a, b) in enumerate(zip(old, new)) if not _same(a, b))
        return f"[{i}] {_short(old[i])} -> {_short(new[i])}"
    return f"{_short(old)} -> {_short(new)}"
