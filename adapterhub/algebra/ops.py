"""The three operations: combine adapters, resize one, extract one from two checkpoints.

Each works in memory and returns an :class:`AlgebraResult` (a low-rank :class:`Adapter` built by the
``from_factors`` of the registered type that declares the result's modules, :func:`factor_type`; a
per-module report; the metadata); ``save`` writes it atomically. Nothing is written when an input is
refused. Progress is reported through ``progress(done, total)``; only the CLI prints.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.plugins import adapter_types
from adapterhub.types import Adapter

from . import linalg, provenance
from .deltas import Module, check_bases, gather, is_kxk, meta_model, source_rank

METHODS = ("concat", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[int, int], None]
SUMMARY_KEYS = ("ss_network", "adapterhub.", "sshs_")  # the metadata shown by as_dict
FactorMap = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
DENOISERS = ("unet.", "transformer.")  # the targets that are not text encoders' (kohya's extract rule)


@dataclass
class ModuleReport:
    """One output module: ranks in and out, what the re-factorisation kept, and its error."""

    module: str
    old_rank: str  # "4", "4+8" (concat), "full" (extract), "?" (a LoHa / LoKr source)
    new_rank: int
    fro_retained: float = 1.0  # kohya's "fro retained": ||S_k|| / ||S||
    energy_retained: float = 1.0  # ||S_k||^2 / ||S||^2
    error: float = 0.0  # ||delta - up @ down||_F against the method's (merged) delta

    def old_ranks(self) -> list[int | None]:
        """The rank of each source module (None: a LoHa / LoKr source); none for a full matrix."""
        if self.old_rank == "full":
            return []
        return [int(r) if r.isdigit() else None for r in self.old_rank.split("+")]

    def as_dict(self) -> dict:
        """Numbers for scripts: ``old_rank`` is the rank in (summed over a concat's sources; None where a
        source has none or is a full matrix), ``old_ranks`` each source's."""
        ranks = self.old_ranks()
        old = sum(ranks) if ranks and None not in ranks else None
        return {"module": self.module, "old_rank": old, "old_ranks": ranks, "new_rank": self.new_rank,
                "fro_retained_pct": round(100 * self.fro_retained, 3),
                "energy_retained_pct": round(100 * self.energy_retained, 3), "error": float(f"{self.error:.6g}")}


@dataclass
class AlgebraResult:
    adapter: Adapter
    method: str
    modules: list[ModuleReport]
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    seconds: float = 0.0

    @property
    def metadata(self) -> dict[str, str]:
        return self.adapter.metadata

    def save(self, out) -> Path:
        """Write the kohya-layout file atomically, with recomputed ``sshs_*`` hashes."""
        out = Path(out)
        if out.suffix.lower() != ".safetensors":
            raise AdapterhubError(f"{out}: the output must be a .safetensors file")
        self.out = provenance.write(self.adapter, out)
        return self.out

    def as_dict(self) -> dict:
        fro = [m.fro_retained for m in self.modules]
        return {"out": str(self.out) if self.out else None, "method": self.method, "type": self.adapter.type,
                "base": self.adapter.base, "modules": len(self.modules),
                "ranks": sorted({m.new_rank for m in self.modules}),
                "mean_fro_retained_pct": round(100 * sum(fro) / len(fro), 3) if fro else None,
                "notes": self.notes, "seconds": round(self.seconds, 3),
                "metadata": {k: v for k, v in self.metadata.items() if k.startswith(SUMMARY_KEYS)},
                "per_module": [m.as_dict() for m in self.modules]}


# ---------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------
def _check_rank(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise AdapterhubError(f"{name} must be at least 1 (got {value})")


def _kohya_shapes(shape: tuple[int, ...], up: torch.Tensor, down: torch.Tensor):
    """Flat factors to kohya shapes: conv targets get up (out, r, 1, 1), down (r, in, kh, kw)."""
    r = down.shape[0]
    if len(shape) == 4:
        return up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    return up, down


def factor_type(conv: bool):
    """The registered type a result is written through: of the types whose ``factor_modules`` hold Linear
    layers (and kxk convs, with ``conv``), the one declaring the fewest kinds (a linear-only result stays
    linear-only); a tie goes to the product's own type, so installing a plugin never changes what
    ``adapterhub lora`` writes, then to registration order."""
    needed = {"linear", "conv"} if conv else {"linear"}
    found = [t for t in adapter_types().values() if needed <= set(t.factor_modules)]
    if not found:
        raise AdapterhubError(f"no registered adapter type declares factor_modules {sorted(needed)}: nothing can "
                              "hold the result (is adapterhub installed with its entry points?)")
    return min(found, key=lambda t: (len(t.factor_modules), not getattr(t.source, "builtin", False)))


def _build(factors: FactorMap, shapes: dict[str, tuple[int, ...]], metadata: dict, base: str,
           dtype: torch.dtype | None, family: str = "stable-diffusion") -> Adapter:
    """The result through :func:`factor_type`'s ``from_factors``, of the inputs' ``family`` (a Flux / SD3 result
    is written in that family's names)."""
    writer = factor_type(conv=any(is_kxk(s) for s in shapes.values()))
    dtype = dtype or torch.float32
    cast = {t: (up.to("cpu", dtype).contiguous(), down.to("cpu", dtype).contiguous(), alpha)
            for t, (up, down, alpha) in factors.items()}
    adapter = writer.from_factors(cast, metadata, base)
    adapter.family = family
    return adapter


def _tick(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def module_seed(seed: int, target: str) -> int:
    """DARE's per-module seed: the same seed gives the same mask for a module whatever else is merged."""
    return (int(seed) * 1_000_003 + zlib.crc32(target.encode())) % (2 ** 63)


def _factorise(module: Module, rank: int | None, scale: float = 1.0, mat: torch.Tensor | None = None,
               product: tuple[torch.Tensor, torch.Tensor] | None = None, **options):
    """SVD-truncate ``mat``, or ``up @ down`` given as ``product`` (exact and much faster); kohya shapes,
    alpha = scale * k, and the report's numbers (rank, fro and energy kept, error of the scaled delta)."""
    f = linalg.factorise_product(*product, rank, **options) if product is not None else \
        linalg.factorise(mat, rank, **options)
    fro, energy = f.retained()
    up, down = _kohya_shapes(module.shape, f.up, f.down)
    return (up, down, float(scale) * f.rank), (f.rank, fro, energy, f.error * abs(scale))


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
def _stacked(module: Module, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(cat(w_i * s_i * up_i), cat(down_i))``, whose product is exactly ``sum_i w_i * delta_i``; None
    when a term has no low-rank factors (LoHa, LoKr, full diffs)."""
    ups, downs = [], []
    for term in module.terms:
        factors = term.patch.low_rank_factors()
        if factors is None:
            return None
        up, down, scale = factors
        ups.append(up.to(device, torch.float32) * (term.weight * scale))
        downs.append(down.to(device, torch.float32))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _concat(module: Module) -> tuple:
    """Exact: ``down = cat(down_i)``, ``up = cat(w_i * s_i * up_i)``, alpha = total rank (scale 1)."""
    stacked = _stacked(module)
    if stacked is None:
        kind = next(t.patch.kind for t in module.terms if t.patch.low_rank_factors() is None)
        raise AdapterhubError(f"{module.target}: a {kind} patch has no low-rank factors, so concat cannot be "
                              "exact; use --method svd (re-factorises the summed delta)")
    up, down = _kohya_shapes(module.shape, *stacked)
    return up, down, float(down.shape[0])


def _merged_delta(module: Module, method: str, density: float | None, majority: str, seed: int,
                  device: str) -> torch.Tensor:
    if method == "svd":
        return module.weighted_sum(device)
    tasks = [module.delta(t, device) for t in module.terms]
    weights = [t.weight for t in module.terms]
    if method == "ties":
        return linalg.ties(tasks, weights, density, majority)
    if method == "magnitude_prune":
        return linalg.magnitude_prune(tasks, weights, density)
    generator = torch.Generator().manual_seed(module_seed(seed, module.target))
    if method == "dare":
        return linalg.dare_linear(tasks, weights, density, generator)
    return linalg.dare_ties(tasks, weights, density, generator, majority)


def _check_combine_options(method: str, density: float | None, majority: str, rank, conv_rank, clamp_quantile):
    if method not in METHODS:
        raise AdapterhubError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_rank("--rank", rank)
    _check_rank("--conv-rank", conv_rank)
    if method in ("ties", "dare", "dare_ties", "magnitude_prune"):
        if density is None or not 0 < density <= 1:
            raise AdapterhubError(f"--method {method} needs --density in (0, 1] (the fraction of values kept)")
    if majority not in linalg.MAJORITY_SIGN_METHODS:
        raise AdapterhubError(f"unknown majority sign method {majority!r}; choose total or frequency")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise AdapterhubError("--clamp-quantile must be in (0, 1] (kohya uses 0.99)")
    if method == "concat" and (rank or conv_rank or clamp_quantile):
        raise AdapterhubError("--method concat keeps every rank exactly; --rank, --conv-rank and "
                              "--clamp-quantile apply to the SVD methods")


def combine(entries: list[tuple[Adapter, float]], method: str = "concat", rank: int | None = None,
            conv_rank: int | None = None, density: float | None = None, majority_sign: str = "total",
            seed: int = 0, clamp_quantile: float | None = None, dtype: torch.dtype | None = None,
            device: str = "cpu", model=None, progress: Progress | None = None) -> AlgebraResult:
    """Combine ``(adapter, weight)`` pairs into one low-rank adapter (:func:`factor_type` writes it).

    * ``concat``: exact, ``delta = sum_i w_i * delta_i``, rank = sum of the ranks (LoRA/LoCon only).
    * ``svd``: the exact summed delta, re-factorised to ``rank`` (``conv_rank`` for 3x3 convs; default:
      the largest source rank of each module): the optimal rank-R approximation unless clamped.
    * ``ties``, ``dare`` (PEFT ``dare_linear``), ``dare_ties``, ``magnitude_prune``: PEFT's task-vector
      merges on the whole deltas, then SVD to ``rank``. Approximations by design: they prune.
    """
    start = time.perf_counter()
    if not entries:
        raise AdapterhubError("nothing to combine")
    _check_combine_options(method, density, majority_sign, rank, conv_rank, clamp_quantile)
    adapters = [a for a, _ in entries]
    base = check_bases(adapters)
    modules = gather(entries, model)
    factors, reports = {}, []
    for done, module in enumerate(modules.values(), 1):
        ranks = [source_rank(t) for t in module.terms]
        old = "+".join(str(r) if r else "?" for r in ranks)
        if method == "concat":
            factors[module.target] = _concat(module)
            reports.append(ModuleReport(module.target, old, factors[module.target][1].shape[0]))
        else:
            target_rank = (conv_rank or rank) if module.kxk else rank
            if target_rank is None:
                target_rank = max((r for r in ranks if r), default=None)
                if target_rank is None:
                    raise AdapterhubError(f"{module.target}: the sources have no rank to default to; pass --rank")
            product = _stacked(module, device) if method == "svd" else None
            mat = None if product is not None else _merged_delta(module, method, density, majority_sign, seed, device)
            factors[module.target], (k, fro, energy, error) = _factorise(
                module, target_rank, mat=mat, product=product, clamp_quantile=clamp_quantile)
            reports.append(ModuleReport(module.target, old, k, fro, energy, error))
        _tick(progress, done, len(modules))
    names = ", ".join(f"{a.name}:{w:g}" for a, w in entries)
    params = {"rank": rank, "conv_rank": conv_rank, "density": density, "clamp_quantile": clamp_quantile}
    if method in ("ties", "dare_ties"):
        params["majority_sign"] = majority_sign
    if method in ("dare", "dare_ties"):
        params["seed"] = seed
    sources = [provenance.source_entry(a.path, w, a.metadata) for a, w in entries]
    metadata = provenance.build(provenance.agreed([a.metadata for a in adapters]), factors,
                                f"combined with {method} from {names}", f"combine:{method}", sources, params)
    adapter = _build(factors, {m.target: m.shape for m in modules.values()}, metadata, base, dtype,
                     adapters[0].family)
    return AlgebraResult(adapter, method, reports, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------
def parse_dynamic(spec: str | None) -> tuple[str, float] | None:
    """``sv_fro:0.9`` -> ("sv_fro", 0.9)."""
    if not spec:
        return None
    method, sep, value = spec.partition(":")
    if method not in linalg.DYNAMIC_METHODS or not sep:
        raise AdapterhubError(f"--dynamic {spec!r}: use METHOD:VALUE with METHOD one of "
                              f"{', '.join(linalg.DYNAMIC_METHODS)} (e.g. sv_fro:0.9)")
    try:
        param = float(value)
    except ValueError:
        raise AdapterhubError(f"--dynamic {spec!r}: {value!r} is not a number") from None
    if param <= 0 or (method != "sv_ratio" and param > 1):
        raise AdapterhubError(f"--dynamic {spec!r}: {method} takes a value in (0, 1]" if method != "sv_ratio"
                              else f"--dynamic {spec!r}: sv_ratio takes a value > 0")
    return method, param


def _resize_module(module: Module, rank, conv_rank, dynamic, clamp_quantile, device) -> tuple[tuple, ModuleReport]:
    """kohya factorises the unscaled ``up @ down`` and keeps the scale; other patches their delta."""
    term = module.terms[0]
    low_rank, old = term.patch.low_rank_factors(), source_rank(term)
    cap = (conv_rank or rank) if module.kxk else rank
    if low_rank is not None and low_rank[2]:
        cap = min(cap, old) if cap else old
        product, mat, scale = (low_rank[0].to(device), low_rank[1].to(device)), None, low_rank[2]
    else:
        product, mat, scale = None, module.delta(term, device), 1.0
    factors, (k, fro, energy, error) = _factorise(module, cap, scale, mat=mat, product=product, dynamic=dynamic,
                                                 clamp_quantile=clamp_quantile, zero_is_rank_one=True)
    return factors, ModuleReport(module.target, str(old) if old else "?", k, fro, energy, error)


def resize(adapter: Adapter, rank: int | None = None, conv_rank: int | None = None,
           dynamic: tuple[str, float] | None = None, clamp_quantile: float | None = None,
           dtype: torch.dtype | None = None, device: str = "cpu", model=None,
           progress: Progress | None = None) -> AlgebraResult:
    """kohya ``resize_lora``: per module, SVD of the delta; keep ``rank`` components (``conv_rank`` for
    3x3 convs), or the rank a ``dynamic`` rule picks capped at ``rank``. The scale alpha/r is kept:
    ``alpha_new = scale * k``. A LoRA is never "resized" above its own rank (nothing to gain).
    """
    start = time.perf_counter()
    if rank is None and dynamic is None:
        raise AdapterhubError("resize needs --rank R, or --dynamic METHOD:VALUE (with --rank as the cap)")
    _check_rank("--rank", rank)
    _check_rank("--conv-rank", conv_rank)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise AdapterhubError("--clamp-quantile must be in (0, 1] (kohya uses 0.99)")
    modules = gather([(adapter, 1.0)], model)
    factors, reports = {}, []
    for done, module in enumerate(modules.values(), 1):
        factors[module.target], report = _resize_module(module, rank, conv_rank, dynamic, clamp_quantile, device)
        reports.append(report)
        _tick(progress, done, len(modules))
    largest = max(source_rank(m.terms[0]) or 0 for m in modules.values())
    old_dim = adapter.metadata.get("ss_network_dim") or str(largest)
    if dynamic:
        comment = f"Dynamic resize with {dynamic[0]}: {dynamic[1]:g} from {old_dim}"
    else:
        conv = f" (conv: {conv_rank})" if conv_rank and conv_rank != rank else ""
        comment = f"dimension is resized from {old_dim} to {rank}{conv}"
    params = {"rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp_quantile,
              "dynamic": f"{dynamic[0]}:{dynamic[1]:g}" if dynamic else None}
    sources = [provenance.source_entry(adapter.path, 1.0, adapter.metadata)]
    metadata = provenance.build(provenance.agreed([adapter.metadata]), factors, comment, "resize", sources,
                                params, dynamic=dynamic is not None)
    built = _build(factors, {m.target: m.shape for m in modules.values()}, metadata, adapter.base, dtype,
                   adapter.family)
    return AlgebraResult(built, "resize", reports, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------
def _paired_targets(base, tuned, conv: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    writer = factor_type(conv)
    ours, theirs = writer.target_modules(base), writer.target_modules(tuned)
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        raise AdapterhubError(f"base and tuned models differ in structure (first difference: {missing[0]})")
    pairs = {}
    for target, module in ours.items():
        a, b = module.weight, theirs[target].weight
        if a.shape != b.shape:
            raise AdapterhubError(f"shape mismatch at {target}: base {tuple(a.shape)}, tuned {tuple(b.shape)} "
                                  "(models of different architectures?)")
        pairs[target] = (a, b)
    return pairs


def _text_differs(pairs, min_diff: float) -> tuple[bool, float]:
    """kohya's rule: the text encoders are extracted when any weight differs by more than ``min_diff``."""
    largest = 0.0
    with torch.no_grad():
        for target, (a, b) in pairs.items():
            if not target.startswith(DENOISERS):
                largest = max(largest, float((b.float() - a.float()).abs().max()))
    return largest > min_diff, largest


def extract(base, tuned, rank: int, conv_rank: int | None = None, min_diff: float = 0.01,
            clamp_quantile: float | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
            names: tuple[str, str] = ("base", "tuned"), progress: Progress | None = None) -> AlgebraResult:
    """kohya ``extract_lora_from_models``: SVD of ``W_tuned - W_base`` for every LoRA target (UNet
    attention blocks; resnet/sampler convs with ``conv_rank``; the text encoders when they differ by
    more than ``min_diff``). Unchanged modules are left out. alpha = rank (scale 1)."""
    from adapterhub.base import detect_architecture

    start = time.perf_counter()
    _check_rank("--rank", rank)
    family, arch = _transformer_facts(base) or ("stable-diffusion", None)
    _check_rank("--conv-rank", conv_rank)
    if rank is None:
        raise AdapterhubError("extract needs --rank")
    arch = arch or detect_architecture(base)
    pairs = _paired_targets(base, tuned, conv=conv_rank is not None)
    text, largest = _text_differs(pairs, min_diff)
    verdict = "differ" if text else "are the same"
    notes = [f"text encoders {verdict} (max |diff| {largest:.3g}, --min-diff {min_diff:g})"]
    factors, shapes, reports, unchanged = {}, {}, [], 0
    with torch.no_grad():
        for done, (target, (a, b)) in enumerate(pairs.items(), 1):
            _tick(progress, done, len(pairs))
            if not text and not target.startswith(DENOISERS):
                continue
            diff = b.to(device, torch.float32) - a.to(device, torch.float32)
            if not bool(diff.any()):
                unchanged += 1
                continue
            module = Module(target, tuple(diff.shape), [])
            k = conv_rank if module.kxk else rank
            factors[target], (k, fro, energy, error) = _factorise(
                module, k, mat=diff.reshape(diff.shape[0], -1), clamp_quantile=clamp_quantile)
            shapes[target] = module.shape
            reports.append(ModuleReport(target, "full", k, fro, energy, error))
    if not factors:
        raise AdapterhubError(f"{names[1]} does not differ from {names[0]} in any targeted module")
    if unchanged:
        notes.append(f"{unchanged} unchanged modules left out")
    params = {"rank": rank, "conv_rank": conv_rank, "min_diff": min_diff, "clamp_quantile": clamp_quantile}
    sources = [provenance.source_entry(names[0], None, None, role="base"),
               provenance.source_entry(names[1], None, None, role="tuned")]
    kept = {"ss_v2": str(arch == "sd2"), "ss_sd_model_name": Path(str(names[0])).name}
    if arch in provenance.BASE_MODEL_VERSION:
        kept["ss_base_model_version"] = provenance.BASE_MODEL_VERSION[arch]
    metadata = provenance.build(kept, factors, f"extracted from {Path(str(names[1])).name} - "
                                f"{Path(str(names[0])).name} at rank {rank}", "extract", sources, params)
    adapter = _build(factors, shapes, metadata, arch, dtype, family)
    return AlgebraResult(adapter, "extract", reports, notes, seconds=time.perf_counter() - start)


def _transformer_facts(model) -> tuple[str, str] | None:
    """``(family, base)`` of a FLUX.1 / SD3 pipeline (a transformer denoiser, no UNet), as the files' detection
    names it: ``flux-dev`` / ``flux-schnell`` by the guidance embedding, ``sd3.5-medium`` by the dual attention,
    the tiny bases by their widths; None for any other model."""
    from adapterhub.transformer_bases import TRANSFORMER_CLASSES, WIDTH_BASES, hidden_width

    transformer = getattr(model, "transformer", None)
    if transformer is None or getattr(model, "unet", None) is not None:
        return None
    cfg = dict(transformer.config)
    family = TRANSFORMER_CLASSES.get(type(transformer).__name__)
    if family is None:
        return None
    found, base = WIDTH_BASES.get(hidden_width(cfg), (family, "unknown"))
    if base == "flux":
        base = "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
    elif base == "sd3-medium" and cfg.get("dual_attention_layers"):
        base = "sd3.5-medium"
    return family, base if found == family else "unknown"


# ---------------------------------------------------------------------------------------------
# files in, file out
# ---------------------------------------------------------------------------------------------
def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise AdapterhubError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_out(out) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise AdapterhubError(f"{out}: the output must be a .safetensors file")
    return out


def _shape_model(base: str | None):
    if base is None:
        return None
    from adapterhub.base import PRESETS, load_base

    return meta_model(base) if base in PRESETS else load_base(base)


def combine_files(specs: list[tuple[Path, float]], out, dtype: str | None = None, base: str | None = None,
                  **options) -> AlgebraResult:
    """Load ``(path, weight)`` specs, :func:`combine`, write ``out``."""
    from adapterhub.api import load

    out, torch_dtype = _check_out(out), _dtype(dtype)
    _check_combine_options(options.get("method", "concat"), options.get("density"),
                           options.get("majority_sign", "total"), options.get("rank"), options.get("conv_rank"),
                           options.get("clamp_quantile"))
    entries = [(_finite(load(path)), float(weight)) for path, weight in specs]
    result = combine(entries, dtype=torch_dtype, model=_shape_model(base), **options)
    _finite(result.adapter, out)
    result.save(out)
    return result


def _finite(adapter: Adapter, out=None) -> Adapter:
    """No NaN / Inf goes in or comes out (a factorisation of an overflowing sum included): one line naming
    the file (the input, or ``out`` for a result) and the key."""
    from adapterhub.errors import AdapterError
    from adapterhub.weights import check_adapter_finite

    try:
        check_adapter_finite(adapter)
    except AdapterError as err:
        if out is None:
            raise
        raise AdapterError(out, f"the result is not finite ({err.problem}); nothing was written", err.key) from None
    return adapter


def resize_file(path, out, dtype: str | None = None, base: str | None = None, **options) -> AlgebraResult:
    from adapterhub.api import load

    out, torch_dtype = _check_out(out), _dtype(dtype)
    result = resize(_finite(load(path)), dtype=torch_dtype, model=_shape_model(base), **options)
    _finite(result.adapter, out)
    result.save(out)
    return result


def extract_files(base: str, tuned: str, out, rank: int, dtype: str | None = None, **options) -> AlgebraResult:
    """Load both checkpoints (anything ``load_base`` accepts), :func:`extract`, write ``out``."""
    from adapterhub.base import load_base

    out, torch_dtype = _check_out(out), _dtype(dtype)
    _check_rank("--rank", rank)
    base_pipe, tuned_pipe = load_base(base), load_base(tuned)
    result = extract(base_pipe, tuned_pipe, rank, dtype=torch_dtype, names=(base, tuned), **options)
    _finite(result.adapter, out)
    result.save(out)
    return result
