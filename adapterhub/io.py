"""Reading adapter files from strangers, safely.

* safetensors: the header (8-byte little-endian length + JSON) is read and validated by hand, with a
  size cap, before anything else touches the file; tensors are then read lazily with ``safe_open``.
* pickles (``.pt``, ``.bin``, ``.ckpt``, ``.pth``): ``torch.load(weights_only=True)`` only. A pickle that
  needs code is refused, never executed.
* folders (diffusers / PEFT output): the weight file inside is opened, its JSON config kept.

Writes are atomic: :func:`atomic_write` writes a temp file beside the target and renames it.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from adapterhub.errors import AdapterError

if TYPE_CHECKING:  # torch is imported where tensors are touched, so that reading headers stays light
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_SUFFIXES = {".safetensors", ".pti", ".sft"}
PICKLE_SUFFIXES = {".pt", ".bin", ".ckpt", ".pth"}
# Weight files looked for inside a folder, in order of preference.
FOLDER_WEIGHT_FILES = (
    "pytorch_lora_weights.safetensors", "adapter_model.safetensors", "learned_embeds.safetensors",
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "pytorch_lora_weights.bin", "adapter_model.bin", "learned_embeds.bin",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)
FOLDER_CONFIG_FILES = ("adapter_config.json", "config.json")

_ST_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, F16, BF16, ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_TORCH_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(name, name)


@dataclass
class AdapterFile:
    """One adapter on disk: its tensor keys, shapes, dtypes and metadata, tensors read on demand.

    ``extra`` holds the non-tensor values of a pickled dict (``name``, ``step``, ``layer_structure``
    ...), flattened with ``.``. ``raw`` is the unpickled object for pickles (``None`` for
    safetensors). ``config`` is the JSON config found beside or inside (PEFT ``adapter_config.json``,
    a diffusers ``config.json``).
    """

    path: Path
    container: str  # "safetensors" | "pickle"
    keys: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    raw: Any = None
    weight_file: Path | None = None
    header_bytes: int = 0
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # plugins' per-file scratch
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise AdapterError(self.path, "no such tensor", key)
        if self._tensors is not None:
            return self._tensors[key]
        from safetensors import safe_open

        try:
            with safe_open(str(self.weight_file), framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file
            raise AdapterError(self.path, f"cannot read tensor: {exc}", key) from None

    def tensors(self, keys=None) -> dict[str, torch.Tensor]:
        keys = list(self.keys) if keys is None else list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.weight_file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(self.path, f"cannot read tensors: {exc}") from None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def data_offset(self) -> int:
        """Byte offset where tensor data starts (safetensors), for hashing the tensors only."""
        return 8 + self.header_bytes if self.container == "safetensors" else 0


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
def read_safetensors_header(path: Path, cap: int | None = None) -> tuple[dict, dict, int]:
    """Return (tensor entries, metadata, header length), validated against the file size."""
    cap = MAX_HEADER_BYTES if cap is None else cap
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(path, f"not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > cap:
            raise AdapterError(path, f"safetensors header of {n} bytes exceeds the {cap}-byte cap")
        if n > size - 8:
            raise AdapterError(path, f"truncated or not safetensors: header claims {n} bytes, file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(path, f"corrupt safetensors header: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise AdapterError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError(path, "corrupt safetensors header: __metadata__ is not an object")
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(path, "corrupt safetensors header entry", key) from None
        if end > data_len:
            raise AdapterError(path, f"truncated: tensor data ends at byte {8 + n + end}, file has {size}", key)
        item = _ST_ITEMSIZE.get(dtype)
        numel = 1
        for s in shape:
            numel *= s
        if item is not None and end - begin != numel * item:
            raise AdapterError(path, "corrupt safetensors header: tensor size does not match its shape", key)
    return header, {str(k): str(v) for k, v in metadata.items()}, n


def _open_safetensors(path: Path) -> AdapterFile:
    header, metadata, n = read_safetensors_header(path)
    keys = {k: TensorInfo(tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
    return AdapterFile(path=path, container="safetensors", keys=keys, metadata=metadata,
                       weight_file=path, header_bytes=n)


# --------------------------------------------------------------------------------------------
# pickles
# --------------------------------------------------------------------------------------------
def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a pickle that needs code is refused by name."""
    import torch

    if path.stat().st_size == 0:
        raise AdapterError(path, "empty file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load must not pick a reader by the name's suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        detail = detail or (first[0] if first else "")
        raise AdapterError(path, f"refused: the pickle needs code to load (weights_only=True): {detail[:200]}") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise AdapterError(path, f"corrupt or truncated pickle: {msg[:200]}") from None


def _flatten(obj: Any, prefix: str, tensors: dict, extra: dict) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, extra)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), tensors, extra)
    else:
        extra[prefix] = obj


def _open_pickle(path: Path) -> AdapterFile:
    raw = safe_torch_load(path)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    _flatten(raw, "", tensors, extra)
    keys = {k: TensorInfo(tuple(t.shape), _dtype_name(t.dtype)) for k, t in tensors.items()}
    metadata = {}
    if isinstance(raw, dict) and isinstance(raw.get("__metadata__"), dict):
        metadata = {str(k): str(v) for k, v in raw["__metadata__"].items()}
    return AdapterFile(path=path, container="pickle", keys=keys, metadata=metadata, extra=extra,
                       raw=raw, weight_file=path, _tensors=tensors)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _sniff_container(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: a header length whose low byte is 0x80 looks like a pickle's first byte
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    return "unknown"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


COMPONENT_FOLDERS = ("unet", "text_encoder", "text_encoder_2")


def _open_component_folders(path: Path) -> AdapterFile:
    """A folder of PEFT adapters, one per pipeline component (``unet/``, ``text_encoder/`` ..., what
    ``adapterhub convert --to peft`` writes), opened as one file: keys ``<component>.<module>...`` (PEFT's
    ``base_model.model.`` dropped), each component's config under its prefix (as diffusers'
    ``lora_adapter_metadata``), ``extra["peft_components"]`` naming the folders."""
    keys: dict[str, TensorInfo] = {}
    tensors: dict[str, Any] = {}
    config: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    found = [c for c in COMPONENT_FOLDERS if (path / c).is_dir()]
    for component in found:
        part = open_adapter_file(path / component)
        for key, tensor in part.tensors().items():
            name = f"{component}.{key.removeprefix('base_model.model.')}"
            keys[name], tensors[name] = part.keys[key], tensor
        config.setdefault("peft_type", (part.config or {}).get("peft_type"))
        config.update({f"{component}.{k}": v for k, v in (part.config or {}).items()})
        metadata.update(part.metadata)
    return AdapterFile(path=path, container="safetensors", keys=keys, metadata=metadata, config=config,
                       extra={"peft_components": found}, _tensors=tensors)


def open_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Open an adapter file or folder, reading only headers (safetensors) or the weights-only pickle."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(path, "no such file or folder")
    config = None
    weight_file = path
    if path.is_dir():
        weight_file = next((path / n for n in FOLDER_WEIGHT_FILES if (path / n).is_file()), None)
        if weight_file is None and any((path / c / "adapter_config.json").is_file() for c in COMPONENT_FOLDERS):
            return _open_component_folders(path)
        if weight_file is None:
            raise AdapterError(path, "folder holds no known weight file "
                                     f"({', '.join(FOLDER_WEIGHT_FILES[:3])}, ...)")
        config = next((c for c in (_read_json(path / n) for n in FOLDER_CONFIG_FILES) if c), None)
    elif (path.parent / "adapter_config.json").is_file():
        config = _read_json(path.parent / "adapter_config.json")
    if weight_file.stat().st_size == 0:
        raise AdapterError(path, "empty file")
    container = _sniff_container(weight_file)
    if container == "safetensors":
        af = _open_safetensors(weight_file)
    elif container == "pickle":
        af = _open_pickle(weight_file)
    else:
        raise AdapterError(path, "not a safetensors file or a torch pickle")
    af.path = path
    af.config = config
    return af


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not safe to flip from threads


def _umask() -> int:
    return _UMASK


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; it replaces ``target`` only if the block succeeds."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (contiguous CPU tensors, string metadata)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(clean, str(tmp), metadata=meta)
    return Path(path)
