"""Parse any LoRA-family file (kohya, LyCORIS, diffusers old and new, PEFT, AdaLoRA) into patches."""
from __future__ import annotations

import json
import math
import re
from collections import Counter

from adapterhub.archs import CONTEXT_WIDTH, TEXT2_WIDTH, TEXT_WIDTH, arch_from_metadata
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.keymaps import canonical
from adapterhub.types import Adapter, Patch

from .dora import ROW, DoRAPatch, orientation
from .keys import REFUSED, Grouped, ModuleKeys, adapter_type_of, group_keys, kind_counts, layout_of, split_key
from .patches import AdaLoRAPatch, DiffPatch, LoHaPatch, LoKrPatch, LoRAPatch
from .transformer_keys import parse_transformer


def peft_config(file: AdapterFile) -> dict:
    """The PEFT LoraConfig found beside the file, in a folder, or in diffusers' header metadata."""
    if file.config and ("lora_alpha" in file.config or "peft_type" in file.config):
        return file.config
    raw = file.metadata.get("lora_adapter_metadata")
    if raw:
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            return {}
        return cfg if isinstance(cfg, dict) else {}
    return {}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern matches a module name at its end (``(.*\\.)?pattern$``)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _component_config(cfg: dict, module: str) -> tuple[dict, str]:
    """(config, module path inside its model) for ``module``.

    diffusers' ``save_lora_weights`` writes one LoraConfig per component into one JSON object, each
    key prefixed with the component (``unet.lora_alpha``, ``text_encoder.r``); PEFT matches patterns
    against the path inside the component's model, so the prefix is removed from the path too.
    """
    path = module.removeprefix("base_model.model.")
    if not cfg or "lora_alpha" in cfg or "alpha" in cfg:
        return cfg, path
    component, _, rest = path.partition(".")
    sub = {k[len(component) + 1:]: v for k, v in cfg.items() if k.startswith(component + ".")}
    return sub, rest


def _config_alpha(cfg: dict, module: str) -> tuple[float | None, bool]:
    """(alpha, rslora) for ``module`` from a PEFT config; (None, False) without a config.

    LoRA configs name it ``lora_alpha``, LoHa/LoKr configs ``alpha``."""
    cfg, path = _component_config(cfg, module)
    default = cfg.get("lora_alpha", cfg.get("alpha")) if cfg else None
    if default is None:
        return None, False
    alpha = _pattern_value(cfg.get("alpha_pattern"), path, default)
    return float(alpha), bool(cfg.get("use_rslora"))


def _config_rank(cfg: dict, module: str) -> int | None:
    cfg, path = _component_config(cfg, module)
    if not cfg or "r" not in cfg:
        return None
    return int(_pattern_value(cfg.get("rank_pattern"), path, cfg["r"]))


def _make_patch(kind: str, target: str, name: str, t: dict, alpha, cfg: dict) -> Patch:
    module_cfg, _ = _component_config(cfg, name)
    if kind == "lora":
        tensors = {k: t[k] for k in ("up", "down", "mid") if k in t}
        patch = LoRAPatch(target, name, tensors, alpha=alpha)
        if alpha is not None and module_cfg.get("use_rslora"):
            patch._scale = alpha / (patch.rank ** 0.5)
        return patch
    if kind == "adalora":
        return AdaLoRAPatch(target, name, {k: t[k] for k in ("up", "down", "E")}, float(module_cfg.get("lora_alpha", 0)),
                            ranknum=module_cfg.get("init_r"), alpha_known="lora_alpha" in module_cfg)
    if kind == "loha":
        return LoHaPatch(target, name, {k: v for k, v in t.items() if k.startswith("hada_")}, alpha=alpha)
    if kind == "lokr":
        patch = LoKrPatch(target, name, {k: v for k, v in t.items() if k.startswith("lokr_")}, alpha=alpha)
        rank = _config_rank(cfg, name)
        if patch.rank is None and alpha is not None and "alpha" not in t and rank:
            patch._scale = alpha / rank  # PEFT keeps alpha / r even when both factors are whole
        return patch
    raise AssertionError(kind)


def with_dora(file: AdapterFile, mod: ModuleKeys, patch: Patch, t: dict, rows=None, parts: int = 1) -> Patch:
    """``patch`` with the module's DoRA magnitude when it has one (else ``patch``). On one of the ``parts`` of a
    fused module (``rows``: its output rows), that part's rows of a per-output-row magnitude, which splits exactly
    (each row's norm is its own); one per input channel spans every part's rows and is refused (on a module whose
    rows are only reordered, one part, it stays whole: a column's norm does not depend on the rows' order)."""
    if not mod.dora:
        return patch
    magnitude = t["dora_scale"]
    side = mod.dora_side or orientation(mod.shapes["dora_scale"])
    if rows is not None and (side == ROW or parts > 1):
        if side != ROW:
            _refuse(file, mod, "dora_scale", f"a DoRA magnitude per input channel {tuple(mod.shapes['dora_scale'])} "
                                             f"on the fused module {mod.name} does not split onto its parts (each "
                                             "part's norm would need every part's rows); only one per output row does")
        from .transformer_keys import _slice_rows

        # PEFT's conv magnitude is (1, out, 1, 1): its rows are along its one long dimension
        magnitude = _slice_rows(magnitude.reshape(-1) if mod.dora_side else magnitude, rows)
    return DoRAPatch(patch, magnitude, mod.dora_side)


BIAS_ROLES = ("diff_b", "b_norm")  # a bias's difference, beside any kind of weight patch


def _diff_patches(target: str, name: str, t: dict, roles: dict[str, str]) -> list[Patch]:
    out = []
    for role, param in (("diff", "weight"), ("w_norm", "weight"), ("diff_b", "bias"), ("b_norm", "bias")):
        if role in t:
            patch = DiffPatch(target, name, {"diff": t[role]}, param=param)
            patch.file_keys = {"diff": roles[role]}
            out.append(patch)
    return out


# ---------------------------------------------------------------------------------------------
# structure: every module's tensors checked from the header shapes, before any tensor is used
# ---------------------------------------------------------------------------------------------
def _refuse(file: AdapterFile, mod: ModuleKeys, role: str, problem: str):
    raise AdapterError(file.path, problem, mod.roles[role])


def _dims(file, mod, role: str, allowed: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The role's shape; refused unless it has one of the ``allowed`` numbers of dimensions."""
    shape = tuple(mod.shapes[role])
    if len(shape) not in allowed:
        wanted = " or ".join(f"{n}-D" for n in allowed)
        _refuse(file, mod, role, f"{what} must be {wanted}, not {len(shape)}-D {shape}")
    return shape


def _require(file, mod, present: str, needed: tuple[str, ...], what: str) -> None:
    missing = [r for r in needed if r not in mod.roles]
    if missing:
        _refuse(file, mod, present, f"{what} has {present} but no {' / '.join(missing)}")


def _rank(file, mod, role: str, rank: int, what: str) -> None:
    if rank <= 0:
        _refuse(file, mod, role, f"{what} has rank 0 (an empty factor {tuple(mod.shapes[role])})")


def _agree(file, mod, role: str, ok: bool, problem: str) -> None:
    if not ok:
        _refuse(file, mod, role, problem)


def _check_lora(file, mod) -> None:
    """kohya / PEFT / diffusers LoRA and LoCon: ``up`` (out, r[,1,1]) @ ``down`` (r, in[,kh,kw]); with a
    CP core ``mid`` (r, r, kh, kw) and a 1x1 ``down``."""
    _require(file, mod, "down", ("up",), "a LoRA module")
    down = _dims(file, mod, "down", (2, 4), "a LoRA down")
    up = _dims(file, mod, "up", (2, 4), "a LoRA up")
    _rank(file, mod, "down", down[0], "a LoRA module")
    up_rank = math.prod(up[1:])
    if "mid" not in mod.roles:
        _agree(file, mod, "up", up_rank == down[0],
               f"LoRA up {up} has rank {up_rank}, its down {down} rank {down[0]}")
        return
    mid = _dims(file, mod, "mid", (4,), "a LoRA mid (CP core)")
    _agree(file, mod, "mid", mid[0] == up_rank and mid[1] == down[0],
           f"LoRA mid {mid} does not chain up rank {up_rank} to down rank {down[0]}")
    _agree(file, mod, "down", math.prod(down[2:]) == 1, f"a LoRA down with a mid must be 1x1, not {down}")


def _check_adalora(file, mod) -> None:
    """PEFT AdaLoRA: ``lora_B`` (out, r) @ (``lora_A`` (r, in) * ``lora_E`` (r, 1)). Rank 0 is a valid,
    empty module (PEFT allows ``r == 0`` for AdaLoRA: its rank allocator prunes whole modules)."""
    _require(file, mod, "E", ("up", "down"), "an AdaLoRA module")
    up, down = _dims(file, mod, "up", (2,), "an AdaLoRA lora_B"), _dims(file, mod, "down", (2,), "an AdaLoRA lora_A")
    e = tuple(mod.shapes["E"])
    _agree(file, mod, "up", up[1] == down[0], f"AdaLoRA lora_B {up} has rank {up[1]}, lora_A {down} rank {down[0]}")
    _agree(file, mod, "E", len(e) in (1, 2) and e[0] == down[0] and math.prod(e) == down[0],
           f"AdaLoRA lora_E {e} does not fit rank {down[0]}")


def _low_rank(file, mod, a: str, b: str, what: str) -> tuple[tuple, tuple]:
    """Two 2-D factors ``a`` (m, r) @ ``b`` (r, n) with the same r > 0."""
    sa, sb = _dims(file, mod, a, (2,), f"{what} {a}"), _dims(file, mod, b, (2,), f"{what} {b}")
    _rank(file, mod, b, sb[0], f"{what} module")
    _agree(file, mod, b, sa[1] == sb[0], f"{what} {a} {sa} has rank {sa[1]}, {b} {sb} rank {sb[0]}")
    return sa, sb


def _tucker(file, mod, core: str, a: str, b: str, what: str) -> tuple[int, ...]:
    """LyCORIS' CP rebuild ``einsum('ijkl,jr,ip->prkl', core, b, a)``: ``a`` (i, out), ``b`` (j, in);
    returns the rebuilt shape."""
    sc = _dims(file, mod, core, (4,), f"{what} {core}")
    sa, sb = _dims(file, mod, a, (2,), f"{what} {a}"), _dims(file, mod, b, (2,), f"{what} {b}")
    _rank(file, mod, b, sb[0], f"{what} module")
    _agree(file, mod, core, sc[0] == sa[0] and sc[1] == sb[0],
           f"{what} {core} {sc} does not chain {a} rank {sa[0]} and {b} rank {sb[0]}")
    return (sa[1], sb[1], *sc[2:])


def _check_loha(file, mod) -> None:
    """LyCORIS LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``, or two CP rebuilds with ``hada_t1`` / ``hada_t2``;
    both halves of the same shape."""
    for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):  # name the half-present pair's part
        present = a if a in mod.roles else b if b in mod.roles else "hada_w1_a"
        _require(file, mod, present, (a, b), "a LoHa module")
    if ("hada_t1" in mod.roles) != ("hada_t2" in mod.roles):
        present = "hada_t1" if "hada_t1" in mod.roles else "hada_t2"
        _require(file, mod, present, ("hada_t1", "hada_t2"), "a LoHa CP module")
    if "hada_t1" in mod.roles:
        one = _tucker(file, mod, "hada_t1", "hada_w1_a", "hada_w1_b", "LoHa")
        two = _tucker(file, mod, "hada_t2", "hada_w2_a", "hada_w2_b", "LoHa")
    else:
        (o1, _), (_, i1) = _low_rank(file, mod, "hada_w1_a", "hada_w1_b", "LoHa")
        (o2, _), (_, i2) = _low_rank(file, mod, "hada_w2_a", "hada_w2_b", "LoHa")
        one, two = (o1, i1), (o2, i2)
    _agree(file, mod, "hada_w2_a", one == two, f"LoHa halves differ in shape: {one} and {two}")


def _check_lokr(file, mod) -> None:
    """LyCORIS LoKr: ``kron(W1, W2)``; W1 whole (2-D) or ``w1_a @ w1_b``, W2 whole (2-D or 4-D),
    ``w2_a @ w2_b`` or a CP rebuild with ``lokr_t2`` (LyCORIS' ``diff_weight`` prefers a whole factor)."""
    first = next(r for r in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
                 if r in mod.roles)
    if "lokr_w1" in mod.roles:
        _dims(file, mod, "lokr_w1", (2,), "a LoKr lokr_w1")
    else:
        _require(file, mod, first, ("lokr_w1_a", "lokr_w1_b"), "a LoKr module without lokr_w1")
        _low_rank(file, mod, "lokr_w1_a", "lokr_w1_b", "LoKr")
    if "lokr_w2" in mod.roles:
        _dims(file, mod, "lokr_w2", (2, 4), "a LoKr lokr_w2")
        return
    present = "lokr_w2_a" if "lokr_w2_a" in mod.roles else "lokr_w2_b" if "lokr_w2_b" in mod.roles else first
    _require(file, mod, present, ("lokr_w2_a", "lokr_w2_b"), "a LoKr module without lokr_w2")
    if "lokr_t2" in mod.roles:
        _tucker(file, mod, "lokr_t2", "lokr_w2_a", "lokr_w2_b", "LoKr")
    else:
        _low_rank(file, mod, "lokr_w2_a", "lokr_w2_b", "LoKr")


def _check_dora(file, mod) -> None:
    """A DoRA magnitude: beside a LoRA, LoCon, LoHa or LoKr; ``(out,)``, ``(out, 1, ...)`` or ``(1, in, ...)``;
    where the factors tell the weight's rows and input width (a LoRA), of that size."""
    shape = tuple(mod.shapes["dora_scale"])
    if mod.kind not in ("lora", "loha", "lokr"):
        _refuse(file, mod, "dora_scale", f"a DoRA magnitude on a {mod.kind} module is not supported")
    side = mod.dora_side or orientation(shape)
    if side is None:
        _refuse(file, mod, "dora_scale", f"a DoRA magnitude must be (out,), (out, 1, ...) or (1, in, ...), not {shape}")
    if mod.kind == "lora":
        rows, width = mod.shapes["up"][0], mod.shapes["down"][1]
        _agree(file, mod, "dora_scale", math.prod(shape) == (rows if side == ROW else width),
               f"DoRA magnitude {shape} fits neither the {rows} output rows nor the {width} input channels of "
               "its LoRA")


CHECKS = {"lora": _check_lora, "adalora": _check_adalora, "loha": _check_loha, "lokr": _check_lokr}

# What a tensor that joined no module was missing (``keys.group_keys`` drops modules of no kind).
ORPHAN_NEEDS = {"up": "down", "mid": "down", "E": "lora_A", "emb_up": "lora_embedding_A"}


def check_structure(file: AdapterFile, grouped: Grouped) -> None:
    """Refuse, from the header shapes alone, a file whose tensors cannot make a delta: an alpha that is
    not one number, factors of the wrong number of dimensions, rank 0, ranks or factor shapes that do
    not chain, a module missing a part, or a part whose module is missing (an up without its down)."""
    for mod in grouped.modules.values():
        if "alpha" in mod.roles and math.prod(mod.shapes["alpha"]) != 1:
            _refuse(file, mod, "alpha", f"alpha must be one number, not shape {tuple(mod.shapes['alpha'])}")
        check = CHECKS.get(mod.kind)
        if check is not None:
            check(file, mod)
        if mod.dora:
            _check_dora(file, mod)
    _refuse_orphans(file, grouped)


def _refuse_orphans(file: AdapterFile, grouped: Grouped) -> None:
    for key in file.keys:
        split = split_key(key)
        if split is None or split[0] in grouped.modules or key.startswith("bundle_emb."):
            continue
        name, role = split
        if role in ("alpha", "ranknum", "rescale"):  # a scale alone is no module
            continue
        needs = ORPHAN_NEEDS.get(role) or ("hada_w1_a" if role.startswith("hada_") else
                                           "lokr_w1 or lokr_w1_a" if role.startswith("lokr_") else "its factors")
        raise AdapterError(file.path, f"{role} of module {name} has no {needs} beside it", key)


def build_patches(file: AdapterFile, grouped: Grouped) -> tuple[dict[str, Patch], dict]:
    """All patches by target, and the refused variants found (kind -> count and first key).

    The structure is checked first (:func:`check_structure`): the patches' math may assume it."""
    check_structure(file, grouped)
    cfg = peft_config(file)
    keys = [k for m in grouped.modules.values() for k in m.roles.values()]
    tensors = file.tensors(keys)
    patches: dict[str, Patch] = {}
    refused: dict[str, dict] = {}
    for name, mod in grouped.modules.items():
        kind = mod.kind
        if kind in REFUSED:
            entry = refused.setdefault(kind, {"label": REFUSED[kind], "count": 0, "first_key": next(iter(mod.roles.values()))})
            entry["count"] += 1
            continue
        t = {role: tensors[key] for role, key in mod.roles.items()}
        target = canonical(name)
        if kind in ("diff", "norm"):
            new = _diff_patches(target, name, t, mod.roles)
        else:
            alpha = float(t["alpha"].float().item()) if "alpha" in t else _config_alpha(cfg, name)[0]
            new = [with_dora(file, mod, _make_patch(kind, target, name, t, alpha, cfg), t)]
            new[0].file_keys = {r: k for r, k in mod.roles.items() if r not in BIAS_ROLES}  # to name a bad tensor
            # a bias difference beside it (ComfyUI's trainer / extract node, LyCORIS): the module's bias
            new += _diff_patches(target, name, {r: t[r] for r in BIAS_ROLES if r in t}, mod.roles)
        for patch in new:
            key = patch.target if patch.param == "weight" else f"{patch.target}#{patch.param}"
            if key in patches:
                raise AdapterError(file.path, f"two modules target {key}", name)
            patches[key] = patch
    if grouped.bundled:
        refused["bundle_emb"] = {"label": REFUSED["bundle_emb"], "count": len(grouped.bundled),
                                 "first_key": grouped.bundled[0]}
    return patches, refused


def detect_base(file: AdapterFile, grouped: Grouped) -> str:
    """sd1/sd2/sdxl (or tiny-*) from shapes first (UNet context width, text widths), metadata second."""
    te_width = te2_width = None
    for name, mod in grouped.modules.items():
        target, width = canonical(name), _input_width(mod)
        if width is None:
            continue
        if target.startswith("unet.") and target.endswith(("attn2.to_k", "attn2.to_v")) and width in CONTEXT_WIDTH:
            return CONTEXT_WIDTH[width]
        if target.endswith("self_attn.q_proj"):
            if target.startswith("text_encoder_2."):
                te2_width = width
            elif target.startswith("text_encoder."):
                te_width = width
    names = list(grouped.modules)
    if te2_width or any(n.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in n for n in names):
        return TEXT2_WIDTH.get(te2_width, "sdxl")
    if te_width in TEXT_WIDTH:
        return TEXT_WIDTH[te_width]
    return arch_from_metadata(file.metadata)


def _input_width(mod) -> int | None:
    s = mod.shapes
    if "down" in s and "mid" not in s:
        return s["down"][1]
    if "hada_w1_b" in s and "hada_t1" not in s:
        return s["hada_w1_b"][1]
    if "lokr_w1" in s or "lokr_w1_b" in s:
        m = s["lokr_w1"][1] if "lokr_w1" in s else s["lokr_w1_b"][1]
        n = s["lokr_w2"][1] if "lokr_w2" in s else s.get("lokr_w2_b", (0, 0))[1]
        return m * n if "lokr_t2" not in s else None
    return None


NON_SD_HINTS = (
    ("flux", ("single_transformer_blocks", "double_blocks", "single_blocks")),
    ("llm", (".h.", "model.layers.", "lm_head", "self_attn.o_proj", "c_attn", "mlp.gate_proj")),
)


def family_of(grouped: Grouped) -> str:
    """stable-diffusion unless the modules name another model family (Flux, an LLM, a toy model)."""
    targets = [canonical(n) for n in grouped.modules]
    if targets and all(not t.startswith("?.") for t in targets):
        return "stable-diffusion"
    joined = " ".join(targets)
    for family, needles in NON_SD_HINTS:
        if any(n in joined for n in needles):
            return family
    return "other"


def parse(file: AdapterFile, adapter_type: str | None = None) -> Adapter:
    grouped = group_keys(file.keys)
    if not grouped.modules:
        raise AdapterError(file.path, "no LoRA-family tensors found")
    kind = adapter_type or adapter_type_of(grouped)
    _refuse_control_dora(file, grouped)
    transformer = parse_transformer(file, grouped, kind, layout_of(file, grouped, kind))  # Flux / SD3 tables
    if transformer is not None:
        transformer.extra.update(refused={}, kinds=kind_counts(grouped), stray_keys=grouped.stray,
                                 dora=_dora_count(grouped))
        return transformer
    family = family_of(grouped)
    patches, refused = build_patches(file, grouped)
    adapter = Adapter(type=kind, format=layout_of(file, grouped, kind), patches=patches,
                      metadata=dict(file.metadata), path=file.path, file=file,
                      base=detect_base(file, grouped) if family == "stable-diffusion" else "unknown",
                      family=family)
    adapter.extra["refused"] = refused
    adapter.extra["kinds"] = kind_counts(grouped)
    adapter.extra["stray_keys"] = grouped.stray
    adapter.extra["dora"] = _dora_count(grouped)
    return adapter


def _refuse_control_dora(file: AdapterFile, grouped: Grouped) -> None:
    """A Flux control LoRA's reader (:mod:`.flux_control`) splits plain LoRA pairs: a DoRA magnitude there is
    refused by name rather than lost."""
    dora = next((m for m in grouped.modules.values() if m.dora), None)
    if dora is None:
        return
    from .flux_control import is_control

    if is_control(grouped):
        raise AdapterError(file.path, "a DoRA magnitude in a Flux control LoRA is not supported",
                           dora.roles["dora_scale"])


def _dora_count(grouped: Grouped) -> int:
    """How many of the file's modules carry a DoRA magnitude."""
    return sum(1 for m in grouped.modules.values() if m.dora)


def summary(adapter: Adapter) -> dict:
    """rank (largest), alpha (most common), ranks, per-component counts, refused variants."""
    ranks = [p.rank for p in adapter.patches.values() if getattr(p, "rank", None)]
    alphas = [p.alpha for p in adapter.patches.values() if getattr(p, "alpha", None) is not None]
    components = Counter(t.split(".", 1)[0] for t in adapter.patches)
    facts = {
        "rank": max(ranks) if ranks else None,
        "alpha": Counter(alphas).most_common(1)[0][0] if alphas else None,
        "ranks": sorted(set(ranks)),
        "alphas": sorted(set(alphas)),
        "conv_kxk_targets": sum(1 for p in adapter.patches.values() if p.is_conv_kxk),
        "components": dict(components),
        "kinds": adapter.extra.get("kinds", {}),
    }
    unknown = [p for p in adapter.patches.values() if getattr(p, "kind", None) == "adalora" and p.alpha is None]
    if unknown:  # PEFT keeps lora_alpha in adapter_config.json only
        facts["alpha_note"] = (f"unknown for {len(unknown)} modules: no adapter_config.json beside the weights "
                               "(merged as PEFT merges lora_alpha 0: scaling r)")
    dora = [p for p in adapter.patches.values() if isinstance(p, DoRAPatch)]
    if dora:  # the type stays the inner one's; the magnitude is a fact of the modules
        sides = sorted({p.orientation or "unknown" for p in dora})
        facts["dora"] = True
        facts["decomposition"] = f"DoRA on {adapter.extra.get('dora') or len(dora)} modules (magnitude per " \
                                 f"{' / '.join(sides)})"
    if adapter.extra.get("refused"):
        facts["unsupported"] = adapter.extra["refused"]
    if adapter.extra.get("stray_keys"):
        facts["other_keys"] = len(adapter.extra["stray_keys"])
    bad = nonfinite_keys(adapter)
    if bad:
        facts["non_finite"] = {"tensors": len(bad), "first_key": bad[0]}
    return facts


def nonfinite_keys(adapter: Adapter) -> list[str]:
    """The file keys of every tensor (or alpha) holding NaN / Inf, in file order; merging or attaching
    such a file is refused (:func:`adapterhub.weights.check_finite`), inspect reports them."""
    from adapterhub.finite import nonfinite_parts

    found = {key for patch in adapter.patches.values() for key, _ in nonfinite_parts(patch)}
    order = {k: i for i, k in enumerate(adapter.file.keys)} if adapter.file is not None else {}
    return sorted(found, key=lambda k: (order.get(k, len(order)), k))


def refuse_if_unsupported(adapter: Adapter) -> None:
    """Never merge a variant silently wrong: name the first refused one."""
    for kind, entry in (adapter.extra.get("refused") or {}).items():
        raise AdapterError(adapter.path, f"{entry['label']} is not supported for merging or attaching "
                                         f"({entry['count']} modules)", entry["first_key"])
