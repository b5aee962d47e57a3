"""One file (or diffusers folder) in, one catalog entry out: identify, hash, describe, enrich.

Runs in the scan's worker processes, so it takes and returns plain picklable values. Identification
goes through the registered plugins on the file's header only (the safetensors JSON header, or the
``weights_only`` load of a pickle); a pickle that needs code is refused by :mod:`adapterhub.io`,
never executed. Nothing here raises for a bad file: the entry says why it is unreadable.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterError
from adapterhub.hashes import hash_file, hash_folder
from adapterhub.io import FOLDER_WEIGHT_FILES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

EXTRA_VALUE_CHARS = 2000


@dataclass(frozen=True)
class Job:
    """A file the scan wants examined. ``hashes`` are reused (not recomputed) when given."""

    path: str
    kind: str  # file | folder
    size: int
    mtime_ns: int
    sidecar_sig: str = ""
    hashes: dict | None = None
    sidecars: tuple[str, ...] | None = None  # names of the files beside it sharing its stem, if known


def looks_like_model(path: Path) -> bool:
    """Whether a file that no plugin recognised still looks like a model file worth recording
    (safetensors or pickle by its first bytes, or named like one) rather than a preview or a note."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES | {".gguf"}:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head[:4] in (b"PK\x03\x04", b"GGUF") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return True
    return len(head) >= 9 and head[8:9] == b"{"


def _weight_file(folder: Path) -> Path | None:
    return next((folder / n for n in FOLDER_WEIGHT_FILES if (folder / n).is_file()), None)


def _hashes(job: Job) -> dict:
    if job.hashes:
        return dict(job.hashes)
    path = Path(job.path)
    result = hash_folder(path, _weight_file(path)) if job.kind == "folder" else hash_file(path)
    return result.as_dict()


def _plain(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text[:EXTRA_VALUE_CHARS]


def _metadata(file) -> dict[str, str]:
    """Header metadata, plus a pickle's non-tensor values (name, step, sd_checkpoint ...)."""
    metadata = dict(file.metadata)
    for key, value in (file.extra or {}).items():
        if key and key != "__metadata__" and not key.startswith("__metadata__."):
            metadata.setdefault(key, _plain(value))
    return metadata


def shape_only(file):
    """A copy of a safetensors ``file`` whose tensors are shape-only (``meta``) but for the scalars
    (alphas), so that a plugin's ``parse`` describes it without reading the tensor bytes."""
    import dataclasses

    import torch

    if file.container != "safetensors" or file._tensors is not None:
        return file
    scalars = [k for k, info in file.keys.items() if info.numel <= 1]
    tensors = file.tensors(scalars) if scalars else {}
    for key, info in file.keys.items():
        if key not in tensors:
            tensors[key] = torch.empty(info.shape, device="meta")
    return dataclasses.replace(file, _tensors=tensors)


def _parse(adapter_type, sniff, file):
    """Parse shape-only first; a plugin whose parse needs real values gets the real file."""
    try:
        return adapter_type.parse(shape_only(file), sniff)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, IndexError):
        return adapter_type.parse(file, sniff)


def _describe(adapter_type, sniff, file) -> dict:
    """type, format, base, family, rank, alpha, targets: from the sniff's facts, else by parsing."""
    facts = dict(sniff.facts or {})
    out = {"type": adapter_type.name, "format": sniff.format, "base": facts.get("base"),
           "family": facts.get("family"), "rank": facts.get("rank"), "alpha": facts.get("alpha"),
           "targets": facts.get("targets")}
    if out["base"] is None or out["targets"] is None:
        adapter = _parse(adapter_type, sniff, file)
        info = adapter_type.info(adapter) or {}
        out.update(base=adapter.base, family=adapter.family, targets=len(adapter.patches))
        out["rank"] = out["rank"] if out["rank"] is not None else info.get("rank")
        out["alpha"] = out["alpha"] if out["alpha"] is not None else info.get("alpha")
    out["rank"] = int(out["rank"]) if isinstance(out["rank"], (int, float)) else None
    out["alpha"] = float(out["alpha"]) if isinstance(out["alpha"], (int, float)) else None
    return out


def _enrich(entry: dict, file) -> None:
    from adapterhub.plugins import manager

    try:
        manager().hook.adapterhub_enrich_catalog_entry(entry=entry, file=file)
    except Exception as exc:  # noqa: BLE001 - a broken enricher must not lose the file
        entry["warnings"].append(f"catalog enricher failed: {exc.__class__.__name__}: {exc}")


def _identify(entry: dict, path: Path) -> None:
    """Fill the identification fields, or status/error; never raises for a bad file."""
    from adapterhub.api import identify

    try:
        file, adapter_type, sniff = identify(path)
    except AdapterError as exc:
        entry.update(status="unreadable", error=exc.problem)
        return
    except Exception as exc:  # noqa: BLE001 - a plugin bug on one file must not stop a scan
        entry.update(status="unreadable", error=f"{exc.__class__.__name__}: {exc}"[:500])
        return
    entry.update(type=adapter_type.name, format=sniff.format, metadata=_metadata(file))
    try:
        entry.update(_describe(adapter_type, sniff, file))
    except Exception as exc:  # noqa: BLE001
        problem = exc.problem if isinstance(exc, AdapterError) else f"{exc.__class__.__name__}: {exc}"
        entry.update(status="unreadable", error=f"identified as {adapter_type.name}, but: {problem}"[:500])
        return
    _enrich(entry, file)


def examine(job: Job) -> dict:
    """The catalog entry for ``job`` (``entry["skip"]`` set when it is not an adapter at all)."""
    path = Path(job.path)
    entry: dict[str, Any] = {
        "path": job.path, "name": path.stem if job.kind == "file" else path.name, "kind": job.kind,
        "size": job.size, "mtime_ns": job.mtime_ns, "sidecar_sig": job.sidecar_sig, "status": "ok",
        "error": None, "type": None, "format": None, "base": None, "family": None, "rank": None,
        "alpha": None, "targets": None, "metadata": {}, "trigger_words": [], "training": {},
        "preview": None, "warnings": [], "skip": None,
        "sidecars": None if job.sidecars is None else list(job.sidecars),
    }
    _identify(entry, path)
    if entry["status"] != "ok" and not os.path.lexists(path):
        entry["skip"] = "vanished during the scan"
        return entry
    if entry["status"] != "ok" and job.kind == "file" and not looks_like_model(path):
        entry["skip"] = entry["error"]
        return entry
    try:
        entry.update(_hashes(job))
    except OSError as exc:
        entry.update(status="unreadable", error=f"cannot read: {exc.strerror or exc}",
                     sha256=None, autov1=None, autov2=None, autov3=None)
    return entry


def stat_of(path: Path, kind: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, or of a folder's files (total size, newest mtime)."""
    if kind == "file":
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    size = mtime = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime
