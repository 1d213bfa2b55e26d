"""Small helpers shared by the benchmark scripts: the machine a result was measured on, text tables, and
the conditioning of random-weight models. Nothing here computes a chain, a loss or an update: that is the
core's (``doodl_lightning.backbone``, ``objective``, ``guidance``, ``optim``).

The scripts run as ``python experiments/benchmarks/X.py`` (this folder is then first on ``sys.path``) and are
loaded from their path by the tests; each puts this folder on ``sys.path`` and does ``import common``.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch

__all__ = ["DTYPES", "ROOT", "cpu_name", "fmt", "free", "git_state", "machine_description", "machine_info",
           "peak_rss", "quiet_hf", "random_embeddings", "read_records", "sync", "text_table", "write_json"]

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# -- the device --------------------------------------------------------------------------------------------

def free(device) -> None:
    """Collect garbage and, on CUDA, hand cached blocks back (before a measurement of memory)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def sync(device) -> None:
    """Wait for the device's queued work (CUDA) before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss() -> int:
    """The process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quiet_hf() -> None:
    """No diffusers warnings on every dtype cast of a model built from a config, no transformers progress bars."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    try:
        from transformers.utils import logging as tlogging

        tlogging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers is optional here
        pass


# -- records -----------------------------------------------------------------------------------------------

def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, written atomically (its folder made)."""
    from doodl_lightning.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), json.dumps(obj, indent=1))


def read_records(path) -> list[dict]:
    """The records of a JSON file (a list, or one record); [] when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else [data]


# -- the machine -------------------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor or machine elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line: the CPU (cores, torch threads, torch version) and, on CUDA, the GPU first."""
    device = torch.device(device)
    desc = f"CPU {cpu_name()} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads, torch {torch.__version__})"
    if device.type == "cuda":
        desc = f"GPU {torch.cuda.get_device_name(device)} (models and optimisation on the GPU); host " + desc
    return desc


def git_state(paths: tuple[str, ...] = ("doodl_lightning",)) -> tuple[str | None, list[str] | None]:
    """(HEAD commit, the files under ``paths`` with uncommitted changes); (None, None) without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "status", "--short", *paths], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return None, None
    return head or None, [line[3:] for line in status.splitlines() if line.strip()]


def machine_info(device: torch.device | str = "cpu") -> dict:
    """The machine and software a result was measured with, for a JSON file (``description``: the one line)."""
    import diffusers

    device = torch.device(device)
    head, dirty = git_state()
    return dict(device=device.type, description=machine_description(device), git_head=head,
                doodl_lightning_uncommitted=dirty, cpu=cpu_name(), cpu_cores=os.cpu_count(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                torch_threads=torch.get_num_threads(), torch=torch.__version__, diffusers=diffusers.__version__,
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


# -- tables ------------------------------------------------------------------------------------------------

_FORMATS = {"e": "{:.2e}", "s": "{:.3f}", "x": "{:.2f}", "f": "{:.1f}"}


def fmt(value, kind: str | None = None) -> str:
    """A table cell: '-' for None; ``kind`` 'e' (1.23e-04), 's' (0.123), 'x' (1.23), 'f' (1.2), '%' (a fraction
    as a percentage), 'MiB' / 'KiB' (bytes); None: ``str``."""
    if value is None:
        return "-"
    if kind == "MiB":
        return f"{value / 2**20:.1f}"
    if kind == "KiB":
        return f"{value / 2**10:.1f}"
    if kind == "%":
        return f"{100 * value:.1f}"
    if kind in _FORMATS:
        return _FORMATS[kind].format(value)
    return str(value)


def text_table(columns: list[tuple[str, str, str | None]], records: list[dict], edit=None) -> str:
    """Right-aligned columns ``(header, record key, fmt kind)``, one row per record; ``edit(record, row)``
    may change a row's cells (a list of strings) before the widths are taken."""
    rows = [[header for header, _, _ in columns]]
    for r in records:
        row = [fmt(r.get(key), kind) for _, key, kind in columns]
        if edit is not None:
            edit(r, row)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


# -- random-weight models ----------------------------------------------------------------------------------

def random_conditioning(unet, seed: int, size: tuple[int, int], text_tokens: int | None = None):
    """(cond, uncond) ``Conditioning``s for a random-weight UNet of any family: unit-normal hidden states
    (1, 77, cross_attention_dim) and, for SDXL's text_time UNet, a unit-normal pooled text embedding and the
    micro-conditioning ids of ``size`` (what its text towers would hand it). An SD3 / FLUX transformer (``unet``
    with a ``joint_attention_dim``): hidden states (1, ``text_tokens``, joint_attention_dim) and pooled projections
    (1, pooled_projection_dim), as its text encoders would hand them."""
    from doodl_lightning.conditioning import Conditioning

    if unet.config.get("joint_attention_dim") is not None:
        gen = torch.Generator().manual_seed(seed + 123)
        dim, pooled = unet.config.joint_attention_dim, unet.config.pooled_projection_dim
        return tuple(Conditioning(torch.randn((1, text_tokens or 256, dim), generator=gen),
                                  {"pooled_projections": torch.randn((1, pooled), generator=gen)}) for _ in range(2))

    cond, uncond = random_embeddings(unet.config.cross_attention_dim, seed)
    if unet.config.get("addition_embed_type") != "text_time":
        return Conditioning(cond), Conditioning(uncond)
    gen = torch.Generator().manual_seed(seed + 321)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    ids = torch.tensor([[size[0], size[1], 0, 0, size[0], size[1]]], dtype=torch.float32)
    return tuple(Conditioning(h, {"text_embeds": torch.randn((1, pooled), generator=gen), "time_ids": ids})
                 for h in (cond, uncond))


def random_embeddings(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text embeddings (1, 77, dim), unit-normal from ``seed + 123``, for a random-weight UNet:
    a random text encoder would only turn token ids into random embeddings (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed + 123)
    return tuple(torch.randn((1, 77, dim), generator=gen) for _ in range(2))
