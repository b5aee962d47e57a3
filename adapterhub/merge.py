"""Bake adapters into a base model and save it (the service behind ``adapterhub merge``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.api import load
from adapterhub.errors import AdapterhubError
from adapterhub.types import Adapter
from adapterhub.weights import merge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergeResult:
    out: Path
    base: str
    adapters: list[dict]
    seconds: float

    def as_dict(self) -> dict:
        return {"out": str(self.out), "base": self.base, "adapters": self.adapters, "seconds": round(self.seconds, 3)}


def merge_adapters(pipe, entries: list[tuple[Adapter, float]]) -> None:
    """Weight-space adapters go through the engine together (all validated before the first change);
    the other types bake themselves in through their plugin afterwards."""
    merge(pipe, [(a, w) for a, w in entries if a.plugin.weight_space])
    for adapter, weight in entries:
        if not adapter.plugin.weight_space:
            adapter.merge_into(pipe, weight)


def merge_files(base: str, specs: list[tuple[Path, float]], out: Path, dtype: str | None = None,
                progress=lambda message: None) -> MergeResult:
    from adapterhub.base import load_base
    from adapterhub.checkpoint import save_pipeline

    if dtype is not None and dtype not in DTYPES:
        raise AdapterhubError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    progress(f"reading {len(specs)} adapter(s)")
    entries = [(load(path), weight) for path, weight in specs]
    progress(f"loading base {base}")
    pipe = load_base(base)
    progress("merging")
    merge_adapters(pipe, entries)
    progress(f"writing {out}")
    save_pipeline(pipe, out, dtype=DTYPES[dtype] if dtype else None)
    adapters = [{"path": str(a.path), "type": a.type, "format": a.format, "weight": w, "targets": len(a.patches)}
                for a, w in entries]
    return MergeResult(Path(out), base, adapters, time.perf_counter() - start)
