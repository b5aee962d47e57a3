"""The undo journal: every change to a dataset folder is written down before it is made.

One operation = one file ``DIR/.adapterhub/journal/NNNNNN.jsonl``: a header line, then one line per
file, appended and flushed *before* that file changes (write-ahead). A line records either

* ``caption``: the caption's exact previous bytes (``before``, base64; null when there was no file)
  and the SHA-256 of what was written; or
* ``file``: an image replaced by a fix, its original moved to ``backup``; or
* ``move``: a file moved to ``to`` (quarantine).

A ``caption`` or ``file`` that was a symlink also records the link's target (``link``): the edit
replaces the link by a regular file (whatever it points to, perhaps shared with other datasets, is
never changed) and undo puts the same link back.

``undo`` restores the newest operation in reverse order and moves its journal to ``journal/undone``,
holding the folder's writer lock (:mod:`adapterhub.dataset.lock`) like every edit.
A file whose content is neither the recorded result nor the original was edited since; it is left
alone unless ``force``. A torn last line (a crash while writing it) is ignored: its change was
never made.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.dataset.folder import STATE_DIR, TEMP_SUFFIX, sha256, write_bytes_atomic
from adapterhub.dataset.lock import dataset_lock
from adapterhub.errors import AdapterhubError
from adapterhub.hashes import sha256_file


def state_dir(root: Path, *parts: str) -> Path:
    path = Path(root, STATE_DIR, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Journal:
    """Write-ahead record of one operation; use as a context manager."""

    def __init__(self, root: Path, op: str, details: dict | None = None):
        self.root = Path(root)
        folder = state_dir(self.root, "journal")
        names = [p.name.split(".")[0].split("-")[0] for p in
                 [*folder.glob("*.jsonl"), *folder.glob("undone/*.jsonl")]]
        seq = 1 + max((int(n) for n in names if n.isdigit()), default=0)
        rank = os.environ.get("RANK")
        suffix = f"-rank{rank}" if rank not in (None, "0") and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        self.path = folder / f"{seq:06d}{suffix}.jsonl"
        self.count = 0
        self._f = open(self.path, "x", encoding="utf-8")
        self._write({"op": op, "time": time.time(), "details": details or {}, "version": 1})

    def _write(self, entry: dict) -> None:
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def caption(self, path: Path, before: bytes | None, after: bytes) -> None:
        b = None if before is None else base64.b64encode(before).decode("ascii")
        self._write({"kind": "caption", "path": self.rel(path), "before": b, "after": sha256(after),
                     **_link(path)})
        self.count += 1

    def file(self, path: Path, backup: Path, after: bytes) -> None:
        self._write({"kind": "file", "path": self.rel(path), "backup": self.rel(backup),
                     "after": sha256(after), **_link(path)})
        self.count += 1

    def move(self, src: Path, dst: Path) -> None:
        self._write({"kind": "move", "path": self.rel(src), "to": self.rel(dst)})
        self.count += 1

    def close(self) -> None:
        self._f.close()
        if self.count == 0:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _link(path: Path) -> dict:
    """``{"link": target}`` for a symlink (its text, relative or not, exactly), else nothing."""
    return {"link": os.readlink(path)} if Path(path).is_symlink() else {}


def _put_link(path: Path, target: str) -> None:
    """Make ``path`` the symlink ``target`` atomically (a new link renamed over whatever is there)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _is_link_to(path: Path, target: str) -> bool:
    return path.is_symlink() and os.readlink(path) == target


def write_caption(journal: Journal, path: Path, before: bytes | None, after: bytes) -> None:
    """Record, flush, then write one caption atomically."""
    journal.caption(path, before, after)
    journal.flush()
    write_bytes_atomic(path, after)


@dataclass
class Operation:
    path: Path
    op: str
    time: float
    details: dict
    entries: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"id": self.path.stem, "op": self.op, "files": len(self.entries),
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))}


def read_operation(path: Path) -> Operation:
    lines = path.read_text(encoding="utf-8").split("\n")
    head = json.loads(lines[0])
    entries = []
    for line in lines[1:]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # torn last line: that change was never made
    return Operation(path, head["op"], head["time"], head.get("details", {}), entries)


def operations(root: Path) -> list[Operation]:
    folder = Path(root, STATE_DIR, "journal")
    return [read_operation(p) for p in sorted(folder.glob("*.jsonl"))] if folder.is_dir() else []


def _current_sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _restore_caption(root: Path, e: dict, force: bool) -> str:
    path, link = root / e["path"], e.get("link")
    before = None if e["before"] is None else base64.b64decode(e["before"])
    now = _current_sha(path)
    if _is_link_to(path, link) if link is not None else now == sha256(before):
        return "unchanged"
    if now != e["after"] and not force:
        return "conflict"
    if link is not None:
        _put_link(path, link)
    elif before is None:
        path.unlink(missing_ok=True)
    else:
        write_bytes_atomic(path, before)
    return "restored"


def _restore_file(root: Path, e: dict, force: bool) -> str:
    path, backup, link = root / e["path"], root / e["backup"], e.get("link")
    if not backup.is_file():
        return "unchanged"
    if _current_sha(path) != e["after"] and not force:
        return "conflict"
    if link is not None:
        _put_link(path, link)
        backup.unlink()
    else:
        os.replace(backup, path)
    return "restored"


def _restore_move(root: Path, e: dict, force: bool) -> str:
    src, dst = root / e["path"], root / e["to"]
    if not dst.exists():
        return "unchanged"
    if src.exists() and not force:
        return "conflict"
    src.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(dst), str(src))
    return "restored"


_RESTORERS = {"caption": _restore_caption, "file": _restore_file, "move": _restore_move}


def undo_last(root: Path, force: bool = False) -> dict:
    """Undo the newest operation; returns its summary and per-outcome counts."""
    with dataset_lock(root, "undo"):
        return _undo_newest(Path(root), force)


def _undo_newest(root: Path, force: bool) -> dict:
    ops = operations(root)
    if not ops:
        raise AdapterhubError(f"{root}: nothing to undo")
    op = ops[-1]
    outcomes = [(e["path"], _RESTORERS[e["kind"]](Path(root), e, force)) for e in reversed(op.entries)]
    conflicts = [p for p, o in outcomes if o == "conflict"]
    if conflicts and not force:
        raise AdapterhubError(
            f"{len(conflicts)} file(s) changed since {op.op} (first: {conflicts[0]}); the others were "
            "restored; run undo --force to restore those too")
    done = state_dir(Path(root), "journal", "undone")
    os.replace(op.path, done / op.path.name)
    counts = {k: sum(1 for _, o in outcomes if o == k) for k in ("restored", "unchanged")}
    return {**op.summary(), **counts}
