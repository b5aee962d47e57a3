"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint at step N is two things beside the output file ``NAME.safetensors``:

* ``NAME-stepNNNNNN.safetensors``: the adapter at step N, loadable like the final one;
* ``NAME-stepNNNNNN-state/``: ``config.json`` (the whole configuration), ``trainable.safetensors`` (the
  trained tensors), ``state.pt`` (optimizer, scheduler, the random generators, the data position, the
  loss history, the EMA weights), written as one folder renamed into place, so a killed write leaves
  the previous checkpoint and no partial one.

``state.pt`` holds only tensors and plain Python values and is read with ``weights_only=True``.

When a save into the output folder fails (a full disk, a folder made read-only during the run), the run
is not lost: the same checkpoint goes to a fallback folder, :func:`rescue_folders` (the first that takes
it), and the error names it so that ``--resume`` continues from there with a new ``--out``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.io import atomic_dir, safe_torch_load, save_safetensors

STATE_SUFFIX = "-state"


def checkpoint_paths(out: Path, step: int) -> tuple[Path, Path]:
    out = Path(out)
    stem = f"{out.stem}-step{step:06d}"
    return out.with_name(stem + out.suffix), out.with_name(stem + STATE_SUFFIX)


def write_state(state_dir: Path, config: dict, trained: dict[str, torch.Tensor], state: dict) -> Path:
    with atomic_dir(state_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        save_safetensors(trained, tmp / "trainable.safetensors", {"format": "adapterhub-train-state-1"})
        torch.save(state, str(tmp / "state.pt"))
    return Path(state_dir)


# what ``state.pt`` holds (see :meth:`adapterhub.train.loop.Trainer.checkpoint`)
STATE_KEYS = ("step", "micro", "history", "optimizer", "scheduler", "rng", "started", "session_id")


def read_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and the loop state of a checkpoint folder.

    Raises :class:`AdapterhubError` naming the file for a missing, truncated or foreign part (whether the
    tensors fit the adapter being trained is checked when they are restored)."""
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    need = [state_dir / n for n in ("config.json", "trainable.safetensors", "state.pt")]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise AdapterhubError(f"{state_dir}: not a complete training checkpoint (missing {', '.join(missing)})")
    try:
        trained = load_file(str(need[1]))
    except Exception as exc:  # safetensors' SafetensorError: a cut or overwritten file
        raise AdapterError(need[1], f"corrupt or truncated: {_first_line(exc)}") from None
    state = safe_torch_load(need[2])
    absent = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if absent:
        raise AdapterError(need[2], f"not the state of an adapterhub training run (no {', '.join(absent)})")
    return trained, state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else exc.__class__.__name__


def rescue_folders(out: Path) -> list[Path]:
    """Where a run's checkpoint goes when the output folder cannot take it, in the order tried: a new
    folder under ``$ADAPTERHUB_CACHE/rescued`` (``~/.cache/adapterhub``, most often another disk than the
    outputs), else under the system's temporary folder (``$TMPDIR`` or /tmp) ``/adapterhub-rescued``."""
    from adapterhub.base import cache_dir

    name = f"{Path(out).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return [cache_dir() / "rescued" / name, Path(tempfile.gettempdir()) / "adapterhub-rescued" / name]


def prune(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` numbered checkpoints of ``out`` (adapter file and state)."""
    out = Path(out)
    pattern = re.compile(re.escape(out.stem) + r"-step(\d{6})" + re.escape(STATE_SUFFIX) + "$")
    steps = sorted(int(m.group(1)) for p in out.parent.iterdir() if (m := pattern.match(p.name)) and p.is_dir())
    removed = []
    for step in steps[:-keep] if keep else []:
        adapter, state_dir = checkpoint_paths(out, step)
        if adapter.is_dir():  # a diffusers-folder output (ControlNet, T2I-Adapter, full)
            shutil.rmtree(adapter, ignore_errors=True)
        else:
            adapter.unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        removed += [adapter, state_dir]
    return removed


def rng_state(noise: torch.Generator, captions) -> dict:
    state = {"noise": noise.get_state(), "captions": captions.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, noise: torch.Generator, captions) -> None:
    noise.set_state(state["noise"])
    version, internal, gauss = state["captions"]
    captions.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
