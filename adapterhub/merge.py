"""Bake adapters into a base model and save it (the service behind ``adapterhub merge``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.outputs import check_writable, write_failed
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


def check_target(out: Path) -> None:
    """Before any work: ``out`` can be written, and writing it destroys nothing of the user's. A single
    file is refused where a folder stands; a diffusers folder replaces only an earlier model (a folder
    with ``model_index.json``) or an empty folder, never some other folder of files."""
    if out.is_dir():
        if out.suffix.lower() == ".safetensors":
            raise AdapterhubError(f"--out {out}: is a folder; a single-file checkpoint cannot replace it "
                                  "(name a file, or a folder without the .safetensors suffix)")
        if not (out / "model_index.json").is_file() and any(out.iterdir()):
            raise AdapterhubError(f"--out {out}: is a folder of other files, not a diffusers model; "
                                  "refusing to replace it (name a new or empty folder)")
    check_writable(out)


def merge_files(base: str, specs, out: Path, dtype: str | None = None,
                progress=lambda message: None) -> MergeResult:
    """``specs``: ``(path, weight)`` pairs, or stack entries / a :class:`~adapterhub.stack.Stack` (separate
    text-encoder and UNet multipliers, block weights); applied as a stack in ``merge`` mode."""
    from adapterhub.base import load_base
    from adapterhub.checkpoint import save_pipeline
    from adapterhub.stack import Stack

    if dtype is not None and dtype not in DTYPES:
        raise AdapterhubError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_target(Path(out))
    start = time.perf_counter()
    stack = specs if isinstance(specs, Stack) else Stack(specs)
    progress(f"reading {len(stack)} adapter(s)")
    stack.load()
    if Path(out).suffix == ".safetensors":
        for entry in stack.entries:
            adapter = entry.adapter
            if not adapter.plugin.single_file_merge:
                raise AdapterError(adapter.path, f"a {adapter.type} cannot be baked into a single-file checkpoint "
                                                 "(its tokens need a tokenizer): write a diffusers folder instead")
    progress(f"loading base {base}")
    pipe = load_base(base)
    progress("merging")
    stack.apply(pipe, mode="merge")
    progress(f"writing {out}")
    try:
        save_pipeline(pipe, out, dtype=DTYPES[dtype] if dtype else None)
    except OSError as exc:  # a full disk, a read-only mount: the atomic write left the old output
        raise write_failed(out, exc) from None
    adapters = [entry.summary() for entry in stack.entries]
    return MergeResult(Path(out), base, adapters, time.perf_counter() - start)
