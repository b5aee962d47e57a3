"""Bounding the work of reading a torch pickle from a stranger, before and after ``torch.load``.

``torch.load(weights_only=True)`` runs no code, but it will inflate a zip record of any declared size
and build any object a pickle describes. So, before loading, a torch zip's records are checked against
what its pickle claims (:func:`check_torch_zip`, a static walk over the pickle's opcodes that builds and
imports nothing); after loading, the object is measured as a tree, each shared container once
(:func:`check_pickle_structure`). torch's refusals are said in one line without its advice to
allow-list globals (:func:`unpickling_problem`). Every refusal is an :class:`AdapterError`.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterError

# A torch zip's pickle and small records (version, byteorder) are read whole by torch: cap each.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# torch writes its records uncompressed; a compressed one (a re-zipped file) may inflate this much in all.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
# A loaded pickle, expanded as a tree (a shared object counted at every place it appears): the most
# entries sharing may multiply it to, and the deepest nesting, that an adapter or checkpoint plausibly has.
MAX_PICKLE_ENTRIES = 1_000_000
MAX_PICKLE_DEPTH = 100


def is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass, and not a count


_PLAIN_IMPORTS = ("torch._utils.", "torch.", "collections.OrderedDict")  # what torch.save itself writes


def zip_like(path: Path) -> bool:
    """What torch.load would open as a zip (its first bytes), or Python's zipfile would."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" or zipfile.is_zipfile(f)


def unpickling_problem(path: Path, message: str) -> str:
    """torch's weights-only refusal, said in one line without its advice to allow-list or to load unsafely."""
    needs = re.search(r"GLOBAL ([\w.]+)", message)
    if needs:
        return _needs_code(needs.group(1))
    opcode = re.search(r"Unsupported operand (\d+)", message)
    if opcode:
        # torch stopped at an opcode its reader lacks (a protocol 4+ frame, or garbage) before reaching
        # any global: a static walk names the code such a pickle would import
        code = [g for g in _walk_pickle(_pickle_bytes(path)).imports
                if not (g.startswith(_PLAIN_IMPORTS) and g.count(".") <= 2)]
        if code:
            return _needs_code(code[0])
        return (f"refused: not a pickle torch's weights_only loader reads (opcode {int(opcode.group(1)):#04x} "
                f"is not one it accepts): corrupt, or not written by torch.save")
    detail = next((ln.strip() for ln in message.splitlines()
                   if ln.strip() and not ln.startswith(("Weights only load failed", "Please", "Check the"))), "")
    return f"refused: the pickle cannot be read without running code (weights_only): {detail[:160]}"


def _needs_code(name: str) -> str:
    return (f"refused: the pickle needs code to load ({name}); adapterhub reads pickles with torch's "
            f"weights_only loader and never runs a file's code")


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a torch file, at most :data:`MAX_PICKLE_BYTES` (a zip's sizes are checked by now);
    empty where it cannot be had (the caller only names what it finds)."""
    try:
        if zip_like(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return archive.read(name) if name else b""
        with open(path, "rb") as f:
            return f.read(MAX_PICKLE_BYTES)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return b""


def check_torch_zip(path: Path) -> None:
    """Refuse a torch zip whose records would inflate past what its pickle claims, before torch reads any.

    torch inflates a record whole, into a buffer of the size the record declares. So each record's
    declared size is checked first: the pickle and the small records against :data:`MAX_PICKLE_BYTES`,
    each tensor storage against the bytes its pickle's storage id claims (found by walking the pickle's
    opcodes, nothing built), the compressed records' total against :data:`MAX_INFLATED_BYTES`, and an
    uncompressed record against the file's size."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickled = next((n for n in records if n == "data.pkl" or n.endswith("/data.pkl")), None)
            _check_record_sizes(path, records, size)
            if pickled is None:
                return  # not a torch zip: torch.load refuses it on its own, inflating nothing
            prefix = pickled[: -len("data.pkl")]
            claims = _storage_claims(archive.read(pickled))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise AdapterError(path, f"corrupt or truncated pickle: a broken zip ({exc})") from None
    for key, claimed in claims.items():
        info = records.get(f"{prefix}data/{key}")
        if info is not None and info.file_size != claimed:
            raise AdapterError(path, f"refused: zip record data/{key} would inflate to {info.file_size} bytes, "
                                     f"but its tensor storage claims {claimed} (a zip bomb, or corrupt)")
    inflated = sum(i.file_size for i in records.values() if i.compress_type != zipfile.ZIP_STORED)
    if inflated > MAX_INFLATED_BYTES:
        raise AdapterError(path, f"refused: the zip's compressed records would inflate to {inflated} bytes, "
                                 f"more than the {MAX_INFLATED_BYTES}-byte cap (torch never compresses)")


def _check_record_sizes(path: Path, records: dict, size: int) -> None:
    for name, info in records.items():
        if "/data/" not in f"/{name}" and info.file_size > MAX_PICKLE_BYTES:
            raise AdapterError(path, f"refused: zip record {name} would inflate to {info.file_size} bytes, "
                                     f"more than the {MAX_PICKLE_BYTES}-byte cap")
        if info.compress_type == zipfile.ZIP_STORED and info.header_offset + info.file_size > size:
            raise AdapterError(path, f"truncated: zip record {name} claims {info.file_size} bytes "
                                     f"past the end of the file")


@dataclass
class _PickleWalk:
    """A static walk over a pickle's opcodes: a small stack model (values for constants, tuples and
    globals, placeholders for the rest) that builds and imports nothing."""

    stack: list = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    claims: dict[str, int] = field(default_factory=dict)  # storage key -> bytes claimed
    imports: list[str] = field(default_factory=list)  # "module.name" of every global it loads


def _walk_pickle(data: bytes) -> _PickleWalk:
    """The storage claims (torch's persistent ids ``('storage', <torch XStorage>, key, location, numel)``)
    and the globals of a pickle. A malformed pickle stops the walk: torch stops at the same place,
    having read only the claims seen so far."""
    import pickletools

    walk = _PickleWalk()
    try:
        for op, arg, _ in pickletools.genops(data):
            _pickle_step(op, arg, walk)
    except Exception:  # noqa: BLE001 - the walk only collects facts; torch judges the pickle
        pass
    return walk


def _storage_claims(data: bytes) -> dict[str, int]:
    return _walk_pickle(data).claims


_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MARK = object()


def _pickle_step(op, arg, walk: _PickleWalk) -> None:
    import pickletools

    name, stack = op.name, walk.stack
    if name == "MARK":
        stack.append(_MARK)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        walk.memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        walk.memo[len(walk.memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(walk.memo.get(arg))
    elif name in ("GLOBAL", "STACK_GLOBAL"):
        module, attr = arg.split(" ", 1) if name == "GLOBAL" else reversed([stack.pop(), stack.pop()])
        walk.imports.append(f"{module}.{attr}")
        stack.append(("global", module, attr))
    elif name == "TUPLE":
        stack.append(tuple(_pop_to_mark(stack)))
    elif name in _TUPLE_SIZES:
        n = _TUPLE_SIZES[name]
        items = stack[-n:]
        del stack[-n:]
        stack.append(tuple(items))
    elif name == "BINPERSID":
        _claim(stack.pop(), walk.claims)
        stack.append(None)
    else:
        before = op.stack_before
        if pickletools.markobject in before:
            _pop_to_mark(stack)
            for _ in range(before.index(pickletools.markobject)):
                stack.pop()
        else:
            for _ in before:
                stack.pop()
        constant = not before and len(op.stack_after) == 1
        stack.extend([arg if constant else None] * len(op.stack_after))


def _pop_to_mark(stack: list) -> list:
    at = len(stack) - 1 - stack[::-1].index(_MARK)
    items = stack[at + 1:]
    del stack[at:]
    return items


def _claim(saved_id: Any, claims: dict) -> None:
    if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
        return
    _, storage, key, _, numel = saved_id
    if not (isinstance(storage, tuple) and isinstance(key, str) and is_count(numel)):
        return
    itemsize = _storage_itemsize(storage[-1])
    if itemsize is not None:
        claims[key] = max(claims.get(key, 0), numel * itemsize)


def _storage_itemsize(name: str) -> int | None:
    import torch

    if name == "UntypedStorage":
        return 1
    try:
        from torch.serialization import StorageType

        return torch.empty(0, dtype=StorageType(name).dtype).element_size()
    except Exception:  # noqa: BLE001 - a storage torch does not know: it refuses the file itself
        return None


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(obj: Any) -> list:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    return list(obj)


def check_pickle_structure(path: Path, raw: Any) -> None:
    """Refuse a loaded pickle that would expand past :data:`MAX_PICKLE_ENTRIES` entries, and past twice
    what it holds, when walked as a tree (shared references: a "billion laughs" file), nests deeper than
    :data:`MAX_PICKLE_DEPTH`, or contains itself. The walk is iterative and visits each container once (its size and height are
    memoised), so its cost is that of the file, whatever the file would expand to."""
    size: dict[int, int] = {}  # id -> entries in the expanded tree under the container, itself included
    height: dict[int, int] = {}
    on_path: set[int] = set()
    distinct = 0
    stack: list[tuple[Any, bool]] = [(raw, False)]
    while stack:
        obj, finished = stack.pop()
        if not isinstance(obj, _CONTAINERS):
            continue
        oid = id(obj)
        kids = _children(obj)
        if finished:
            on_path.discard(oid)
            size[oid] = 1 + sum(size.get(id(k), 1) for k in kids)
            height[oid] = 1 + max((height.get(id(k), 0) for k in kids), default=0)
            distinct += 1 + len(kids)
            if height[oid] > MAX_PICKLE_DEPTH:
                raise AdapterError(path, f"refused: the pickle nests more than {MAX_PICKLE_DEPTH} levels deep "
                                         f"({height[oid]} or more)")
            # a large pickle that expands to about itself cost its size to load already and is read as
            # it is (a long training history); one whose shared references multiply it is refused
            if size[oid] > MAX_PICKLE_ENTRIES and size[oid] > 2 * distinct:
                raise AdapterError(path, f"refused: the pickle's shared references expand to over "
                                         f"{MAX_PICKLE_ENTRIES} entries from {distinct} "
                                         f"(a \"billion laughs\" file)")
            continue
        if oid in size:
            continue
        if oid in on_path:  # reached again from below itself: a loop
            raise AdapterError(path, "refused: the pickle contains itself (a container holds a reference "
                                     "to one that holds it)")
        on_path.add(oid)
        stack.append((obj, True))
        stack.extend((k, False) for k in kids if isinstance(k, _CONTAINERS) and id(k) not in size)
