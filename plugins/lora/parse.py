"""Parse any LoRA-family file (kohya, LyCORIS, diffusers old and new, PEFT, AdaLoRA) into patches."""
from __future__ import annotations

import json
import re
from collections import Counter

from adapterhub.archs import CONTEXT_WIDTH, TEXT2_WIDTH, TEXT_WIDTH, arch_from_metadata
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.keymaps import canonical
from adapterhub.types import Adapter, Patch

from .keys import REFUSED, Grouped, adapter_type_of, group_keys, kind_counts, layout_of
from .patches import AdaLoRAPatch, DiffPatch, LoHaPatch, LoKrPatch, LoRAPatch


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
                            ranknum=module_cfg.get("init_r"))
    if kind == "loha":
        return LoHaPatch(target, name, {k: v for k, v in t.items() if k.startswith("hada_")}, alpha=alpha)
    if kind == "lokr":
        patch = LoKrPatch(target, name, {k: v for k, v in t.items() if k.startswith("lokr_")}, alpha=alpha)
        rank = _config_rank(cfg, name)
        if patch.rank is None and alpha is not None and "alpha" not in t and rank:
            patch._scale = alpha / rank  # PEFT keeps alpha / r even when both factors are whole
        return patch
    raise AssertionError(kind)


def _diff_patches(target: str, name: str, t: dict) -> list[Patch]:
    out = []
    for role, param in (("diff", "weight"), ("w_norm", "weight"), ("diff_b", "bias"), ("b_norm", "bias")):
        if role in t:
            out.append(DiffPatch(target, name, {"diff": t[role]}, param=param))
    return out


def build_patches(file: AdapterFile, grouped: Grouped) -> tuple[dict[str, Patch], dict]:
    """All patches by target, and the refused variants found (kind -> count and first key)."""
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
            new = _diff_patches(target, name, t)
        else:
            alpha = float(t["alpha"].float().item()) if "alpha" in t else _config_alpha(cfg, name)[0]
            new = [_make_patch(kind, target, name, t, alpha, cfg)]
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
    family = family_of(grouped)
    patches, refused = build_patches(file, grouped)
    adapter = Adapter(type=kind, format=layout_of(file, grouped, kind), patches=patches,
                      metadata=dict(file.metadata), path=file.path, file=file,
                      base=detect_base(file, grouped) if family == "stable-diffusion" else "unknown",
                      family=family)
    adapter.extra["refused"] = refused
    adapter.extra["kinds"] = kind_counts(grouped)
    adapter.extra["stray_keys"] = grouped.stray
    return adapter


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
    if adapter.extra.get("refused"):
        facts["unsupported"] = adapter.extra["refused"]
    if adapter.extra.get("stray_keys"):
        facts["other_keys"] = len(adapter.extra["stray_keys"])
    return facts


def refuse_if_unsupported(adapter: Adapter) -> None:
    """Never merge a variant silently wrong: name the first refused one."""
    for kind, entry in (adapter.extra.get("refused") or {}).items():
        raise AdapterError(adapter.path, f"{entry['label']} is not supported for merging or attaching "
                                         f"({entry['count']} modules)", entry["first_key"])
