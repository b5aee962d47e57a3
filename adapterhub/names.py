"""The one rule for naming adapters: a path, a catalog name or hash prefix, and ``FILE[:WEIGHT]`` specs.

Used by the CLI and by services (the Stack); it sits below both."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from adapterhub.errors import AdapterhubError


def resolve_adapter(arg: str) -> Path:
    """A path as given, or a catalog name / hash prefix when the catalog is installed."""
    path = Path(arg)
    if path.exists():
        return path
    if importlib.util.find_spec("adapterhub.catalog") is not None:
        from adapterhub.catalog import resolve_adapter_arg

        return Path(resolve_adapter_arg(arg))
    raise AdapterhubError(f"{arg}: no such file or folder")


def split_weight(spec: str, default: float = 1.0) -> tuple[str, float]:
    """``style.safetensors:0.8`` -> (``style.safetensors``, 0.8); a colon in a path is kept."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            if Path(spec).exists() or not Path(head).exists():
                return spec, default
            raise AdapterhubError(f"{spec}: weight {tail!r} is not a number") from None
    return spec, default
