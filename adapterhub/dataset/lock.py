"""One writer at a time per dataset folder.

Every operation that changes a folder (tag edits, captioning, ``validate --fix``, undo) holds
``DIR/.adapterhub/lock`` around its whole read-modify-write: an edit planned from captions that
another process is rewriting would silently drop that process's edit, and two journals written at
once would make ``undo`` refuse. The lock is the operating system's lock on an open file
(``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), so it dies with its holder: a killed run
never leaves a stale lock behind.

A second writer waits up to :data:`WAIT_S` seconds (a short edit finishes and the second one then
plans from its result), then stops with one line naming the folder and the holder's operation.
The shards of one captioning run (``accelerate launch``, ``torchrun``) write disjoint images, so they
hold the lock *shared*: together they still exclude every other writer (Windows has no shared file
locks: there a second shard waits like any other writer).

The first exclusive holder also removes the temporary files a killed write left beside its target
(named with :data:`~adapterhub.dataset.folder.TEMP_SUFFIX`; while we hold the lock exclusively,
nobody else can be writing one).
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from adapterhub.dataset.folder import STATE_DIR, TEMP_SUFFIX
from adapterhub.errors import AdapterhubError

WAIT_S = 60.0
POLL_S = 0.05
LOCK_NAME = "lock"

_held: dict[Path, list] = {}  # lock path -> [fd, shared, depth]: re-entered, never re-locked, in-process
_guard = threading.Lock()


def _try_lock(fd: int, shared: bool) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it into ``lock.owner`` (best effort)."""
    try:
        info = json.loads(path.with_name(LOCK_NAME + ".owner").read_text(encoding="utf-8"))
        return f"{info['op']}, pid {info['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown operation"


def _write_holder(path: Path, op: str) -> None:
    # a separate file: the waiter reads it without touching the locked file's descriptor
    try:
        path.with_name(LOCK_NAME + ".owner").write_text(
            json.dumps({"op": op, "pid": os.getpid(), "time": time.time()}), encoding="utf-8")
    except OSError:
        pass


def _lock_path(root: Path) -> Path:
    state = Path(root, STATE_DIR)
    try:
        state.mkdir(exist_ok=True)
    except OSError as exc:
        raise AdapterhubError(f"{root}: cannot keep the undo journal in {state} "
                              f"({exc.strerror or exc}); nothing was changed") from None
    return (state / LOCK_NAME).resolve()


def _acquire(root: Path, path: Path, op: str, shared: bool) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise AdapterhubError(f"{root}: cannot open the lock {path} ({exc.strerror or exc}); "
                              "nothing was changed") from None
    deadline = time.monotonic() + WAIT_S
    while not _try_lock(fd, shared):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise AdapterhubError(f"{root}: another adapterhub process is changing this folder "
                                  f"({_holder(path)}); try again when it has finished")
        time.sleep(POLL_S)
    _write_holder(path, op)
    return fd


@contextmanager
def dataset_lock(root: str | os.PathLike, op: str, shared: bool = False) -> Iterator[None]:
    """Hold the folder's writer lock for the block; re-entrant within a process.

    Waits up to :data:`WAIT_S` seconds for another holder, then raises :class:`AdapterhubError`
    (one line). ``op`` is what a waiting process is told the holder is doing.
    """
    root = Path(root)
    if not root.is_dir():
        raise AdapterhubError(f"{root}: not a folder")
    path = _lock_path(root)
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry[2] += 1
    if entry is None:
        fd = _acquire(root, path, op, shared)
        with _guard:
            entry = _held[path] = [fd, shared, 1]
        if not shared:
            clean_temp_files(root)
    try:
        yield
    finally:
        with _guard:
            entry[2] -= 1
            last = entry[2] == 0
            if last:
                del _held[path]
        if last:
            _unlock(entry[0])
            os.close(entry[0])


def clean_temp_files(root: Path) -> list[Path]:
    """Remove the temp files killed writes left in the dataset folders (hidden folders skipped,
    as :func:`~adapterhub.dataset.folder.scan` skips them); returns what was removed."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                path = Path(dirpath, name)
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
