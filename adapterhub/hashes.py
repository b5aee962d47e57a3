"""The hashes adapter files are known by, each formula written once. Torch-free at import; files are read
in fixed-size blocks (bounded memory, whatever the file's size).

=====================  ==================================================================  ===========
name                   bytes hashed (sha256 of ...)                                        shown
=====================  ==================================================================  ===========
``sha256``             the whole file (Civitai "SHA256", the webui's ``calculate_sha256``)  64 hex
``autov2``             the same digest (the webui's checkpoint ``shorthash``)               first 10
``autov1``             the 64 KiB at offset 1 MiB (the webui's old ``model_hash``, kohya's   first 8
                       ``ss_sd_model_hash``, the ControlNet extension's model hash)
``autov3``             the bytes after the safetensors header (the webui's "addnet" hash,    first 12
                       LoRA ``shorthash``); it survives metadata edits. None for a file that
                       does not begin like safetensors (a pickle)
``sshs_model_hash``    kohya: the AutoV3 of the tensors serialised with only the ``ss_*``    64 hex
                       metadata, which equals the AutoV3 of the finished file
``sshs_legacy_hash``   kohya: the AutoV1 of that serialisation                              first 8
=====================  ==================================================================  ===========

A diffusers folder hashes as one stream of every file under it, sorted by path; its AutoV1 / AutoV3 are
those of its weight file. The AutoV1 of a file of 1 MiB or less is the hash of nothing, the same for all
of them (:data:`EMPTY_AUTOV1`): shown as the webui computes it, never used to identify a file
(:func:`autov1_identifies`).

Every digest is a byte range fed from one pass over the blocks (:func:`_feed`): the whole stream, the
AutoV1 window, the tensor data. Reading starts and stops where the wanted ranges do, so the AutoV1 of a
checkpoint reads 64 KiB, not the file.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from adapterhub.io import header_bytes, header_length, read_safetensors_header, tensor_data_offset

CHUNK = 4 << 20  # read size: large enough that the per-call cost vanishes, small enough to stay in cache
AUTOV1_START, AUTOV1_END = 0x100000, 0x110000
EMPTY_AUTOV1 = hashlib.sha256(b"").hexdigest()[:8]  # "e3b0c442": every file of 1 MiB or less
KOHYA_PREFIX = "ss_"  # the metadata kohya keeps when it hashes: its training facts, fixed once written


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


def autov1_identifies(autov1: str | None) -> bool:
    """Whether an AutoV1 can name a file: not missing and not :data:`EMPTY_AUTOV1` (which names them all)."""
    return bool(autov1) and autov1 != EMPTY_AUTOV1


# --------------------------------------------------------------------------------------------
# the engine: byte ranges of a stream of blocks, each into its own sha256
# --------------------------------------------------------------------------------------------
class _Range:
    """sha256 of the stream's bytes in [start, end) (end None: to the end)."""

    def __init__(self, start: int, end: int | None = None):
        self.digest, self.start, self.end = hashlib.sha256(), start, end

    def feed(self, block, at: int) -> None:
        """Take the part of ``block`` (which starts at stream offset ``at``) inside the range."""
        lo = max(self.start - at, 0)
        hi = len(block) if self.end is None else min(self.end - at, len(block))
        if lo < hi:
            self.digest.update(block[lo:hi])

    def hex(self) -> str:
        return self.digest.hexdigest()


def _feed(ranges: list[_Range], blocks: Iterable, at: int = 0) -> None:
    for block in blocks:
        for r in ranges:
            r.feed(block, at)
        at += len(block)


def _blocks(path: Path, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
    """The file's bytes in [start, end) as views of one reused buffer (use each before taking the next)."""
    with open(path, "rb", buffering=0) as f:
        span = (os.fstat(f.fileno()).st_size if end is None else end) - start
        size = min(CHUNK, max(span, 1))  # a small file (an image, a caption) gets a small buffer
        view = memoryview(bytearray(size))
        f.seek(start)
        pos = start
        while end is None or pos < end:
            want = size if end is None else min(size, end - pos)
            n = f.readinto(view[:want])
            if not n:
                return
            pos += n
            yield view[:n]


def _tensor_offset(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(16)
    return tensor_data_offset(head, os.stat(path).st_size)


def _files(path: Path) -> list[Path]:
    return folder_files(path) if path.is_dir() else [path]


def folder_files(folder: Path) -> list[Path]:
    """Every file under a folder, sorted by path: the order a folder is hashed in."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def hash_stream(files: list[Path], weight_file: Path | None = None) -> Hashes:
    """sha256 of ``files`` as one stream, AutoV1 / AutoV3 of ``weight_file`` (default: the first), in one
    read of each file."""
    weight_file = weight_file or files[0]
    whole, window, tail = _Range(0), _Range(AUTOV1_START, AUTOV1_END), None
    for path in files:
        ranges = [whole]  # [0, end): offsets restart with each file, the whole range does not mind
        if path == weight_file:
            offset = _tensor_offset(path)
            tail = _Range(offset) if offset is not None else None
            ranges += [window] + ([tail] if tail else [])
        _feed(ranges, _blocks(path))
    return Hashes(whole.hex(), window.hex()[:8], tail.hex() if tail else None)


def hash_file(path: str | os.PathLike) -> Hashes:
    """sha256, AutoV1 and AutoV3 of one file, in one read."""
    return hash_stream([Path(path)])


def hash_folder(folder: Path, weight_file: Path | None) -> Hashes:
    """A folder's hashes: sha256 of every file under it (:func:`folder_files`), AutoV1 / AutoV3 of
    ``weight_file`` (else of its first file)."""
    files = folder_files(folder)
    if not files:
        return Hashes(hashlib.sha256().hexdigest(), EMPTY_AUTOV1, None)
    return hash_stream(files, weight_file if weight_file in files else files[0])


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files as one stream (:func:`folder_files`), 64 hex digits."""
    whole = _Range(0)
    for p in _files(Path(path)):
        _feed([whole], _blocks(p))
    return whole.hex()


def autov1(path: str | os.PathLike) -> str:
    """The AutoV1 of a file (8 hex digits); reads only its window. :data:`EMPTY_AUTOV1` for 1 MiB or less."""
    window = _Range(AUTOV1_START, AUTOV1_END)
    _feed([window], _blocks(Path(path), AUTOV1_START, AUTOV1_END), at=AUTOV1_START)
    return window.hex()[:8]


def tensor_sha256(path: str | os.PathLike) -> str | None:
    """The full AutoV3 digest of a file: sha256 of its bytes after the safetensors header (reads only
    those). None for a file that does not begin like safetensors."""
    path = Path(path)
    offset = _tensor_offset(path)
    if offset is None:
        return None
    tail = _Range(offset)
    _feed([tail], _blocks(path, offset), at=offset)
    return tail.hex()


# --------------------------------------------------------------------------------------------
# kohya's sshs_* hashes
# --------------------------------------------------------------------------------------------
def kohya_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata kohya serialises for its hashes: the ``ss_*`` keys only."""
    return {k: v for k, v in metadata.items() if k.startswith(KOHYA_PREFIX)}


def _kohya(blocks: Iterable, data_start: int) -> dict[str, str]:
    """sshs hashes of a serialisation given as consecutive ``blocks`` whose tensor data starts at ``data_start``."""
    model, legacy = _Range(data_start), _Range(AUTOV1_START, AUTOV1_END)
    _feed([model, legacy], blocks)
    return {"sshs_model_hash": model.hex(), "sshs_legacy_hash": legacy.hex()[:8]}


def kohya_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts' ``precalculate_safetensors_hashes``: the
    tensors serialised in memory with the ``ss_*`` metadata only, then hashed. (The legacy hash depends on
    that header's length: files written by a safetensors that did not pad the header to 8 bytes carry
    another one.)"""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, kohya_metadata(metadata))
    return _kohya([blob], 8 + header_length(blob))


def kohya_hashes_of_file(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """:func:`kohya_hashes` of a safetensors file's tensors with ``metadata`` (default: the file's own),
    streamed: the ``ss_*``-only header is built beside the file's data section, never the whole file in
    memory. The data section does not depend on the header, so it is hashed as it lies on disk."""
    path = Path(path)
    entries, own, n = read_safetensors_header(path)
    head = header_bytes(entries, kohya_metadata(own if metadata is None else metadata))
    return _kohya(chain([head], _blocks(path, 8 + n)), len(head))
