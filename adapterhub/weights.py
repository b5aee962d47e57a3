"""The one weight engine: validate, change weights in place, put them back bit for bit.

``merge`` (bake for good), ``attach`` (reversible, with ``set_weight``), and later the Stack and the
compiled sampling backend all go through :class:`WeightPatcher`:

* every adapter is bound to the model first (every target module found, every shape right), and every
  result is known to be finite in the parameter's dtype (:func:`check_finite`); only then does the
  first weight change: all or nothing;
* deltas are computed in float32, summed per parameter, added to the pristine float32 weight and
  cast once; the result is written with ``param.data.copy_`` (never a new tensor, so compiled graphs
  and CUDA graphs stay valid);
* the pristine copy of each touched tensor is kept until nothing patches it any more, then copied
  back, so removal restores the original exactly;
* a weight is one float, or one per target module path (TE / UNet multipliers, block weights), and
  :meth:`WeightPatcher.change` swaps whole sets of contributions at once, recomputing only the
  parameters whose contributions change.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import torch
from torch import nn

from adapterhub.errors import AdapterError
from adapterhub.finite import F32_MAX, nonfinite_parts  # noqa: F401 - nonfinite_parts is this module's API too
from adapterhub.keymaps import canonical, text_model_path, underscored
from adapterhub.types import Adapter, Handle, Patch


def component(model, name: str):
    """A pipeline's component (``unet``, ``text_encoder`` ...); a dict of modules works too."""
    if isinstance(model, dict):
        return model.get(name)
    return getattr(model, name, None)


def architecture_of(model) -> str:
    """sd1 / sd2 / sdxl / tiny-* / unknown, from the UNet's cross-attention width."""
    from adapterhub.archs import arch_from_context_width

    unet = component(model, "unet")
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return arch_from_context_width(width) if width else "unknown"


class _ModuleIndex:
    """Module lookup for one component: dotted names, then the ``_``-joined form (kohya style)."""

    def __init__(self, root: nn.Module):
        self.modules = {text_model_path(k): m for k, m in root.named_modules()}
        self.by_underscore = {underscored(k): m for k, m in self.modules.items() if k}
        cfg = getattr(root, "config", None)
        self.layers_per_block = getattr(cfg, "layers_per_block", 2) if cfg is not None else 2

    def find(self, rest: str, source: str) -> nn.Module | None:
        if rest in self.modules:
            return self.modules[rest]
        if self.layers_per_block != 2:  # sgm names depend on layers_per_block
            again = canonical(source, self.layers_per_block).split(".", 1)[1]
            if again in self.modules:
                return self.modules[again]
        # transformers >= 5 flattens CLIPTextModel (no ``text_model.``); files name it either way
        other = rest.removeprefix("text_model.") if rest.startswith("text_model.") else f"text_model.{rest}"
        if other in self.modules:
            return self.modules[other]
        return self.by_underscore.get(underscored(rest))


@dataclass
class Binding:
    """One patch bound to the parameter it changes; ``bound`` caches the patch's ``max |delta|`` bound
    (its tensors do not change while bound), so re-weighting checks cost no tensor work."""

    adapter: Adapter
    patch: Patch
    param: torch.Tensor
    bound: float | None = None
    widened: tuple[int, ...] | None = None  # a merge gives the parameter this shape first (Patch.widened)
    module: nn.Module | None = None  # where a widened parameter goes, and its component
    root: nn.Module | None = None


# families whose targets are diffusers module paths of a pipeline's components (``unet.``, ``transformer.`` ...)
WEIGHT_FAMILIES = ("stable-diffusion", "flux", "sd3")


def bind(model, adapter: Adapter, widen: bool = False) -> list[Binding]:
    """Find the parameter of every patch and check its shape, before anything changes. A patch that needs
    its parameter wider (:meth:`Patch.widened`) binds only for a merge (``widen``); else it is refused."""
    if adapter.family not in WEIGHT_FAMILIES:
        raise AdapterError(adapter.path, f"this is a {adapter.family} adapter, not a Stable Diffusion one")
    adapter.plugin.validate(adapter)
    model_arch = architecture_of(model)
    indexes: dict[str, _ModuleIndex] = {}
    bindings: list[Binding] = []
    for patch in adapter.patches.values():
        comp, _, rest = patch.target.partition(".")
        root = component(model, comp) if comp != "?" else None
        if root is None:
            what = f"a {comp} component" if comp != "?" else "a module outside the Stable Diffusion components"
            hint = f" (adapter base {adapter.base}, model {model_arch})" if adapter.base != "unknown" else ""
            raise AdapterError(adapter.path, f"targets {what}, which the model does not have{hint}", patch.source)
        index = indexes.get(comp) or indexes.setdefault(comp, _ModuleIndex(root))
        module = index.find(rest, patch.source)
        if module is None:
            raise AdapterError(adapter.path, f"no module {patch.target} in the model", patch.source)
        param = getattr(module, patch.param, None)
        if not isinstance(param, torch.Tensor):
            raise AdapterError(adapter.path, f"module {patch.target} has no {patch.param}", patch.source)
        wider = None if patch.fits(tuple(param.shape)) else patch.widened(tuple(param.shape))
        if wider is not None and patch.fits(wider):
            if not widen:
                raise AdapterError(adapter.path, patch.widen_refusal, patch.source)
            bindings.append(Binding(adapter, patch, param, widened=wider, module=module, root=root))
            continue
        if not patch.fits(tuple(param.shape)):
            expected = patch.expected_shape() or "?"
            hint = ""
            if adapter.base != "unknown" and model_arch != "unknown" and adapter.base != model_arch:
                hint = f"; the adapter is for {adapter.base}, the model is {model_arch}"
            raise AdapterError(adapter.path, f"shape {expected} does not fit {patch.target}."
                                             f"{patch.param} {tuple(param.shape)}{hint}", patch.source)
        bindings.append(Binding(adapter, patch, param))
    return bindings


# A contribution's weight: one multiplier for every patch, or one per target module path (a mapping
# that names every target, or a function of the target): TE/UNet multipliers and block weights.
Weight = Union[float, Mapping[str, float], Callable[[str], float]]


def resolve_weights(bindings: list[Binding], weight: Weight) -> list[float]:
    """One float multiplier per binding; raises before anything changes if one is missing or not finite."""
    if isinstance(weight, Mapping):
        missing = next((b for b in bindings if b.patch.target not in weight), None)
        if missing is not None:
            raise AdapterError(missing.adapter.path, f"no weight given for {missing.patch.target}", missing.patch.source)
        values = [float(weight[b.patch.target]) for b in bindings]
    elif callable(weight):
        values = [float(weight(b.patch.target)) for b in bindings]
    else:  # a number (float, int, numpy or 0-d tensor), as before
        values = [float(weight)] * len(bindings)
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        b = bindings[bad]
        raise AdapterError(b.adapter.path, f"weight {values[bad]} for {b.patch.target} is not a finite number",
                           b.patch.source)
    return values


# ---------------------------------------------------------------------------------------------
# no silent NaN: every result finite in its dtype, checked before the first weight changes
# ---------------------------------------------------------------------------------------------
SLACK = 1e-2  # float32 rounding of the bounds and of the sums (n * eps for n terms) stays inside this fraction


def nonfinite(patch: Patch) -> tuple[str, str] | None:
    """The first of :func:`nonfinite_parts`, or None."""
    return next(nonfinite_parts(patch), None)


def check_adapter_finite(adapter: Adapter) -> None:
    """Raise :class:`AdapterError` naming the file and key of the first NaN / Inf tensor, alpha or scale
    of ``adapter`` (for services that write or convert an adapter without applying it)."""
    for patch in adapter.patches.values():
        found = nonfinite(patch)
        if found is not None:
            raise AdapterError(adapter.path, found[1], found[0])


def _refuse_nonfinite(binding: Binding) -> None:
    found = nonfinite(binding.patch)
    if found is not None:
        raise AdapterError(binding.adapter.path, found[1], found[0])


@functools.lru_cache(maxsize=None)
def _limit(*dtypes: torch.dtype | None) -> float:
    """The largest magnitude every one of ``dtypes`` holds, through the float32 accumulator."""
    return min([F32_MAX, *(torch.finfo(d).max for d in dtypes if d is not None and d.is_floating_point)])


def _bound(binding: Binding) -> float:
    """``>= max |delta|`` at multiplier 1 from the patch's cheap bound (cached); Inf when it has none."""
    if binding.bound is None:
        bound = getattr(binding.patch, "delta_bound", None)
        binding.bound = float(bound()) if bound is not None else math.inf
    return binding.bound


def check_finite(groups: Mapping[int, list[tuple[Binding, float]]], source_of: Callable[[int], torch.Tensor],
                 dtype: torch.dtype | None = None, magnitude_of: Callable[[int], float] | None = None) -> None:
    """Refuse (one :class:`AdapterError` naming the file and key) any parameter group whose result, as
    :func:`_apply` computes it from ``source_of(id(param))``, would hold NaN / Inf in the parameter's
    dtype (and in ``dtype``, where the result is saved in another one) where the source is finite.

    Cheap first: a group whose deltas' bounds (factor-sized work, :meth:`delta_bound`, once per binding)
    plus ``max |source|`` (one pass, or ``magnitude_of(id(param))`` where the caller keeps it) stay
    inside the dtype cannot overflow; a NaN / Inf tensor or alpha makes its bound NaN / Inf and is then
    named by one ``isfinite`` pass over the patch's own tensors. Only a group that may overflow is
    computed exactly, once, into one float32 temporary of the weight's size, and thrown away."""
    with torch.no_grad():
        for pid, group in groups.items():
            _check_group(group, source_of(pid), dtype, magnitude_of(pid) if magnitude_of is not None else None)


def _check_group(group: list[tuple[Binding, float]], source: torch.Tensor, dtype: torch.dtype | None,
                 top: float | None) -> None:
    """One parameter's group: the bounds first, the exact result only where they do not settle it."""
    param = group[0][0].param
    limit = _limit(param.dtype, dtype)
    total = 0.0
    for binding, weight in group:
        bound = _bound(binding)
        if not math.isfinite(bound):
            _refuse_nonfinite(binding)  # NaN / Inf in the file: named; else an unbounded patch
        total += abs(weight) * bound
    top = top if top is not None else _magnitude(source)
    if total * (1 + SLACK) + top <= limit:  # NaN compares False: the exact check
        return
    _check_exact(param, source, group, limit, dtype)


def _magnitude(x: torch.Tensor) -> float:
    """``max |x|`` without a temporary the size of ``x`` (NaN if ``x`` holds one)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return float(torch.stack([lo.abs(), hi.abs()]).double().max())


def _check_exact(param: torch.Tensor, source: torch.Tensor, group: list[tuple[Binding, float]], limit: float,
                 dtype: torch.dtype | None) -> None:
    acc = source.to(device=param.device, dtype=torch.float32, copy=True)
    _accumulate(acc, group)
    bad = ~torch.isfinite(acc)
    for d in {param.dtype, dtype} - {None, torch.float32, torch.float64}:
        bad |= ~torch.isfinite(acc.to(d))  # the cast rounds: 65519 is still a float16, 65520 is not
    bad &= torch.isfinite(source.to(acc.device))  # a weight the model already had non-finite is not ours
    if not bool(bad.any()):
        return
    for binding, _ in group:
        _refuse_nonfinite(binding)
    binding, weight = max(group, key=lambda bw: abs(bw[1]) * _bound(bw[0]))
    where = f"{binding.patch.target}.{binding.patch.param}"
    kind = str(dtype if dtype is not None and torch.finfo(dtype).max < torch.finfo(param.dtype).max
               else param.dtype).removeprefix("torch.")
    raise AdapterError(binding.adapter.path, f"at weight {weight:g} the change to {where} overflows {kind} "
                                             f"(|values| beyond {limit:.6g})", binding.patch.source)


def _accumulate(acc: torch.Tensor, group: Iterable[tuple[Binding, float]]) -> None:
    for binding, weight in group:
        if weight:
            binding.patch.add_to(acc, weight)


def _apply(param: torch.Tensor, source: torch.Tensor, group: list[tuple[Binding, float]]) -> None:
    """``param <- cast(float32(source) + sum(w * delta))``, written in place.

    A float32 parameter is its own accumulator (no temporary the size of the weight); others are
    accumulated in a float32 copy and cast once.
    """
    if param.dtype == torch.float32 and param.is_contiguous():
        if source is not param:
            param.copy_(source)
        _accumulate(param, group)
        return
    acc = source.to(device=param.device, dtype=torch.float32, copy=True)
    _accumulate(acc, group)
    param.copy_(acc)


def _by_param(pairs: Iterable[tuple[Binding, float]]) -> dict[int, list[tuple[Binding, float]]]:
    groups: dict[int, list[tuple[Binding, float]]] = {}
    for binding, weight in pairs:
        groups.setdefault(id(binding.param), []).append((binding, weight))
    return groups


def merge(model, entries: list[tuple[Adapter, Weight]], dtype: torch.dtype | None = None) -> None:
    """Bake ``(adapter, weight)`` pairs into the model's weights for good: all bound and every result
    checked finite first (in ``dtype`` too, when the merged model is saved in another dtype).

    A weight is a float, or per target module path a mapping / function (see :data:`Weight`). A parameter a
    patch widens (:meth:`Patch.widened`: a new shape, which only a merge gives) is checked in its widened form
    and put in place after every check, then patched as the others are."""
    bound = [(bindings, resolve_weights(bindings, w))
             for bindings, w in ((bind(model, a, widen=True), w) for a, w in entries)]
    groups = _by_param(pair for bindings, values in bound for pair in zip(bindings, values))
    with torch.no_grad():
        wide = {pid: _widened(group) for pid, group in groups.items() if any(b.widened for b, _ in group)}
        check_finite(groups, lambda pid: wide[pid] if pid in wide else groups[pid][0][0].param, dtype)
        for pid, value in wide.items():
            _install(groups[pid], value)
        for group in groups.values():
            param = group[0][0].param
            _apply(param, param, group)


def _widened(group: list[tuple[Binding, float]]) -> torch.Tensor:
    """The zero-padded copy of a parameter some patches widen; every patch of the group must fit it (one
    that needs the old shape, or another width, is refused: nothing has changed yet)."""
    widening = next(b for b, _ in group if b.widened)
    for binding, _ in group:
        if binding.widened != widening.widened:
            shape = tuple(binding.param.shape) if binding.widened is None else binding.widened
            raise AdapterError(binding.adapter.path, f"needs {binding.patch.target}.{binding.patch.param} of shape "
                                                     f"{shape}, which {widening.adapter.name} widens to "
                                                     f"{widening.widened}: the two cannot be merged together",
                               binding.patch.source)
    param = widening.param
    value = param.new_zeros(widening.widened)
    value[tuple(slice(0, n) for n in param.shape)] = param
    return value


def _install(group: list[tuple[Binding, float]], value: torch.Tensor) -> None:
    """Put the widened parameter into its module (the patch knows how) and rebind the group to it."""
    first = group[0][0]
    first.patch.widen(first.root, first.module, value)
    param = getattr(first.module, first.patch.param)
    for binding, _ in group:
        binding.param = param


class WeightPatcher:
    """Reversible in-place patching of one model by any number of weighted contributions."""

    _ids = itertools.count()

    def __init__(self):
        self.pristine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (param, copy)
        self.contributions: dict[int, tuple[list[Binding], Weight]] = {}  # handle id -> (bindings, weight)
        self.resolved: dict[int, list[float]] = {}  # handle id -> one multiplier per binding
        self.magnitudes: dict[int, float] = {}  # id(param) -> max |pristine copy|, for check_finite

    def _params_of(self, bindings: list[Binding]) -> dict[int, torch.Tensor]:
        return {id(b.param): b.param for b in bindings}

    def _magnitude(self, pid: int, param: torch.Tensor) -> float:
        """``max |source|`` of a parameter: kept while its pristine copy (which does not change) is."""
        if pid not in self.pristine:
            return _magnitude(param)
        if pid not in self.magnitudes:
            self.magnitudes[pid] = _magnitude(self.pristine[pid][1])
        return self.magnitudes[pid]

    def _groups(self, params: dict[int, torch.Tensor]) -> dict[int, list[tuple[Binding, float]]]:
        """Per parameter, its live (binding, multiplier) pairs in contribution order."""
        return _groups_of(self.contributions, self.resolved, params)

    def _refresh(self, params: dict[int, torch.Tensor], groups=None, fresh: frozenset = frozenset()) -> None:
        """Recompute the given parameters from their pristine copies and every live contribution,
        in contribution order, so the result equals a fresh merge of the same entries bit for bit.
        A ``fresh`` parameter (copied just now) still equals its pristine copy: no copy back needed."""
        groups = self._groups(params) if groups is None else groups
        with torch.no_grad():
            for pid in params:
                param, pristine = self.pristine[pid]
                if pid not in groups:
                    param.copy_(pristine)
                    del self.pristine[pid]
                    self.magnitudes.pop(pid, None)
                else:
                    _apply(param, param if pid in fresh else pristine, groups[pid])

    def add(self, bindings: list[Binding], weight: Weight) -> int:
        return self.change(add=[(bindings, weight)])[0]

    def set_weight(self, key: int, weight: Weight) -> None:
        self.change(update={key: weight})

    def remove(self, key: int) -> None:
        self.change(remove=[key])

    def change(self, remove: Iterable[int] = (), add: Iterable[tuple[list[Binding], Weight]] = (),
               update: Mapping[int, Weight] | None = None) -> list[int]:
        """Remove, add and re-weight contributions in one step; returns the keys of the added ones.

        Every weight, and every result being finite in its parameter's dtype (:func:`check_finite`),
        is checked on the new state before the first change: a refused change leaves the weights and
        the contributions as they were. Only parameters whose ordered list of (patch, multiplier)
        changes are recomputed (once each, from the pristine copy), so switching from one set of
        contributions to another leaves the parameters they share unchanged, and a parameter touched
        by neither is never read or written.
        """
        remove, add, update = list(remove), list(add), dict(update or {})
        for key in [*remove, *update]:
            if key not in self.contributions:
                raise KeyError(f"no contribution {key}")
        new_values = {key: resolve_weights(self.contributions[key][0], w) for key, w in update.items()}
        added = [(next(self._ids), bindings, w, resolve_weights(bindings, w)) for bindings, w in add]
        affected: dict[int, torch.Tensor] = {}
        for key in remove:
            affected.update(self._params_of(self.contributions[key][0]))
        for key, values in new_values.items():
            bindings = self.contributions[key][0]
            affected.update((id(b.param), b.param) for b, old, new in zip(bindings, self.resolved[key], values)
                            if old != new)
        for _, bindings, _, _ in added:
            affected.update(self._params_of(bindings))
        # the new state, built aside: nothing of the patcher changes until it is known to be finite
        contributions, resolved = dict(self.contributions), dict(self.resolved)
        for key in remove:
            del contributions[key], resolved[key]
        for key, w in update.items():
            contributions[key], resolved[key] = (contributions[key][0], w), new_values[key]
        for key, bindings, w, values in added:
            contributions[key], resolved[key] = (bindings, w), values
        before, after = self._groups(affected), _groups_of(contributions, resolved, affected)
        changed = {pid: p for pid, p in affected.items() if not _same_group(before.get(pid), after.get(pid))}
        check_finite({pid: g for pid, g in after.items() if pid in changed},
                     lambda pid: self.pristine[pid][1] if pid in self.pristine else changed[pid],
                     magnitude_of=lambda pid: self._magnitude(pid, changed[pid]))
        self.contributions, self.resolved = contributions, resolved
        fresh = set()
        for _, bindings, _, _ in added:
            for pid, param in self._params_of(bindings).items():
                if pid not in self.pristine:
                    self.pristine[pid] = (param, param.detach().clone())
                    fresh.add(pid)
        self._refresh(changed, {pid: g for pid, g in after.items() if pid in changed}, frozenset(fresh))
        return [key for key, _, _, _ in added]


def _groups_of(contributions: Mapping[int, tuple[list[Binding], Weight]], resolved: Mapping[int, list[float]],
               params: Mapping[int, torch.Tensor]) -> dict[int, list[tuple[Binding, float]]]:
    """Per parameter in ``params``, the (binding, multiplier) pairs of ``contributions`` in their order."""
    return _by_param((b, w) for key, (bindings, _) in contributions.items()
                     for b, w in zip(bindings, resolved[key]) if id(b.param) in params)


def _same_group(a: list[tuple[Binding, float]] | None, b: list[tuple[Binding, float]] | None) -> bool:
    """Whether two parameter groups give the same result: the same patches, in order, at the same weights."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x.patch is y.patch and wx == wy for (x, wx), (y, wy) in zip(a, b))


_patchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def owner_of(model):
    """What ``model``'s weights are registered under: its UNet; else, for a dict of modules (which
    cannot be weakly referenced, and is rebuilt per call by some callers), its first module by
    component name, so every dict of the same modules finds the same patcher; else the model."""
    unet = component(model, "unet")
    if unet is not None:
        return unet
    if isinstance(model, dict):
        modules = [model[name] for name in sorted(model, key=str) if isinstance(model[name], nn.Module)]
        if modules:
            return modules[0]
    return model


def patcher_for(model) -> WeightPatcher:
    """The patcher that owns ``model``'s weights (one per model, so contributions combine and every
    removal restores exactly)."""
    try:
        return _patchers.setdefault(owner_of(model), WeightPatcher())
    except TypeError:  # nothing weakly referenceable (no module at all): nothing to patch either
        return WeightPatcher()


class WeightHandle(Handle):
    def __init__(self, patcher: WeightPatcher, key: int):
        self.patcher, self.key, self.attached = patcher, key, True

    def set_weight(self, weight: float) -> None:
        if not self.attached:
            raise RuntimeError("adapter is detached")
        self.patcher.set_weight(self.key, weight)

    def detach(self) -> None:
        if self.attached:
            self.patcher.remove(self.key)
            self.attached = False


def attach(model, adapter: Adapter, weight: float = 1.0) -> WeightHandle:
    """Apply ``adapter`` reversibly; the handle sets the weight or detaches (exact restore)."""
    bindings = bind(model, adapter)
    patcher = patcher_for(model)
    return WeightHandle(patcher, patcher.add(bindings, weight))
