"""Reading adapter files from strangers, safely.

* safetensors: the header (8-byte little-endian length + JSON) is read and validated by hand, with a
  size cap, before anything else touches the file; tensors are then read lazily with ``safe_open``.
* pickles (``.pt``, ``.bin``, ``.ckpt``, ``.pth``): ``torch.load(weights_only=True)`` only. A pickle that
  needs code is refused, never executed. The work is bounded before and after loading
  (:mod:`adapterhub.pickle_bounds`): a torch zip's records against the storage its pickle claims, before
  anything is inflated; the loaded object, measured once per shared object, for expansion, depth, loops.
* anything else is named for what it is (text, an HTML page, a Git LFS pointer, random bytes).
* folders (diffusers / PEFT output): the weight file inside is opened, its JSON config kept.

Writes are atomic: :func:`atomic_write` writes a temp file beside the target and renames it.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from adapterhub.errors import AdapterError
from adapterhub.pickle_bounds import (check_pickle_structure, check_torch_zip, is_count, unpickling_problem,
                                      zip_like)

if TYPE_CHECKING:  # torch is imported where tensors are touched, so that reading headers stays light
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_BLOCK = 16 << 20  # data sections are copied in blocks this size
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

_ST_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


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
    data_offsets: dict[str, tuple[int, int]] | None = field(default=None, repr=False)  # safetensors: key -> bytes
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # plugins' per-file scratch
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise AdapterError(self.path, "no such tensor", key)
        return self.tensors([key])[key]

    def tensors(self, keys=None) -> dict[str, torch.Tensor]:
        keys = list(self.keys) if keys is None else list(keys)
        if self._tensors is None and not _utf8_name(self.weight_file):
            self._tensors = _read_all_safetensors(self.path, self.weight_file)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.weight_file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file
            raise AdapterError(self.path, f"cannot read tensors: {exc}", keys[0] if len(keys) == 1 else None) from None

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def data_offset(self) -> int:
        """Byte offset where tensor data starts (safetensors), for hashing the tensors only."""
        return 8 + self.header_bytes if self.container == "safetensors" else 0


def _utf8_name(path: Path | None) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_all_safetensors(shown: Path, path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a file whose name is not UTF-8 (bytes on a Linux disk): safetensors' ``safe_open``
    takes only UTF-8 paths, so the bytes are read here and parsed from memory."""
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file
        raise AdapterError(shown, f"cannot read tensors: {exc}") from None


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
def header_length(head: bytes) -> int:
    """The length a safetensors file gives its JSON header: its first 8 bytes, an unsigned little-endian
    integer. The one place that length is parsed."""
    return struct.unpack("<Q", head[:8])[0]


def tensor_data_offset(head: bytes, size: int) -> int | None:
    """Where a safetensors file's tensor bytes start (8 + its header length), from its first 9 bytes and its
    size; None when it does not begin like one (a pickle, text) or its header runs past the end. The light
    check hashing needs; :func:`read_safetensors_header` is the one that validates."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    end = 8 + header_length(head)
    return end if end <= size else None


def header_bytes(entries: dict, metadata: dict[str, str] | None) -> bytes:
    """Length prefix + JSON header as safetensors serialises it (compact, UTF-8, padded with spaces to a
    multiple of 8); key order aside (the library's metadata order is a hash map's), byte for byte."""
    head = {"__metadata__": metadata, **entries} if metadata is not None else dict(entries)
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def rewrite_metadata(source: Path, target: Path, metadata: dict[str, str]) -> Path:
    """``source``'s tensors under new ``metadata``, written to ``target`` (which may be ``source``) atomically.
    The data section is copied in blocks, unchanged: a checkpoint never sits in memory, and the AutoV3 of the
    result is the source's."""
    entries, _, n = read_safetensors_header(Path(source))
    with atomic_path(target, suffix=".safetensors") as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            out.write(header_bytes(entries, metadata))
            src.seek(8 + n)
            shutil.copyfileobj(src, out, COPY_BLOCK)
    return Path(target)


def read_safetensors_header(path: Path, cap: int | None = None) -> tuple[dict, dict, int]:
    """Return (tensor entries, metadata, header length), validated against the file size.

    Every entry is checked for the JSON types the format requires (``dtype`` a known string, ``shape`` a
    list of non-negative integers, ``data_offsets`` two ascending ones matching the shape); anything
    else is an :class:`AdapterError` naming the file and the key. A file that is not safetensors at all
    is described (text, an HTML page, a Git LFS pointer ...), not measured against the header cap."""
    cap = MAX_HEADER_BYTES if cap is None else cap
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 8:
            raise AdapterError(path, f"not a safetensors file: only {size} bytes")
        n = header_length(head)
        if head[8:9] != b"{" and not _plausible_header_length(n, size, cap):
            raise AdapterError(path, _not_this_format(head, "safetensors file"))
        if n > cap:
            raise AdapterError(path, f"safetensors header of {n} bytes exceeds the {cap}-byte cap")
        if n > size - 8:
            raise AdapterError(path, f"truncated or not safetensors: header claims {n} bytes, file has {size}")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else "not JSON"
        raise AdapterError(path, f"corrupt safetensors header: {reason} ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise AdapterError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError(path, "corrupt safetensors header: __metadata__ is not an object")
    data_len = size - 8 - n
    for key, entry in header.items():
        _check_header_entry(path, key, entry, data_len, size)
    return header, {str(k): str(v) for k, v in metadata.items()}, n


def _plausible_header_length(n: int, size: int, cap: int) -> bool:
    return 2 <= n <= min(cap, size - 8)


def _brief(value: Any) -> str:
    """A JSON value as the header has it, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "\u2026"


def _check_header_entry(path: Path, key: str, entry: Any, data_len: int, size: int) -> None:
    """One tensor entry of a safetensors header: the JSON types, the offsets and the size, or one line."""
    def corrupt(problem: str) -> AdapterError:
        return AdapterError(path, f"corrupt safetensors header: {problem}", key)

    if not isinstance(entry, dict):
        raise corrupt(f"the entry {_brief(entry)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise corrupt(f"dtype {_brief(dtype)} is not a string")
    if dtype not in _ST_ITEMSIZE:
        raise corrupt(f"unknown dtype {_brief(dtype)}")
    if not isinstance(shape, list) or not all(is_count(s) for s in shape):
        raise corrupt(f"shape {_brief(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise corrupt(f"data_offsets {_brief(offsets)} is not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise corrupt(f"data_offsets [{begin}, {end}] run backwards")
    if end > data_len:
        raise AdapterError(path, f"truncated: tensor data ends at byte {size - data_len + end}, "
                                 f"file has {size}", key)
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * _ST_ITEMSIZE[dtype]:
        raise corrupt("tensor size does not match its shape")


def _open_safetensors(path: Path) -> AdapterFile:
    header, metadata, n = read_safetensors_header(path)
    keys = {k: TensorInfo(tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
    return AdapterFile(path=path, container="safetensors", keys=keys, metadata=metadata, weight_file=path,
                       header_bytes=n, data_offsets={k: tuple(v["data_offsets"]) for k, v in header.items()})


# NaN / infinity by bit pattern: the raw integer type of each float dtype, and the (mask, pattern) that marks
# a value NaN or infinite (all exponent bits set; the float8 formats without infinity have one NaN pattern)
_ST_NONFINITE = {"F64": ("<u8", 0x7FF0000000000000, 0x7FF0000000000000), "F32": ("<u4", 0x7F800000, 0x7F800000),
                 "F16": ("<u2", 0x7C00, 0x7C00), "BF16": ("<u2", 0x7F80, 0x7F80), "F8_E5M2": ("u1", 0x7C, 0x7C),
                 "F8_E4M3": ("u1", 0x7F, 0x7F), "F8_E8M0": ("u1", 0xFF, 0xFF)}
_ST_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
              "U64": "<Q", "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?"}


def _scalar(dtype: str, raw: bytes) -> float | int | bool:
    """One value from its little-endian bytes, as torch's ``item()`` gives it."""
    if dtype in _ST_SCALAR:
        return struct.unpack(_ST_SCALAR[dtype], raw)[0]
    if dtype == "BF16":  # the upper half of a float32
        return struct.unpack("<f", b"\0\0" + raw)[0]
    if dtype == "F8_E5M2":  # the upper byte of a float16
        return struct.unpack("<e", b"\0" + raw)[0]
    b = raw[0]
    if dtype == "F8_E8M0":  # a power of two, 0xFF NaN
        return math.nan if b == 0xFF else 2.0 ** (b - 127)
    sign, exponent, mantissa = -1.0 if b & 0x80 else 1.0, (b >> 3) & 0xF, b & 7  # F8_E4M3 (fn): no infinity
    if exponent == 0xF and mantissa == 7:
        return math.nan
    return sign * (mantissa / 8 * 2.0 ** -6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))


def _float32(value: float | int | bool) -> float:
    """``value`` rounded to float32, as torch's ``.float()`` rounds it (beyond its range: infinite)."""
    try:
        return struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


class _MappedFile:
    """A file's bytes, memory-mapped read-only on first use and shared by its :class:`StoredTensor` s (one
    mapping per file, not one per tensor: a file holds thousands)."""

    def __init__(self, path: Path):
        self.path, self._bytes = path, None

    def bytes(self):
        if self._bytes is None:
            import numpy as np

            self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._bytes


class StoredTensor:
    """One tensor of a safetensors file, known by its header entry and read from disk only on request,
    without torch: its shape, ``dim()`` and ``numel()`` as a torch tensor has them, ``item()`` of a
    one-element tensor (its few bytes read directly), ``float().item()`` rounded to float32 as torch's is,
    and :meth:`nonfinite`, the count of NaN / infinite values (by bit pattern, numpy over the mapped bytes).
    What ``adapterhub inspect`` parses a safetensors file with (:func:`stored_view`)."""

    def __init__(self, source: _MappedFile, key: str, info: TensorInfo, start: int, end: int,
                 as_float32: bool = False):
        self.source, self.key, self.info, self.start, self.end = source, key, info, start, end
        self.as_float32 = as_float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def dim(self) -> int:
        return len(self.info.shape)

    def numel(self) -> int:
        return self.info.numel

    def is_floating_point(self) -> bool:
        return self.info.dtype in _ST_NONFINITE

    def float(self) -> StoredTensor:
        """The values as float32: ``item()`` then rounds to float32."""
        return StoredTensor(self.source, self.key, self.info, self.start, self.end, as_float32=True)

    def item(self) -> float | int | bool:
        """The one value of a one-element tensor."""
        if self.info.numel != 1:
            raise ValueError(f"{self.key}: item() of a tensor of {self.info.numel} values")
        value = _scalar(self.info.dtype, self.source.bytes()[self.start:self.end].tobytes())
        return _float32(value) if self.as_float32 else value

    def nonfinite(self) -> int:
        """How many values are NaN or infinite (none in an integer tensor)."""
        if self.info.dtype not in _ST_NONFINITE or self.info.numel == 0:
            return 0
        import numpy as np

        raw_type, mask, pattern = _ST_NONFINITE[self.info.dtype]
        bits = self.source.bytes()[self.start:self.end].view(np.dtype(raw_type))
        return int(np.count_nonzero((bits & mask) == pattern))


def _back_to_back(offsets, data_len: int) -> bool:
    """Whether the tensors' byte ranges fill the data section exactly, one after another (what the
    safetensors library requires before it reads any tensor)."""
    end = 0
    for begin, stop in sorted(offsets):
        if begin != end:
            return False
        end = stop
    return end == data_len


def stored_view(file: AdapterFile) -> AdapterFile:
    """A copy of a safetensors ``file`` whose ``tensors()`` are :class:`StoredTensor` s: a type's ``parse``
    describes the file from them (shapes, scalars, NaN counts) without torch and without reading the
    factors into memory. Other files come back as they are."""
    import dataclasses

    offsets = file.data_offsets
    if file.container != "safetensors" or file._tensors is not None or offsets is None \
            or not _back_to_back(offsets.values(), file.weight_file.stat().st_size - file.data_offset()):
        return file  # a layout the safetensors library refuses: reading the tensors says so, as before
    base, source = file.data_offset(), _MappedFile(file.weight_file)
    tensors = {k: StoredTensor(source, k, info, base + offsets[k][0], base + offsets[k][1])
               for k, info in file.keys.items()}
    return dataclasses.replace(file, _tensors=tensors)


# --------------------------------------------------------------------------------------------
# pickles
# --------------------------------------------------------------------------------------------
def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, its work bounded: a torch zip is checked before torch
    reads it (:func:`check_torch_zip`), the loaded object after (:func:`check_pickle_structure`).
    A pickle that needs code is refused by name; torch's warnings and its advice to allow-list globals
    (wrong advice for files from strangers) are not passed on."""
    import torch

    if path.stat().st_size == 0:
        raise AdapterError(path, "empty file")
    if zip_like(path):
        check_torch_zip(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices would print before the error line
            # a file object: torch.load must not pick a reader by the name's suffix
            raw = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterError(path, unpickling_problem(path, str(exc))) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError, MemoryError,
            OverflowError) as exc:
        lines = str(exc).strip().splitlines()
        msg = lines[0] if lines else exc.__class__.__name__
        raise AdapterError(path, f"corrupt or truncated pickle: {msg[:200]}") from None
    check_pickle_structure(path, raw)
    return raw


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
    """"safetensors", "pickle" or "unknown", by the content; the suffix only breaks a tie."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: a header length whose low byte is 0x80 looks like a pickle's first byte
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and len(head) >= 8 \
            and _plausible_header_length(header_length(head), size, MAX_HEADER_BYTES):
        return "safetensors"  # a header that is not JSON, in a file that is safetensors by name and length
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"  # a torch zip, or a protocol 2-5 pickle (torch's legacy format is protocol 2)
    return "unknown"


_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x1f\x8b": "gzip-compressed data",
          b"GGUF": "a GGUF model file", b"7z\xbc\xaf": "a 7-Zip archive", b"Rar!": "a RAR archive"}


def _not_this_format(head: bytes, expected: str) -> str:
    """What a file that is neither safetensors nor a torch pickle is, from its first bytes, in one line."""
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return "a Git LFS pointer, not the weights: fetch the file with git lfs"
    text = _as_text(head)
    if text is not None and text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return f"not a {expected}: an HTML page (a web page saved in place of the download)"
    if text is not None:
        first = text.strip().splitlines()[0] if text.strip() else ""
        shown = first[:24] + ("\u2026" if len(first) > 24 or len(text.strip().splitlines()) > 1 else "")
        return f"not a {expected}: starts with text {shown!r}"
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return f"not a {expected}: {what}"
    return f"not a {expected}: starts with bytes {head[:8].hex(' ')}"


def _as_text(head: bytes) -> str | None:
    """``head`` as text if it is printable UTF-8 (a character cut at the end forgiven), else ``None``."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    return text if text and all(c.isprintable() or c in "\t\r\n" for c in text) else None


def _expected_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors file"
    if suffix in PICKLE_SUFFIXES:
        return "torch pickle"
    return "safetensors file or a torch pickle"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


COMPONENT_FOLDERS = ("unet", "text_encoder", "text_encoder_2", "transformer")  # transformer: Flux / SD3


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
    """Open an adapter file or folder, reading only headers (safetensors) or the weights-only pickle.

    Any problem, a file the system will not let us read included, is one :class:`AdapterError` line."""
    path = Path(path)
    try:
        return _open_adapter_file(path)
    except OSError as exc:
        raise AdapterError(path, f"cannot read: {exc.strerror or exc}") from None


def _open_adapter_file(path: Path) -> AdapterFile:
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
        with open(weight_file, "rb") as f:
            raise AdapterError(path, _not_this_format(f.read(64), _expected_format(weight_file)))
    af.path = path
    af.config = config
    return af


# --------------------------------------------------------------------------------------------
# layouts of other tools that no plugin reads, named in the refusal
# --------------------------------------------------------------------------------------------
_CLONEOFSIMO_KEY = re.compile(r"^[A-Za-z_]\w*:\d+:(up|down)$")


def foreign_layout(file: AdapterFile) -> str | None:
    """The refusal for a known layout that no registered type reads, or ``None``.

    cloneofsimo's lora_diffusion wrote two: ``save_safeloras_with_embeds`` names tensors by position,
    ``<model>:<i>:up`` / ``<model>:<i>:down`` (the model's targets as JSON metadata under its name, token
    embeddings flagged ``<embed>``), and ``save_lora_weight`` pickles a bare list ``[up, down, up, ...]``.
    Neither names the modules: only lora_diffusion's own injection order puts them back."""
    if any(_CLONEOFSIMO_KEY.match(k) for k in file.keys):
        return ("a cloneofsimo lora_diffusion LoRA (positional keys such as unet:0:up): not supported, its "
                "keys do not name the modules they change")
    if isinstance(file.raw, (list, tuple)) and _up_down_pairs(file.raw):
        return ("a cloneofsimo lora_diffusion LoRA (a bare list of up/down tensors): not supported, it does "
                "not name the modules it changes")
    return None


def _up_down_pairs(items) -> bool:
    import torch

    if len(items) < 2 or len(items) % 2 or not all(isinstance(t, torch.Tensor) for t in items):
        return False
    pairs = zip(items[::2], items[1::2])
    return all(up.dim() in (2, 4) and up.dim() == down.dim() and up.shape[1] == down.shape[0] for up, down in pairs)


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it over ``target`` only if the block succeeds, with
    the mode a new file gets under the umask (``0o666 & ~umask``), whatever the writer left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and a writer may recreate the file (safetensors' save_file does, 0600
        # again): the mode is set once the block is done, so a saved file gets the umask's usual mode
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
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
    """Yield a temp folder beside ``target``; it replaces ``target`` (a folder, or a file) only if the
    block succeeds, and nothing of the old ``target`` is left beside it."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)  # a file or a folder: what was there before may have been either
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (contiguous CPU tensors, string metadata)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(clean, str(tmp), metadata=meta)
    return Path(path)
