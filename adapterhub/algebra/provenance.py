"""Metadata of the algebra's outputs: what is kept from the sources, what is added, the kohya hashes.

* Kept: every metadata key on which all sources agree (one source: all of it, as kohya's resize),
  except the hashes (recomputed) and the network shape keys (rewritten).
* Rewritten: ``ss_network_module`` (``networks.lora``), ``ss_network_dim`` / ``ss_network_alpha``
  (the value, or ``Dynamic`` when modules differ), ``ss_network_args`` (``conv_dim`` / ``conv_alpha``
  when 3x3 convs are written; a LyCORIS ``algo`` no longer applies), ``ss_training_comment``
  (prefixed, as kohya's resize does).
* Added: ``adapterhub.sources`` (JSON list of ``{file, sha256, weight}``, with a source's own
  ``adapterhub.method`` / ``adapterhub.sources`` nested so a chain of edits stays traceable),
  ``adapterhub.method`` and ``adapterhub.params`` (JSON of the options).
* ``sshs_model_hash`` / ``sshs_legacy_hash`` as sd-scripts ``precalculate_safetensors_hashes``
  (:func:`adapterhub.hashes.kohya_hashes`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterhub import hashes
from adapterhub.io import atomic_path, read_safetensors_header, rewrite_metadata
from adapterhub.types import Adapter

STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
REWRITTEN = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
             "adapterhub.sources", "adapterhub.method", "adapterhub.params")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's names


def agreed(metadatas: list[dict[str, str]]) -> dict[str, str]:
    """The keys every source has with the same value, less the stale and rewritten ones."""
    if not metadatas:
        return {}
    first, rest = metadatas[0], metadatas[1:]
    return {k: v for k, v in first.items()
            if k not in STALE and k not in REWRITTEN and all(m.get(k) == v for m in rest)}


def file_sha256(path) -> str | None:
    if path is None or not Path(path).exists():
        return None
    return hashes.sha256_file(path)


def source_entry(path, weight: float | None = None, metadata: dict | None = None, **extra) -> dict:
    """One ``adapterhub.sources`` entry; a source's own provenance is nested, never dropped."""
    entry = {"file": str(path) if path is not None else None, "sha256": file_sha256(path)}
    if weight is not None:
        entry["weight"] = weight
    entry.update(extra)
    metadata = metadata or {}
    if metadata.get("sshs_model_hash"):
        entry["sshs_model_hash"] = metadata["sshs_model_hash"]
    if metadata.get("adapterhub.method"):
        entry["method"] = metadata["adapterhub.method"]
    if metadata.get("adapterhub.sources"):
        try:
            entry["sources"] = json.loads(metadata["adapterhub.sources"])
        except json.JSONDecodeError:
            entry["sources"] = metadata["adapterhub.sources"]
    return entry


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def network_metadata(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], dynamic: bool) -> dict[str, str]:
    """``ss_network_*`` for the written factors; 3x3 convs are described in ``ss_network_args``."""
    linear = [(down.shape[0], alpha) for up, down, alpha in factors.values() if not _kxk(down)]
    conv = [(down.shape[0], alpha) for up, down, alpha in factors.values() if _kxk(down)]
    main = linear or conv

    def one(values, as_float=False):
        values = set(values)
        if dynamic or len(values) != 1:
            return "Dynamic"
        value = values.pop()
        return str(float(value)) if as_float else _number(value)

    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": one(r for r, _ in main), "ss_network_alpha": one((a for _, a in main), True)}
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": one(r for r, _ in conv),
                                              "conv_alpha": one((a for _, a in conv), True)})
    return meta


def _kxk(down: torch.Tensor) -> bool:
    return down.dim() == 4 and down.shape[2] * down.shape[3] > 1


def build(kept: dict[str, str], factors, comment: str, method: str, sources: list[dict], params: dict,
          dynamic: bool = False) -> dict[str, str]:
    """The output's metadata: ``kept`` sources' keys, the network keys, the comment and provenance."""
    meta = dict(kept)
    old = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {old}" if old else comment
    meta.update(network_metadata(factors, dynamic))
    meta["adapterhub.method"] = method
    meta["adapterhub.sources"] = json.dumps(sources, ensure_ascii=False)
    meta["adapterhub.params"] = json.dumps({k: v for k, v in params.items() if v is not None}, ensure_ascii=False)
    return meta


def write(adapter: Adapter, out: Path) -> Path:
    """Save ``adapter`` in the kohya layout with its hashes stamped in; atomic (temp file + rename)."""
    out = Path(out)
    with atomic_path(out, suffix=".safetensors") as tmp:
        adapter.save(tmp, "kohya")
        _, metadata, _ = read_safetensors_header(tmp)
        metadata.update(hashes.kohya_hashes_of_file(tmp, metadata))
        rewrite_metadata(tmp, tmp, metadata)  # the tensors stay on disk: only the header is new
    return out
