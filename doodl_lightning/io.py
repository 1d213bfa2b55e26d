"""Atomic file output: write to a temporary name in the same folder, then rename."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets a normal file's permissions
        # rename is atomic: a reader or a killed run sees the old file or the new one, never half of
        # one. No fsync: it guards only against an OS crash and costs seconds per file on a busy disk.
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            # a failed write() names no file ("[Errno 28] No space left on device"): say which one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB PIL image."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def save_png(path: str | os.PathLike, image: torch.Tensor | Image.Image) -> None:
    import io

    img = image if isinstance(image, Image.Image) else to_pil(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``dst`` holding what ``src`` holds: a hard link (no space; ``src`` being rewritten later, by rename, leaves
    ``dst`` as it was) or, where the file system refuses one (another device, no hard links), a copy; either
    appears at once, whole (a temporary name, then a rename)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    os.replace(tmp, dst)


def check_writable(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PermissionError(f"output directory {p} is not writable ({e.strerror}): choose another with "
                              "--trainer.default_root_dir or the callback's dirpath") from None
    return p


# -- run directories: claimed atomically, locked while a run writes them ------------------------------
class DirectoryBusyError(RuntimeError):
    """Another run is writing to the same output directory."""


def claim_version(parent: str | os.PathLike) -> int:
    """Create ``parent/version_N`` for the first free N and return N.

    ``os.mkdir`` either creates the directory or fails because it exists, so two runs started at once can
    never get the same N (Lightning's loggers pick N by listing the folder, which races)."""
    parent = check_writable(parent)
    taken = [int(d.name[len("version_"):]) for d in parent.iterdir()
             if d.name.startswith("version_") and d.name[len("version_"):].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(parent / f"version_{n}")
            return n
        except FileExistsError:
            n += 1


def lock_directory(path: str | os.PathLike) -> int | None:
    """Hold an exclusive lock on directory ``path`` (created if needed) until the returned descriptor is
    closed or the process ends; a second run locking it gets ``DirectoryBusyError``. None where the file
    system has no locks (some network file systems): then only claimed run directories protect a run."""
    import fcntl

    p = check_writable(path)
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryBusyError(f"output directory {p} is in use by another run that is still writing to it: "
                                 "wait for it, or give this run another --trainer.default_root_dir "
                                 "(or callback dirpath)") from None
    except OSError:
        os.close(fd)
        return None
    return fd


# -- reading what a run did not write itself: one line naming the file and the fix -------------------------
def weights_file_problem(path: str | os.PathLike) -> str | None:
    """Why a weights file cannot be read safely (truncated, corrupt, a pickle holding more than tensors),
    or None when it reads. A pickle is read whole: meant for error paths, to name the bad file."""
    import pickle
    import warnings

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):  # opening checks the header and that the file covers its data
                pass
        else:
            with warnings.catch_warnings():  # torch's note on the pickle protocol of a file refused anyway
                warnings.simplefilter("ignore")
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the first object that is not a tensor, when torch names it
        held = f" (found {found.group(1)})" if found else ""
        return f"a pickle that holds more than tensors{held} (refused: unpickling it could run code)"
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer, by its first sentence
        first = " ".join(str(e).split()).split(". ")[0]
        return f"truncated or corrupt ({type(e).__name__}: {first[:160]})"
    return None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint of this project, read with ``torch.load(weights_only=True)``."""
    import warnings

    p = Path(path)
    fix = ("resume from an intact checkpoint (the last.ckpt in an earlier run's checkpoints/ folder, or "
           "--ckpt_path last) or start a new run without --ckpt_path")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist: {fix}")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - every way of failing gets the same one line, with the reason
        raise ValueError(f"checkpoint {p} cannot be read: it is {weights_file_problem(p) or 'unreadable'}: {fix}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise ValueError(f"checkpoint {p} is not a Lightning checkpoint (no state_dict / global_step): {fix}")
    return ckpt
