"""Atomic file and folder writes, shared by every stage (torch-free, standard library only).

A reader sees the old file (or folder) or the whole new one, never half of one: everything is built
under a hidden temporary name beside its target and renamed into place when complete. What we
write is meant for teammates on shared storage, so files end up 0644 and folders 0755 whatever
``mkstemp``/``mkdtemp`` chose (they create 0600/0700).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FILE_MODE = 0o644
FOLDER_MODE = 0o755


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it becomes ``path`` when the block succeeds.

    The temporary file lives in the same folder so that the final ``os.replace`` is a rename on one
    file system (atomic); it is removed when the block raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, FILE_MODE)
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` when the block succeeds.

    An existing ``path`` is replaced: moved aside, the new one renamed in, then the old one deleted,
    so ``path`` is missing only between two renames. If the block raises, the temporary folder is
    removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield temporary
        _make_shareable(temporary)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.rename(temporary, target)
            shutil.rmtree(retired)
        else:
            os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _make_shareable(folder: Path) -> None:
    """Folders 0755 and files 0644 below ``folder`` (its own mode included)."""
    os.chmod(folder, FOLDER_MODE)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), FOLDER_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)
