"""Durable, all-or-nothing writes: a reader never sees half a checkpoint or half an exported policy.

The pattern: write beside the target (same directory, so the final rename never crosses a filesystem and
never degrades to a copy), fsync, then rename into place.
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse a directory fsync)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below ``folder`` (their data is on disk before the folder is renamed into place)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def temp_sibling(path: str | Path, tag: str = "partial") -> Path:
    """A hidden name beside ``path`` for writing it before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing an older one. Two renames (a folder cannot
    atomically replace a non-empty one); the old copy is deleted only once the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    old = temp_sibling(path, "old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
