"""Key tables of the LoRA family: tensor-name suffix -> role, module kinds, layouts.

A key is ``<module name><suffix>``. ``SUFFIXES`` is checked longest first. The module name is then
translated by :func:`adapterhub.keymaps.canonical`; nothing here knows about block names.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from adapterhub.io import AdapterFile, TensorInfo

from .dora import ROW  # torch-free, as these tables are

SUFFIXES: dict[str, str] = {
    # kohya / LyCORIS LoRA and LoCon
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    # PEFT / diffusers (current)
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A": "down", ".lora_B": "up",
    # diffusers LoRACompatible and attention processors, old text-encoder layers
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
    # AdaLoRA
    ".lora_E": "E", ".ranknum": "ranknum",
    # LoHa
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    # LoKr
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b", ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t1": "lokr_t1", ".lokr_t2": "lokr_t2",
    # full diffs and norms (LyCORIS full / train_norm)
    ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "w_norm", ".b_norm": "b_norm",
    # DoRA's magnitude beside any of the above (kohya / LyCORIS / OneTrainer; PEFT ``use_dora``)
    ".dora_scale": "dora_scale", ".lora_magnitude_vector": "dora_scale",
    ".lora_magnitude_vector.weight": "dora_scale",
    # variants we recognise and refuse by name
    ".oft_blocks": "oft_blocks", ".oft_diag": "oft_blocks", ".rescale": "rescale",
    ".on_input": "on_input", ".ia3_l": "on_input", ".a1.weight": "glora", ".a2.weight": "glora", ".b1.weight": "glora",
    ".b2.weight": "glora", ".bm.weight": "glora",
    ".lora_embedding_A": "emb_down", ".lora_embedding_B": "emb_up",
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# Roles that make a module of each kind, checked in order (first match wins), and kinds we refuse.
KINDS: tuple[tuple[str, str], ...] = (
    ("oft_blocks", "oft"), ("on_input", "ia3"), ("glora", "glora"), ("emb_down", "embedding-lora"),
    ("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("E", "adalora"),
    ("down", "lora"), ("diff", "diff"), ("diff_b", "diff"), ("w_norm", "norm"), ("b_norm", "norm"),
)
REFUSED = {
    "oft": "OFT/BOFT (oft_blocks)", "ia3": "(IA)^3 (on_input)", "glora": "GLoRA (a1/a2/b1/b2)",
    "embedding-lora": "embedding LoRA (lora_embedding_A/B)",
    "bundle_emb": "embeddings bundled in a LoRA (bundle_emb.*)",
}
# lora_te3_: sd-scripts' T5 encoder of Flux and SD3 (a file with it is as much kohya's as one without)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


# XLabs' Flux attention-processor LoRAs (``double_blocks.0.processor.qkv_lora1.down.weight``): the module
# name keeps ``qkv_lora1`` / ``qkv_lora2`` apart (a suffix table would fold both into ``qkv``)
_XLABS = re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")


def split_key(key: str) -> tuple[str, str] | None:
    """``module.lora_down.weight`` -> (``module``, ``down``); None if no LoRA-family suffix."""
    xlabs = _XLABS.match(key)
    if xlabs is not None:
        return xlabs[1], xlabs[2]
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


@dataclass
class ModuleKeys:
    name: str
    roles: dict[str, str] = field(default_factory=dict)  # role -> full key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # role -> shape

    @property
    def kind(self) -> str | None:
        """The module's kind from its roles; a DoRA magnitude (:attr:`dora`) does not change it."""
        for role, kind in KINDS:
            if role in self.roles:
                return kind
        return None

    @property
    def dora(self) -> bool:
        """Whether the module carries a DoRA magnitude (``dora_scale`` / ``lora_magnitude_vector``)."""
        return "dora_scale" in self.roles

    @property
    def dora_side(self) -> str | None:
        """Per output row (``dora.ROW``) for PEFT's ``lora_magnitude_vector`` whatever its shape (``(out,)``, a conv's
        ``(1, out, 1, 1)``); None where the magnitude's shape tells it (kohya / LyCORIS ``dora_scale``)."""
        key = self.roles.get("dora_scale", "")
        return ROW if key.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")) else None


@dataclass
class Grouped:
    modules: dict[str, ModuleKeys]
    stray: list[str]  # tensor keys that belong to no LoRA-family module
    bundled: list[str]  # bundle_emb.* keys


def group_keys(keys: dict[str, TensorInfo]) -> Grouped:
    modules: dict[str, ModuleKeys] = {}
    stray, bundled = [], []
    for key, info in keys.items():
        if key.startswith("bundle_emb."):
            bundled.append(key)
            continue
        split = split_key(key)
        if split is None:
            stray.append(key)
            continue
        name, role = split
        mod = modules.setdefault(name, ModuleKeys(name))
        mod.roles[role] = key
        mod.shapes[role] = info.shape
    # a lone "alpha" or "rescale" without weights is not a module
    modules = {n: m for n, m in modules.items() if m.kind is not None}
    return Grouped(modules, stray, bundled)


def kind_counts(grouped: Grouped) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for m in grouped.modules.values():
        counts[m.kind] += 1
    return dict(counts)


def is_conv_kxk(mod: ModuleKeys) -> bool:
    down = mod.shapes.get("down")
    if "mid" in mod.roles or "hada_t1" in mod.roles or "lokr_t2" in mod.roles:
        return True
    if down is not None and len(down) == 4 and (down[2] > 1 or down[3] > 1):
        return True
    return False


def adapter_type_of(grouped: Grouped) -> str:
    """lora (linear and 1x1 only), locon (a kxk conv targeted), loha, lokr, adalora; or, when every
    module is a variant we refuse, that variant's name (ia3, oft, glora). A DoRA magnitude changes no type."""
    kinds = set(kind_counts(grouped))
    if kinds and kinds <= set(REFUSED):
        return sorted(kinds)[0]
    for special in ("loha", "lokr", "adalora"):
        if special in kinds:
            return special
    if any(is_conv_kxk(m) for m in grouped.modules.values()):
        return "locon"
    return "lora"


def layout_of(file: AdapterFile, grouped: Grouped, adapter_type: str) -> str:
    """kohya, lycoris, diffusers, diffusers-attnproc or peft; for Flux / SD3 also xlabs, comfyui, onetrainer and
    bfl-control."""
    from .transformer_keys import transformer_layout  # here: that module imports this one

    named = transformer_layout(grouped)
    if named is not None:
        return named
    names = list(grouped.modules)
    keys = [k for m in grouped.modules.values() for k in m.roles.values()]
    # the old attention-processor files hold nothing else; ours (``save.diffusers_tensors``) add LoRACompatible
    # (``.lora.down``) and PEFT-named (``.lora_A``) modules and are the diffusers layout
    if any(".processor." in k and "_lora." in k for k in keys) and \
            not any(k.endswith((".lora.down.weight", ".lora_A.weight")) for k in keys):
        return "diffusers-attnproc"
    if names and (all(n.startswith("base_model.model.") for n in names) or file.extra.get("peft_components")):
        return "peft"  # a PEFT folder, or one per component (``unet/``, ``text_encoder/``: see ``adapterhub.io``)
    if names and all(n.startswith(KOHYA_PREFIXES) or n.startswith("lycoris_") for n in names):
        module = file.metadata.get("ss_network_module", "")
        if (adapter_type in ("loha", "lokr") or module.startswith("lycoris")
                or any(n.startswith("lycoris_") for n in names)
                or any("mid" in m.roles for m in grouped.modules.values())):
            return "lycoris"
        return "kohya"
    return "diffusers"
