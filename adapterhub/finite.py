"""NaN and infinity among an adapter's own numbers, found without importing torch.

:func:`nonfinite_parts` reads a patch's tensors whatever holds them: torch tensors (merging, attaching), or the
:class:`adapterhub.io.StoredTensor` s that ``inspect`` parses a safetensors file with (their values counted
on disk). The weight engine (:mod:`adapterhub.weights`) refuses what it finds; ``inspect`` reports it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover - types only
    from adapterhub.types import Patch

F32_MAX = 3.4028234663852886e38  # the largest finite float32 (torch.finfo(torch.float32).max)


def nonfinite_count(t: Any) -> int | None:
    """How many values of ``t`` are NaN or infinite; None when it holds no float values to check (an
    integer tensor, a shape-only ``meta`` tensor as the catalog parses files with)."""
    counter = getattr(t, "nonfinite", None)
    if callable(counter):  # a StoredTensor: counted on disk
        return counter()
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    tensor = getattr(torch, "Tensor", None)  # None too while torch is half imported
    if tensor is not None and isinstance(t, tensor) and t.is_floating_point() and t.device.type != "meta":
        if t.element_size() == 1:  # float8: torch has no isfinite for some; float32 holds every value exactly
            t = t.float()
        return int(t.numel() - torch.isfinite(t).sum())
    return None


def nonfinite_parts(patch: Patch) -> Iterator[tuple[str, str]]:
    """``(key, problem)`` for every NaN / Inf among a patch's own numbers: each tensor (named by its key
    in the file where the parser recorded it), then its alpha or scale (the engine uses it as a float32).
    One pass per tensor."""
    keys = getattr(patch, "file_keys", None) or {}
    tensors = patch.tensors if isinstance(patch.tensors, Mapping) else {}
    for role, t in tensors.items():
        bad = nonfinite_count(t)
        if bad:
            yield keys.get(role, f"{patch.source}.{role}"), f"{bad} of {t.numel()} values are NaN or infinite"
    for name in ("alpha", "scale"):
        value = getattr(patch, name, None)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and abs(value) <= F32_MAX):
            yield keys.get("alpha", patch.source), f"{name} {value:g} is not a finite float32 number"
            return
