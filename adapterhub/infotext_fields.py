"""The values an adapter type puts in an image's webui infotext (``AdapterType.infotext_fields``).

Core, below the plugins: the hash-list entries (``Lora hashes``, ``TI hashes``) and the sd-webui-controlnet
unit (``ControlNetUnit.serialize``: ``Field: value, …`` with ``Module``, ``Model`` as ``name [hash]``,
``Weight``, ``Resize Mode``, ``Guidance Start``, ``Guidance End``, ``Pixel Perfect``, ``Control Mode``) that a
type returns for a stack entry. The sampling service (:mod:`adapterhub.sample.infotext`) joins, numbers, writes
and parses the whole text.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from adapterhub import hashes

CONTROL_FIELD = "ControlNet"  # the extension's units: ``ControlNet 0``, ``ControlNet 1`` ...
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def lora_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """``Lora hashes`` entry: ``sshs_model_hash`` from kohya metadata, else the addnet hash (AutoV3) of a
    ``.safetensors`` file, else the sha256 of the file; 12 hex digits."""
    if metadata and metadata.get("sshs_model_hash"):
        return str(metadata["sshs_model_hash"])[:12]
    path = Path(path)
    tensors = hashes.tensor_sha256(path) if path.is_file() and path.suffix.lower() == ".safetensors" else None
    return (tensors or hashes.sha256_file(path))[:12]


def embedding_hash(path: str | Path) -> str:
    """``TI hashes`` entry: sha256 of the embedding file, 12 hex digits."""
    return hashes.sha256_file(path)[:12]


def short_hash(path: str | Path) -> str:
    """The webui's old ``sd_models.model_hash`` (8 hex digits of the sha256 of the 64 KiB at 1 MiB),
    which the ControlNet extension puts after a model's name. For a diffusers folder: of its
    largest weights file."""
    path = Path(path)
    if path.is_dir():
        weights = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
        if not weights:
            return "NOFILE"
        path = max(weights, key=lambda p: (p.stat().st_size, str(p)))
    return hashes.autov1(path)


def unit_number(value: float) -> str:
    """A unit's number as the extension writes it (``str(float)``: ``1.0``, ``0.25``)."""
    return str(float(value))


def control_unit(entry, adapter, guess: bool | None = None) -> str:
    """A stack entry of a conditioning type (a residual network fed with an image: ControlNet, T2I-Adapter) as
    the extension writes its unit's value; ``guess``: the options' ``guess_mode`` unless given (a type that
    knows better, from the network's config, passes it). No preprocessor runs on a stack entry, so ``Module``
    is ``none`` (the extension fills its defaults for the preprocessor's fields when it reads such a unit)."""
    path = Path(entry.path or adapter.path)
    name = (path.stem if path.suffix.lower() in WEIGHT_SUFFIXES else path.name).translate(
        str.maketrans("", "", ":,"))
    options = entry.options
    if guess is None:
        guess = options.get("guess_mode")
    fields = {"Module": "none", "Model": f"{name} [{short_hash(path)}]", "Weight": unit_number(entry.weight),
              "Resize Mode": "Just Resize", "Guidance Start": unit_number(options.get("start", 0.0)),
              "Guidance End": unit_number(options.get("end", 1.0)), "Pixel Perfect": "False",
              "Control Mode": "ControlNet is more important" if guess else "Balanced"}
    return ", ".join(f"{key}: {value}" for key, value in fields.items())
