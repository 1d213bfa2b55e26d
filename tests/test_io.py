"""Atomic output (doodl_lightning.io), by behaviour: a write that fails half-way leaves the previous
complete file as it was and nothing half-written beside it.

The failure is a real one from the OS: RLIMIT_FSIZE lets a write reach that many bytes of a file and
fails the rest (EFBIG), whichever way the writer writes.
"""
from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch
from PIL import Image

from doodl_lightning.io import atomic_write_bytes, atomic_write_text, save_png

resource = pytest.importorskip("resource")
LIMIT = 16 * 1024


@contextlib.contextmanager
def files_cut_at(nbytes: int):
    """Every file write in this process past ``nbytes`` fails with OSError(EFBIG) while inside."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < nbytes:
        pytest.skip("file size hard limit too low")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_file_size_limit_really_cuts_a_plain_write_half_way(tmp_path):
    """The harness itself: a non-atomic write under the limit leaves a half-written file."""
    p = tmp_path / "plain.bin"
    with files_cut_at(LIMIT), pytest.raises(OSError):
        p.write_bytes(b"x" * (4 * LIMIT))
    assert p.stat().st_size == LIMIT


@pytest.mark.parametrize("kind", ["bytes", "text"])
def test_failed_write_keeps_the_previous_file_and_leaves_nothing_half_written(tmp_path, kind):
    target = tmp_path / "out" / "results.jsonl"
    old = '{"index": 0, "best_loss": 0.5}\n' * 100
    atomic_write_text(target, old)
    assert target.read_text() == old
    new = '{"index": 1, "best_loss": 0.25}\n' * 2000  # > 4 LIMIT: the write must fail part-way
    with files_cut_at(LIMIT), pytest.raises(OSError):
        if kind == "bytes":
            atomic_write_bytes(target, new.encode())
        else:
            atomic_write_text(target, new)
    assert target.read_text() == old  # the previous complete file, untouched
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no half-written temporary either
    # and without the limit the new content replaces it whole
    atomic_write_text(target, new)
    assert target.read_text() == new
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_failed_png_save_keeps_the_previous_image(tmp_path):
    target = tmp_path / "images" / "item000_best.png"
    old = torch.zeros(3, 8, 8)
    save_png(target, old)
    old_bytes = target.read_bytes()
    noise = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1  # incompressible
    with files_cut_at(LIMIT), pytest.raises(OSError):
        save_png(target, noise)
    assert target.read_bytes() == old_bytes
    Image.open(target).load()  # still a complete image
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    save_png(target, noise)
    with Image.open(target) as im:
        assert im.size == (128, 128) and target.stat().st_size > 2 * LIMIT
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_atomic_writes_get_a_normal_files_permissions(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
