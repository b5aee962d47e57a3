"""Where an output goes: checked before the work starts, and a write that fails anyway told in one line.

Writes themselves are atomic (:func:`adapterhub.io.atomic_path` / :func:`~adapterhub.io.atomic_dir`), so a
failed write leaves the previous output, or nothing. What this module adds is the telling: a folder that
cannot take the output is found before minutes of work, and an ``OSError`` from the write (a full disk, a
read-only mount) becomes an :class:`AdapterhubError` naming the output and the reason.

Write permission counts as the user set it: a folder without write bits is read-only even for root, who
could write into it anyway (as a read-only catalog is, :func:`adapterhub.catalog.db._writable`).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from adapterhub.errors import AdapterhubError

_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def writable(path: str | os.PathLike) -> bool:
    """``path`` has a write bit and this process may write it (``os.access`` also sees a read-only mount)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(path, os.W_OK)


def existing_folder(target: str | os.PathLike) -> Path:
    """The folder an output at ``target`` is created in, or its nearest existing ancestor (what a
    ``mkdir(parents=True)`` creates the rest in)."""
    folder = Path(target).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(target: str | os.PathLike, what: str = "--out") -> None:
    """Raise :class:`AdapterhubError` unless a file or folder can be created at ``target``: the folder
    it goes in (or the nearest one that exists) must be a folder with write permission. Nothing is created."""
    folder = existing_folder(target)
    if not folder.is_dir():
        raise AdapterhubError(f"{what} {target}: {folder} is a file, not a folder")
    if not writable(folder):
        raise AdapterhubError(f"{what} {target}: cannot write into {folder}: the folder is read-only")


def write_failed(target: str | os.PathLike, exc: OSError, what: str = "--out") -> AdapterhubError:
    """One line for an ``OSError`` raised while writing ``target`` (which the atomic write left unchanged)."""
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if exc.errno in _READ_ONLY:
        reason = f"{existing_folder(target)} is read-only ({reason})"
    return AdapterhubError(f"{what} {target}: cannot write: {reason}; nothing was changed")
