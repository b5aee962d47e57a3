"""The catalog's hashes, all in one read pass over a file.

* ``sha256``: the whole file (Civitai "SHA256"); ``autov2`` is its first 10 hex digits.
* ``autov1``: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (A1111's legacy ``model_hash``).
* ``autov3``: sha256 of the bytes after the safetensors header (A1111 "addnet" hash, Civitai AutoV3,
  ModelSpec ``hash_sha256``); it survives metadata edits. Shown as 12 hex; the full digest is stored.
  ``None`` for files that are not safetensors-shaped (pickles).

A diffusers folder hashes like :func:`adapterhub.api.sha256_file`: every file under it, sorted by
path, as one stream; its AutoV1/AutoV3 are those of its weight file.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 << 20
AUTOV1_START, AUTOV1_END = 0x100000, 0x110000
# The AutoV1 of every file under 1 MiB: the webui hashes the (empty) bytes past the end. Stored and shown
# as the webui computes it, but never looked up: it names all small files at once.
EMPTY_AUTOV1 = "e3b0c442"


@dataclass(frozen=True)
class Hashes:
    sha256: str
    autov1: str
    autov3: str | None

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    def as_dict(self) -> dict:
        return {"sha256": self.sha256, "autov1": self.autov1, "autov2": self.autov2, "autov3": self.autov3}


def _tensor_offset(head: bytes, size: int) -> int | None:
    """Where safetensors tensor bytes start, from the first bytes of the file (None: not safetensors)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if 8 + n <= size else None


def _feed_window(hasher, view: memoryview, pos: int, start: int, end: int | None) -> None:
    """Feed the part of ``view`` (which starts at file offset ``pos``) that lies in [start, end)."""
    lo = max(start - pos, 0)
    hi = len(view) if end is None else min(end - pos, len(view))
    if lo < hi:
        hasher.update(view[lo:hi])


def hash_stream(files: list[Path], weight_file: Path | None = None) -> Hashes:
    """Hash ``files`` as one stream (sha256); AutoV1/AutoV3 over ``weight_file`` (default: the only file)."""
    weight_file = weight_file or files[0]
    full, window = hashlib.sha256(), hashlib.sha256()
    tail = None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in files:
        is_weight = path == weight_file
        size = os.stat(path).st_size
        offset = None
        pos = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                chunk = view[:n]
                full.update(chunk)
                if is_weight:
                    if pos == 0:
                        offset = _tensor_offset(bytes(chunk[:16]), size)
                        tail = hashlib.sha256() if offset is not None else None
                    if tail is not None:
                        _feed_window(tail, chunk, pos, offset, None)
                    _feed_window(window, chunk, pos, AUTOV1_START, AUTOV1_END)
                pos += n
    return Hashes(full.hexdigest(), window.hexdigest()[:8], tail.hexdigest() if tail else None)


def hash_file(path: str | os.PathLike) -> Hashes:
    return hash_stream([Path(path)])


def folder_files(folder: Path) -> list[Path]:
    """Every file under a folder, sorted (the order :func:`adapterhub.api.sha256_file` uses)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def hash_folder(folder: Path, weight_file: Path | None) -> Hashes:
    files = folder_files(folder)
    if not files:
        return Hashes(hashlib.sha256().hexdigest(), hashlib.sha256().hexdigest()[:8], None)
    return hash_stream(files, weight_file if weight_file in files else files[0])
