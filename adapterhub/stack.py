"""Stacks: ordered (adapter, weight) entries applied to a pipeline together and removed together.

A stack comes from a spec string, from Python objects, or from AUTOMATIC1111 prompt tags::

    stack = Stack.parse("style:0.8, char:0.6:unet=0.3, detail:lbw=OUTS")
    stack = Stack([("style.safetensors", 0.8), Entry("char", te=0.5, unet=1.0, lbw="INS")])
    stack, prompt = Stack.from_prompt("a castle <lora:style:0.8> <hypernet:anime:0.5>")

    stack.apply(pipe)                    # reversible: weight deltas in place + attached non-weight types
    stack.set_weights({"style": 0.5})    # re-merges only the parameters whose multiplier changes
    other.apply(pipe, replace=True)      # switch: only parameters whose contributions change are rewritten
    other.remove()                       # every tensor restored bit for bit

Spec grammar (entries separated by commas): ``NAME[:W[:UNET]][:te=W][:unet=W][:lbw=PRESET|v1,v2,...]``.
``NAME`` is a path, a catalog name or a hash prefix (a colon in a path is kept, as ``adapterhub merge``
does). ``W`` is the text-encoder multiplier and the UNet's unless ``unet`` is given (A1111's
``te_multiplier`` / ``unet_multiplier``); ``lbw`` gives block weights (:mod:`adapterhub.blocks`). The
A1111 fields ``dyn``, ``start``, ``stop`` and ``step`` are kept in :attr:`Entry.extra` for a sampler;
applying a stack does not use them.

Weight-space types (LoRA, LoCon, LoHa, LoKr, AdaLoRA ...) go through the one weight engine
(:class:`adapterhub.weights.WeightPatcher`), each as one contribution with a multiplier per target;
every other type (textual inversion, hypernetwork, ControlNet ...) through its own ``attach`` and
takes the UNet multiplier. ``mode="merge"`` bakes everything in for good (``adapterhub.weights.merge``
and each other type's ``merge_into``): such a stack cannot be removed or re-weighted.
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from adapterhub import blocks
from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.types import Adapter, Handle

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111 extra networks (modules/extra_networks.py)
NAMED_FIELD = re.compile(r"^(\w+)=(.*)$", re.S)
KEPT_FIELDS = ("dyn", "start", "stop", "step")  # parsed and kept, not applied by a stack
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
MODES = ("attach", "merge")
PAST = {"attach": "attached", "merge": "merged"}

# the attached stack of each pipeline, keyed by its UNet (as the weight engine keys its patchers); both
# sides weak, so a pipeline and its stack dropped together are freed
_active: "weakref.WeakKeyDictionary[Any, weakref.ref[Stack]]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One adapter of a stack: its source (path, catalog name, hash prefix or loaded Adapter), the
    text-encoder and UNet multipliers (``unet`` defaults to ``te``), optional block weights, and the
    options a non-weight type's ``attach`` takes (a ControlNet's ``image``, ``start``, ``end``)."""

    source: str | Path | Adapter
    te: float = 1.0
    unet: float | None = None
    lbw: str | tuple[float, ...] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    adapter: Adapter | None = field(default=None, repr=False)
    _stat: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.unet is None:
            self.unet = self.te
        self.te, self.unet = _finite(self.te, self.label), _finite(self.unet, self.label)
        if isinstance(self.lbw, str):
            self.lbw = blocks.parse(self.lbw)
        elif self.lbw is not None:
            self.lbw = tuple(_finite(v, self.label) for v in self.lbw)
        if isinstance(self.source, Adapter):
            self.adapter, self.path = self.source, self.source.path

    @property
    def label(self) -> str:
        """The name as given (``style`` for ``style:0.8``, the stem of a path)."""
        if isinstance(self.source, Adapter):
            return self.source.name
        text = str(self.source)
        return Path(text).stem if Path(text).suffix in SUFFIXES else Path(text).name or text

    @property
    def weight(self) -> float:
        """The single multiplier a non-weight type (textual inversion, hypernetwork ...) takes."""
        return self.unet

    def spec(self) -> str:
        text = f"{self.label}:{_num(self.te)}"
        if self.unet != self.te:
            text += f":unet={_num(self.unet)}"
        if self.lbw is not None:
            text += ":lbw=" + (self.lbw if isinstance(self.lbw, str) else ",".join(_num(v) for v in self.lbw))
        return text

    def resolve(self, dirs: Sequence[str | Path] = ()) -> Path:
        if self.path is None:
            self.path = find_adapter(str(self.source), dirs)
        return self.path

    def load(self, dirs: Sequence[str | Path] = ()) -> Adapter:
        if self.adapter is None:
            from adapterhub.api import load

            path = self.resolve(dirs)
            self.adapter, self._stat = load(path), _stat(path)
        return self.adapter

    def summary(self) -> dict:
        a = self.adapter
        row = {"path": str(self.path or (a.path if a else self.source)), "type": a.type if a else None,
               "format": a.format if a else None, "weight": self.te, "targets": len(a.patches) if a else None}
        if self.unet != self.te:
            row["unet"] = self.unet
        if self.lbw is not None:
            row["lbw"] = self.lbw if isinstance(self.lbw, str) else list(self.lbw)
        return row


def _finite(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdapterhubError(f"{where}: weight {value!r} is not a number") from None
    if not math.isfinite(number):
        raise AdapterhubError(f"{where}: weight {value!r} is not a finite number")
    return number


def _num(value: float) -> str:
    text = repr(float(value))  # the shortest text that reads back as the same float
    return text[:-2] if text.endswith(".0") else text


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def find_adapter(name: str, dirs: Sequence[str | Path] = ()) -> Path:
    """An adapter named in a spec or a tag: a path, ``DIR/NAME[.safetensors|.pt|.ckpt|.bin]`` in one
    of ``dirs`` (A1111 looks names up by file stem), else a catalog name or hash prefix."""
    for folder in dirs:
        for suffix in ("", *SUFFIXES):
            candidate = Path(folder) / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    from adapterhub.names import resolve_adapter  # the one rule for names (path, catalog, hash)

    return resolve_adapter(name)


# ---------------------------------------------------------------------------------------------
# parsing: spec strings and prompt tags
# ---------------------------------------------------------------------------------------------
def _peel(item: str) -> tuple[str, list]:
    """Split ``NAME[:W...][:k=v...]`` from the right: named fields, then numbers by the
    ``split_weight`` rule of ``adapterhub merge`` (so a colon in a path stays in the name)."""
    from adapterhub.names import split_weight

    fields: list = []
    rest = item
    while True:
        head, sep, tail = rest.rpartition(":")
        if sep and head and NAMED_FIELD.match(tail):
            fields.insert(0, tail)
            rest = head
            continue
        name, weight = split_weight(rest, default=None)
        if weight is None:
            return rest, fields
        fields.insert(0, weight)
        rest = name


def tag_kind(tag: str):
    """The :class:`~adapterhub.types.PromptTag` a registered type declares for ``<tag:…>`` (any case); None: not
    an adapter tag (the prompt keeps it as written)."""
    from adapterhub.plugins import prompt_tags

    found = prompt_tags().get(tag.lower())
    return found[0] if found else None


def _read_fields(fields: list, where: str, weights: bool = True) -> tuple[list, dict[str, str]]:
    """Positional numbers and named fields (A1111: an item with ``=`` is named). A legacy positional
    block-weight item (``<lora:name:1:INS>``, ``<lora:name:1:1,0,...>``) becomes ``lbw``. ``weights``: the
    webui Lora fields; else one multiplier (``te``), as ``<hypernet:…>`` takes."""
    numbers: list = []
    named: dict[str, str] = {}
    for item in fields:
        match = NAMED_FIELD.match(item) if isinstance(item, str) else None
        if match:
            key, value = match.group(1).lower(), match.group(2).strip()
            if key not in ("te", "unet", "lbw", *KEPT_FIELDS) or (not weights and key != "te"):
                known = f"te, unet, lbw, {', '.join(KEPT_FIELDS)}" if weights else "te"
                raise AdapterhubError(f"{where}: unknown field {key}= (known: {known})")
            named[key] = value
        elif isinstance(item, (int, float)) or blocks.parse_number(str(item)) is not None:
            numbers.append(item)
        elif "lbw" not in named and weights and numbers:
            named["lbw"] = item
        else:
            raise AdapterhubError(f"{where}: weight {str(item)!r} is not a number")
    most = 3 if weights else 1
    if len(numbers) > most:
        raise AdapterhubError(f"{where}: too many weights ({len(numbers)}; at most {most})")
    if len(numbers) > 2:
        named.setdefault("dyn", str(numbers[2]))
    return numbers, named


def _entry_from_fields(name: str, fields: list, where: str, weights: bool = True) -> Entry:
    """A1111's rule: ``te`` = first number (default 1), ``unet`` = second number, else ``te``."""
    if not name.strip():
        raise AdapterhubError(f"{where}: no adapter name")
    numbers, named = _read_fields(fields, where, weights)
    te = named.pop("te", numbers[0] if numbers else 1.0)
    unet = named.pop("unet", numbers[1] if len(numbers) > 1 else None)
    lbw = named.pop("lbw", None)
    try:
        return Entry(name, te=te, unet=unet, lbw=lbw, extra=named)
    except AdapterhubError as err:
        raise AdapterhubError(f"{where}: {err}") from None


def _reweighted(entry: Entry, value) -> Entry:
    """``entry`` with new multipliers: a number (or positional numbers) sets ``te`` and ``unet`` as a
    spec does; named ``te=`` / ``unet=`` / ``lbw=`` change only themselves; the rest is kept."""
    where = f"{entry.label}: {value!r}"
    if isinstance(value, dict):
        changes = dict(value)
        unknown = set(changes) - {"te", "unet", "lbw"}
        if unknown:
            raise AdapterhubError(f"{where}: unknown field {sorted(unknown)[0]} (known: te, unet, lbw)")
    else:
        fields = value if isinstance(value, list) else str(value).split(":") if isinstance(value, str) else [value]
        numbers, changes = _read_fields(fields, where)
        if numbers:
            changes.setdefault("te", numbers[0])
            changes.setdefault("unet", numbers[1] if len(numbers) > 1 else changes["te"])
    try:
        new = Entry(entry.source, te=changes.get("te", entry.te), unet=changes.get("unet", entry.unet),
                    lbw=changes.get("lbw", entry.lbw), extra=dict(entry.extra), options=entry.options)
    except AdapterhubError as err:
        raise AdapterhubError(f"{where}: {err}") from None
    new.path, new.adapter, new._stat = entry.path, entry.adapter, entry._stat
    return new


def parse_entry(item: str, dirs: Sequence[str | Path] = ()) -> Entry:
    """One spec entry; the adapter named is looked up now (an unknown name raises here)."""
    item = item.strip()
    if not item:
        raise AdapterhubError("empty stack entry")
    name, fields = _peel(item)
    entry = _entry_from_fields(name, fields, item)
    entry.resolve(dirs)
    return entry


def _split_entries(spec: str) -> list[str]:
    """Entries split at commas, except the commas inside an ``lbw=`` list of numbers."""
    items: list[str] = []
    for piece in spec.split(","):
        if items and re.search(r":lbw=[^:]*$", items[-1]) and blocks.parse_number(piece) is not None:
            items[-1] += "," + piece.strip()
        elif piece.strip():
            items.append(piece.strip())
    return items


def _one_path_with_commas(spec: str) -> bool:
    if "," not in spec:
        return False
    try:
        name, _ = _peel(spec.strip())
    except AdapterhubError:
        return False
    return "," in name and Path(name).exists()


def _as_entry(item) -> Entry:
    if isinstance(item, Entry):
        return item
    if isinstance(item, (Adapter, Path)):
        return Entry(item)
    if isinstance(item, str):
        return parse_entry(item)
    if isinstance(item, tuple) and len(item) == 2:
        source, weight = item
        return _reweighted(Entry(source), weight)
    raise TypeError(f"a stack entry is an Entry, an Adapter, a path, a spec string or (source, weight), "
                    f"not {type(item).__name__}")


# ---------------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------------
@dataclass
class _Applied:
    pipe: Any
    mode: str
    family: str
    patcher: Any = None
    keys: dict[int, int] = field(default_factory=dict)  # entry index -> patcher contribution
    handles: dict[int, Handle] = field(default_factory=dict)  # entry index -> attached non-weight type


def active_stack(pipe) -> Stack | None:
    """The stack attached to ``pipe`` (one at most), or None."""
    try:
        ref = _active.get(_owner(pipe))
    except TypeError:
        return None
    return ref() if ref is not None else None


def _owner(pipe):
    from adapterhub.weights import owner_of  # the key the weight engine registers its patcher under

    return owner_of(pipe)


class Stack:
    """An ordered list of :class:`Entry`; see the module docstring."""

    def __init__(self, entries: Iterable = ()):
        self.entries: list[Entry] = [_as_entry(e) for e in entries]
        self._applied: _Applied | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str, dirs: Sequence[str | Path] = ()) -> Stack:
        """``"style:0.8, char:0.6:lbw=INS"``; every name is looked up now (unknown: AdapterhubError)."""
        if _one_path_with_commas(spec):
            return cls([parse_entry(spec, dirs)])
        return cls(parse_entry(item, dirs) for item in _split_entries(spec))

    @classmethod
    def from_prompt(cls, prompt: str, dirs: Sequence[str | Path] = ()) -> tuple[Stack, str]:
        """The extra-network tags of an A1111 prompt (``<lora:...>``, ``<lyco:...>``, ``<hypernet:...>``: every
        tag a registered type declares, :func:`tag_kind`) as a stack, and the prompt without them (other text,
        textual-inversion names and tags no type declares included, stays)."""
        entries: list[Entry] = []

        def take(match: re.Match) -> str:
            kind = tag_kind(match.group(1))
            if kind is None:
                return match.group(0)  # not ours: left as written
            name, *fields = [item.strip() for item in match.group(2).split(":")]
            entry = _entry_from_fields(name.strip("\"'"), fields, match.group(0), kind.weights)
            try:
                entry.resolve(dirs)
            except AdapterhubError as err:
                raise AdapterhubError(f"{match.group(0)}: {err}") from None
            entries.append(entry)
            return ""

        cleaned = TAG.sub(take, prompt)
        cleaned = re.sub(r"[ \t]{2,}", " ", cleaned).strip()
        return cls(entries), cleaned

    # -- facts --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def spec(self) -> str:
        return ", ".join(e.spec() for e in self.entries)

    def __repr__(self) -> str:
        state = f", {PAST[self._applied.mode]}" if self._applied else ""
        return f"Stack({self.spec()!r}{state})"

    @property
    def mode(self) -> str | None:
        """``attach`` or ``merge`` once applied, else None."""
        return self._applied.mode if self._applied else None

    def load(self) -> Stack:
        """Read every adapter (before anything is applied, so a bad file changes nothing)."""
        for entry in self.entries:
            entry.load()
        return self

    # -- applying -----------------------------------------------------------------------------
    def apply(self, pipe, mode: str = "attach", replace: bool = False, dtype=None) -> Stack:
        """Apply every entry to ``pipe``. ``attach``: reversible (:meth:`remove`, :meth:`set_weights`).
        ``merge``: baked in for good, cannot be removed; ``dtype`` is the dtype the merged model will be
        saved in, when not its own: every result must be finite in it too. One attached stack per
        pipeline: a second raises unless ``replace=True``, which switches from the first to this one."""
        if mode not in MODES:
            raise AdapterhubError(f"mode {mode!r}: choose attach or merge")
        if self._applied is not None:
            raise AdapterhubError(f"this stack is already {PAST[self._applied.mode]}; remove() it first")
        current = active_stack(pipe)
        if current is not None and not replace:
            raise AdapterhubError(f"a stack is already attached to this pipeline ({current.spec()}); "
                                  "remove() it first, or apply(..., replace=True)")
        self._reuse_loaded(current)
        self.load()
        for entry in self.entries:
            _check_entry(entry, mode)
        if mode == "merge":
            self._merge(pipe, current, dtype)
        else:
            self._attach(pipe, current)
        return self

    def _reuse_loaded(self, other: Stack | None) -> None:
        """Share already-read adapters with the stack being replaced (same file, unchanged): its
        patches are then the same objects and the parameters both stacks give equal contributions
        are left alone by the switch."""
        if other is None:
            return
        loaded = {e._stat: e.adapter for e in other.entries if e.adapter is not None and e._stat is not None}
        for entry in self.entries:
            if entry.adapter is None and entry.path is not None:
                stat = _stat(entry.path)
                if stat in loaded:
                    entry.adapter, entry._stat = loaded[stat], stat

    def _weight(self, entry: Entry, family: str, pipe):
        """A float when one multiplier serves every target, else a function of the target path."""
        if entry.lbw is None and entry.te == entry.unet:
            return entry.te
        factors = None
        if entry.lbw is not None:
            blocks.check_layout(pipe)
            factors = blocks.resolve(entry.lbw, family)
        te, unet = entry.te, entry.unet

        def weight(target: str) -> float:
            base = te if target.startswith("text_encoder") else unet
            return base * blocks.factor(target, factors) if factors is not None else base

        return weight

    def _attach(self, pipe, current: Stack | None) -> None:
        from adapterhub.weights import bind, patcher_for

        family = blocks.family_of(pipe)
        plan = []
        for i, entry in enumerate(self.entries):
            if entry.adapter.plugin.weight_space:
                plan.append((i, bind(pipe, entry.adapter), self._weight(entry, family, pipe)))
        patcher = current._applied.patcher if current is not None else patcher_for(pipe)
        old_keys = list(current._applied.keys.values()) if current is not None else []
        if current is not None:
            current._detach_handles()
        try:
            keys = patcher.change(remove=old_keys, add=[(bindings, w) for _, bindings, w in plan])
        except BaseException:
            if current is not None:
                current._attach_handles()
            raise
        if current is not None:
            current._forget()
        self._applied = _Applied(pipe, "attach", family, patcher, {i: k for (i, _, _), k in zip(plan, keys)})
        self._register()
        try:
            self._attach_handles()
        except BaseException:
            self.remove()
            if current is not None:
                try:
                    current.apply(pipe)
                except AdapterhubError:
                    pass
            raise

    def _attach_handles(self) -> None:
        state = self._applied
        for i, entry in enumerate(self.entries):
            if not entry.adapter.plugin.weight_space and i not in state.handles:
                a = entry.adapter
                state.handles[i] = a.plugin.attach(a, state.pipe, entry.weight, **entry.options) \
                    if entry.options else a.attach(state.pipe, entry.weight)

    def _detach_handles(self) -> None:
        for i in sorted(self._applied.handles, reverse=True):  # last attached first: exact restores
            self._applied.handles.pop(i).detach()

    def _merge(self, pipe, current: Stack | None, dtype=None) -> None:
        from adapterhub.weights import merge, patcher_for

        if current is not None:
            current.remove()
        if patcher_for(pipe).contributions:
            raise AdapterhubError("adapters are attached to this pipeline; detach them before merging "
                                  "(their removal would put back the weights from before the merge)")
        family = blocks.family_of(pipe)
        merge(pipe, [(e.adapter, self._weight(e, family, pipe)) for e in self.entries if e.adapter.plugin.weight_space],
              dtype=dtype)
        for entry in self.entries:
            if not entry.adapter.plugin.weight_space:
                entry.adapter.merge_into(pipe, entry.weight)
        self._applied = _Applied(pipe, "merge", family)

    def _register(self) -> None:
        try:
            _active[_owner(self._applied.pipe)] = weakref.ref(self)
        except TypeError:  # a model that cannot be weakly referenced: no guard for it
            pass

    def _forget(self) -> None:
        try:
            if active_stack(self._applied.pipe) is self:
                del _active[_owner(self._applied.pipe)]
        except TypeError:
            pass
        self._applied = None

    # -- changing -----------------------------------------------------------------------------
    def set_weights(self, weights) -> None:
        """New multipliers: a list (one per entry: a number, a dict of ``te``/``unet``/``lbw``, a field
        string ``"0.5:lbw=INS"``, or None to keep), a dict by entry name or index, or a spec string of
        names (``"style:0.5, char:0.2"``). When attached, only the parameters whose multiplier changes
        are recomputed; a merged stack cannot be re-weighted."""
        if self._applied is not None and self._applied.mode == "merge":
            raise AdapterhubError("a merged stack is baked into the weights and cannot be re-weighted")
        updated = {i: _reweighted(self.entries[i], value) for i, value in self._by_index(weights).items()}
        state = self._applied
        if state is not None:
            for entry in updated.values():
                _check_entry(entry, "attach")
            changes = {state.keys[i]: self._weight(e, state.family, state.pipe) for i, e in updated.items()
                       if i in state.keys}
            state.patcher.change(update=changes)
            for i, entry in updated.items():
                if i in state.handles:
                    state.handles[i].set_weight(entry.weight)
        for i, entry in updated.items():
            self.entries[i] = entry

    def _by_index(self, weights) -> dict[int, Any]:
        if isinstance(weights, str):
            weights = {name: fields for name, fields in (_peel(item) for item in _split_entries(weights))}
        if isinstance(weights, dict):
            out = {}
            for key, value in weights.items():
                out[self._index(key)] = value
            return out
        weights = list(weights)
        if len(weights) != len(self.entries):
            raise AdapterhubError(f"{len(weights)} weights for a stack of {len(self.entries)}")
        return {i: w for i, w in enumerate(weights) if w is not None}

    def _index(self, key) -> int:
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(self.entries):
                raise AdapterhubError(f"no entry {key} in a stack of {len(self.entries)}")
            return key
        hits = [i for i, e in enumerate(self.entries) if key in (e.label, str(e.source), e.adapter and e.adapter.name)]
        if len(hits) != 1:
            names = ", ".join(e.label for e in self.entries)
            raise AdapterhubError(f"{key!r}: {'no' if not hits else 'more than one'} entry of that name ({names})")
        return hits[0]

    def remove(self) -> None:
        """Detach everything this stack attached; every tensor comes back bit for bit. A no-op when
        not applied; a merged stack cannot be removed (reload the base instead)."""
        state = self._applied
        if state is None:
            return
        if state.mode == "merge":
            raise AdapterhubError("a merged stack is baked into the weights and cannot be removed; reload the "
                                  "base model, or apply the stack with mode='attach'")
        self._detach_handles()
        state.patcher.change(remove=list(state.keys.values()))
        self._forget()

    def rewrite_prompt(self, prompt: str) -> str:
        """The prompt the attached entries need (textual inversions spell out multi-vector names)."""
        if self._applied is not None:
            for i in sorted(self._applied.handles):
                prompt = self._applied.handles[i].rewrite_prompt(prompt)
        return prompt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _check_entry(entry: Entry, mode: str) -> None:
    """Refuse, before anything changes, what this entry's type cannot do."""
    adapter = entry.adapter
    if adapter is not None and adapter.plugin.weight_space and entry.options:
        raise AdapterError(adapter.path, f"attach options ({', '.join(entry.options)}) are for types that are "
                                         "attached as a whole, not weight deltas")
    if adapter is None or adapter.plugin.weight_space:
        return
    if entry.lbw is not None:
        raise AdapterError(adapter.path, f"block weights apply to weight deltas only; a {adapter.type} is "
                                         "applied as a whole")
    capabilities = adapter.plugin.capabilities
    if mode == "merge" and "merge" not in capabilities:
        hint = "; attach it instead" if "attach" in capabilities else ""
        raise AdapterError(adapter.path, f"a {adapter.type} is not a weight delta and cannot be merged{hint}")
    if mode == "attach" and "attach" not in capabilities:
        raise AdapterError(adapter.path, f"a {adapter.type} cannot be attached")
