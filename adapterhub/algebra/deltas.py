"""What the algebra reads from adapters: every module's target shape, full delta and low-rank factors.

Any weight-space patch gives its float32 delta through ``Patch.delta(torch.empty(shape))``, so the
algebra works the same on LoRA, LoCon, LoHa, LoKr and full diffs (the LyCORIS author's advice:
rebuild, combine, re-extract). The target's shape comes from the patch when its tensors determine it
(LoRA, LoCon, CP variants); LoHa and LoKr files do not record a conv kernel, so their shapes come from
the model: the one given, else the adapter's detected base built on the meta device (no memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.types import Adapter, Patch

Shape = tuple[int, ...]


@dataclass
class Term:
    """One source adapter's patch on one module, with the user's weight."""

    source: int  # index into the inputs
    patch: Patch
    weight: float


@dataclass
class Module:
    """Everything the inputs change in one target module."""

    target: str
    shape: Shape
    terms: list[Term]

    @property
    def kxk(self) -> bool:
        return is_kxk(self.shape)

    def delta(self, term: Term, device: str = "cpu") -> torch.Tensor:
        """``term``'s float32 delta at multiplier 1, flattened to (out, in*kh*kw)."""
        d = term.patch.delta(torch.empty(self.shape, device=device))
        return d.reshape(self.shape[0], -1).float()

    def weighted_sum(self, device: str = "cpu") -> torch.Tensor:
        """``sum_i w_i * delta_i`` (2-D, float32): the exact combined delta."""
        acc = torch.zeros(self.shape[0], math.prod(self.shape[1:]), device=device)
        for term in self.terms:
            acc.add_(self.delta(term, device), alpha=term.weight)
        return acc


def is_kxk(shape: Shape) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _squeezed(shape: Shape) -> Shape:
    return tuple(d for i, d in enumerate(shape) if not (i >= 2 and d == 1))


def check_adapter(adapter: Adapter) -> None:
    """Refuse what cannot become a LoRA: families without weight deltas we merge (Stable Diffusion, FLUX.1 and
    SD3 have them), non-weight types, refused variants, biases, and patches whose change depends on the base
    weights (their ``algebra_refusal`` says why)."""
    from adapterhub.weights import WEIGHT_FAMILIES

    if adapter.family not in WEIGHT_FAMILIES:
        raise AdapterError(adapter.path, f"this is a {adapter.family} adapter; the LoRA algebra handles "
                                         "Stable Diffusion, Flux and SD3 adapters only")
    plugin = adapter.plugin
    if not plugin.weight_space:
        raise AdapterError(adapter.path, f"a {adapter.type} is not a weight delta; it cannot be combined, "
                                         "resized or written as a LoRA")
    plugin.validate(adapter)
    for patch in adapter.patches.values():
        if patch.param != "weight":
            raise AdapterError(adapter.path, f"changes {patch.target}.{patch.param}, which a LoRA cannot hold",
                               patch.source)
        why = getattr(patch, "algebra_refusal", None)  # a change that depends on the base weights: its own words
        if why:
            raise AdapterError(adapter.path, why, patch.source)


def check_bases(adapters: list[Adapter]) -> str:
    """The common base of ``adapters`` (``unknown`` if none says); two different known bases, or two families,
    are an error. Transformer bases of one family and width are one architecture (``flux-dev`` and the
    width-only ``flux``; dev and schnell): the most specific name is the result's, ``flux`` where two
    variants meet."""
    first = adapters[0] if adapters else None
    for adapter in adapters[1:]:
        if adapter.family != first.family:
            raise AdapterhubError(f"{first.path} is for {first.base} ({first.family}) but {adapter.path} is for "
                                  f"{adapter.base} ({adapter.family}); adapters of different families cannot be "
                                  "combined")
    known = [(a, a.base) for a in adapters if a.base and a.base != "unknown"]
    result = known[0][1] if known else "unknown"
    for adapter, base in known[1:]:
        if base == result:
            continue
        common = _same_transformer(result, base)
        if common is None:
            raise AdapterhubError(f"{known[0][0].path} is for {known[0][1]} but {adapter.path} is for {base}; "
                                  "adapters of different bases cannot be combined")
        result = common
    return result


def _same_transformer(a: str, b: str) -> str | None:
    """The base name two transformer base names share (the specific one over its family's width-only name,
    else that name), or None when they differ in architecture."""
    from adapterhub.transformer_bases import BASE_WIDTHS, WIDTH_BASES

    width = BASE_WIDTHS.get(a)
    if width is None or width != BASE_WIDTHS.get(b) or a.startswith("tiny") or b.startswith("tiny"):
        return None
    generic = WIDTH_BASES[width][1]  # flux (3072), sd3-medium (1536)
    if generic in (a, b):
        return b if a == generic else a
    return generic


def meta_model(base: str):
    """The base's modules on the meta device (shapes only), or None for an unknown base."""
    from adapterhub.base import PRESETS, build_preset

    if base not in PRESETS:
        return None
    components = ("unet", "text_encoder", "text_encoder_2") if "sdxl" in base else ("unet", "text_encoder")
    return build_preset(base, device="meta", components=components)


def target_shapes(adapter: Adapter, model=None) -> dict[str, Shape]:
    """Target -> the weight's shape: from the patch where it can tell, else from ``model`` (or the
    adapter's base built on the meta device), validating the adapter against that model."""
    shapes = {t: p.expected_shape() for t, p in adapter.patches.items()}
    if model is None and all(s is not None for s in shapes.values()):
        return {t: tuple(s) for t, s in shapes.items()}
    model = model if model is not None else meta_model(adapter.base)
    if model is None:
        target = next(t for t, s in shapes.items() if s is None)
        raise AdapterError(adapter.path, f"the file does not record the shape of {target} "
                                         f"(a {adapter.patches[target].kind} patch); pass --base", target)
    from adapterhub.weights import bind

    return {b.patch.target: tuple(b.param.shape) for b in bind(model, adapter)}


def gather(entries: list[tuple[Adapter, float]], model=None) -> dict[str, Module]:
    """Every target module of the inputs with its terms; shapes must agree between inputs."""
    modules: dict[str, Module] = {}
    for index, (adapter, weight) in enumerate(entries):
        check_adapter(adapter)
        for target, shape in target_shapes(adapter, model).items():
            term = Term(index, adapter.patches[target], float(weight))
            module = modules.get(target)
            if module is None:
                modules[target] = Module(target, shape, [term])
                continue
            if _squeezed(module.shape) != _squeezed(shape):
                first = entries[module.terms[0].source][0]
                raise AdapterhubError(f"shape mismatch at {target}: {first.path} has {module.shape}, "
                                      f"{adapter.path} has {shape} (adapters of different bases?)")
            if len(shape) > len(module.shape):  # a 1x1 conv written as Linear by one, 4-D by another
                module.shape = shape
            module.terms.append(term)
    return modules


def source_rank(term: Term) -> int | None:
    rank = getattr(term.patch, "rank", None)
    return int(rank) if rank else None
