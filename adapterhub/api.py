"""Identify, load and inspect adapter files through the registered plugins."""
from __future__ import annotations

import os
from pathlib import Path

from adapterhub.errors import AdapterError
from adapterhub.hashes import sha256_file  # noqa: F401 - part of this module's API (inspect's sha256)
from adapterhub.io import AdapterFile, foreign_layout, open_adapter_file, stored_view
from adapterhub.plugins import adapter_types
from adapterhub.types import Adapter, AdapterType, Sniff


def sniff(file: AdapterFile) -> tuple[AdapterType, Sniff]:
    """Ask every registered type to score the file; the best score wins."""
    best: tuple[AdapterType, Sniff] | None = None
    for adapter_type in adapter_types().values():
        result = adapter_type.sniff(file)
        if result is not None and (best is None or result.score > best[1].score):
            best = (adapter_type, result)
    if best is None:
        if foreign_layout(file):
            raise AdapterError(file.path, foreign_layout(file))
        sample = ", ".join(list(file.keys)[:3]) or "no tensors"
        raise AdapterError(file.path, f"not a recognised adapter file (keys: {sample})")
    return best


def identify(path: str | os.PathLike) -> tuple[AdapterFile, AdapterType, Sniff]:
    """Open a file (headers only where possible) and name its type and layout."""
    file = open_adapter_file(path)
    adapter_type, result = sniff(file)
    return file, adapter_type, result


def load(path: str | os.PathLike) -> Adapter:
    """Open, identify and parse an adapter file into an :class:`Adapter`."""
    file, adapter_type, result = identify(path)
    adapter = adapter_type.parse(file, result)
    adapter.path = Path(path)
    adapter.file = file
    return adapter


def describe(path: str | os.PathLike) -> tuple[Adapter, dict]:
    """``(adapter, its type's info)`` for what :func:`inspect` shows. A safetensors file is parsed from its
    header (:func:`adapterhub.io.stored_view`: shapes, and the few values the facts need read from disk), so
    describing it imports no torch; a type whose parse or info computes with the tensors themselves (an
    embedding's vectors, a ControlNet's model) gets the file with its tensors read, as :func:`load` does."""
    file, adapter_type, result = identify(path)
    view = stored_view(file)
    if view is not file:
        try:
            return _described(adapter_type.parse(view, result), path, view)
        except (AttributeError, TypeError, NotImplementedError):  # the parse needs torch tensors
            pass
    return _described(adapter_type.parse(file, result), path, file)


def _described(adapter: Adapter, path, file: AdapterFile) -> tuple[Adapter, dict]:
    adapter.path, adapter.file = Path(path), file
    return adapter, adapter.info()


def inspect(path: str | os.PathLike, with_hash: bool = True) -> dict:
    """The facts ``adapterhub inspect`` prints: type, format, base, rank, alpha, targets, metadata..."""
    adapter, info = describe(path)
    facts = {
        "path": str(path),
        "name": adapter.name,
        "type": adapter.type,
        "format": adapter.format,
        "base": adapter.base,
        "family": adapter.family,
        "targets": len(adapter.patches),
    }
    facts.update(info)
    facts["metadata"] = adapter.metadata
    if with_hash:
        facts["sha256"] = sha256_file(path)
    return facts
