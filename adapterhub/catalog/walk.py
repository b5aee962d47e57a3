"""Finding the files a scan looks at: every visible file under the roots, and diffusers folders.

A folder that holds a known weight file *and* a JSON config (``adapter_config.json``,
``config.json``) is one candidate (a diffusers / PEFT output folder) and is not descended into.
Hidden files and folders (``.name``) are left alone: they are temp files, caches and VCS data.

Each file gets a *sidecar signature*: a digest of the names, sizes and mtimes of the files beside it
that share its stem (``style.preview.png``, ``style.civitai.info``, ``style.json``), so a rescan
notices an edited sidecar without re-hashing the adapter.
"""
from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.catalog.examine import stat_of
from adapterhub.io import FOLDER_CONFIG_FILES, FOLDER_WEIGHT_FILES


@dataclass(frozen=True)
class Found:
    path: str
    kind: str  # file | folder
    size: int
    mtime_ns: int
    sidecar_sig: str = ""
    sidecars: tuple[str, ...] | None = None  # None: not listed (folders, files named as roots)


@dataclass
class Walk:
    found: list[Found] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_adapter_folder(names: set[str]) -> bool:
    return bool(names & set(FOLDER_WEIGHT_FILES)) and bool(names & set(FOLDER_CONFIG_FILES))


def _sidecars(name: str, names: list[str], stats: dict[str, tuple[int, int]]) -> tuple[tuple[str, ...], str]:
    """The files beside ``name`` that share its stem, and a digest of their names, sizes and mtimes."""
    stem = name.rsplit(".", 1)[0] + "."
    i = bisect.bisect_left(names, stem)
    found = []
    while i < len(names) and names[i].startswith(stem):
        if names[i] != name:
            found.append(names[i])
        i += 1
    if not found:
        return (), ""
    parts = "\n".join(f"{n}\0{stats[n][0]}\0{stats[n][1]}" for n in found)
    return tuple(found), hashlib.sha1(parts.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _valid_name(path: str, walk: Walk) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        walk.warnings.append(f"{path.encode('utf-8', 'surrogateescape')!r}: skipped, its name is not valid UTF-8")
        return False
    return True


def _scan_dir(folder: str, walk: Walk, stack: list[str]) -> None:
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as exc:
        walk.warnings.append(f"{folder}: cannot list folder ({exc.strerror or exc})")
        return
    if _is_adapter_folder({e.name for e in entries}):
        if _valid_name(folder, walk):
            size, mtime = stat_of(Path(folder), "folder")
            walk.found.append(Found(folder, "folder", size, mtime))
        return
    stats: dict[str, tuple[int, int]] = {}
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file():
                st = e.stat()
                stats[e.name] = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            walk.warnings.append(f"{e.path}: cannot stat ({exc.strerror or exc})")
    names = sorted(stats)
    for name in names:
        path = os.path.join(folder, name)
        if _valid_name(path, walk):
            size, mtime = stats[name]
            sidecars, sig = _sidecars(name, names, stats)
            walk.found.append(Found(path, "file", size, mtime, sig, sidecars))


def walk(roots: list[Path]) -> Walk:
    """Every candidate under ``roots`` (files given as roots are candidates themselves)."""
    result = Walk()
    seen: set[str] = set()
    for root in roots:
        if root.is_file():
            size, mtime = stat_of(root, "file")
            result.found.append(Found(str(root), "file", size, mtime))
            continue
        stack = [str(root)]
        while stack:
            folder = stack.pop()
            if folder not in seen:
                seen.add(folder)
                _scan_dir(folder, result, stack)
    return result
