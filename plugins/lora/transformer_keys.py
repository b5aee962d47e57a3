"""LoRA files for the transformer families (FLUX.1, SD3 / SD3.5): names, fused-module splits, family and base.

Every layout is translated to one target naming, the diffusers module path under ``transformer.``
(``transformer.transformer_blocks.0.attn.to_q``), as the UNet layouts are translated to ``unet.``:

* diffusers / PEFT (Flux and SD3): ``transformer.<path>`` or ``base_model.model.<path>``: already it (also
  under ai-toolkit's ``diffusion_model.``, or bare);
* kohya sd-scripts Flux: ``lora_unet_double_blocks_0_img_attn_qkv``, BFL's module names joined by ``_`` (LyCORIS'
  own wrapper on BFL's model: the same under ``lycoris_``);
* ComfyUI-native Flux: ``diffusion_model.double_blocks.0.img_attn.qkv``, the same BFL names dotted;
* sd-scripts SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv``, SAI's MMDiT names joined by ``_``;
* XLabs Flux: ``double_blocks.0.processor.qkv_lora1`` (image qkv; ``qkv_lora2`` text, ``proj_lora1/2``);
* LyCORIS' wrapper (SimpleTuner) and OneTrainer: ``lycoris_`` / ``lora_transformer_`` + the diffusers
  path joined by ``_`` (``lycoris_transformer_blocks_0_attn_to_q``), decoded by the modules that exist.

Text encoders: ``lora_te1_`` / ``lora_te2_`` as for Stable Diffusion (the CLIP encoders), sd-scripts'
``lora_te3_`` and ComfyUI's ``text_encoders.t5xxl.transformer.`` on the family's T5 encoder.

BFL fuses modules diffusers keeps apart: ``img_attn.qkv`` (to_q, to_k, to_v), ``txt_attn.qkv``
(add_q/k/v_proj) and a single block's ``linear1`` (to_q, to_k, to_v, proj_mlp); SAI's ``attn.qkv`` the
same three (``context_block``: add_q/k/v_proj). A LoRA on a fused module is ``up @ down`` with ``up``
stacked by output rows, so it splits exactly into one LoRA per diffusers module: the shared ``down``
and that module's rows of ``up`` (diffusers' own kohya converter does the same). When ``up`` is
block-diagonal (separate LoRAs stacked, as sd-scripts' converters and our writer join them), each part
keeps only its own block of ranks, as diffusers' converter does. The split sizes come from the shapes
alone: a fused module's input is the hidden width ``h``; qkv is three ``h``, linear1 three ``h`` and
the MLP's rest. BFL's and SAI's final
modulation emits (shift, scale) where diffusers' ``norm_out`` emits (scale, shift): its rows are
swapped (and those of SD3's last context modulation, see :func:`is_swapped`).

Family and base come from tensor shapes first (the hidden width, see :data:`HIDDEN_WIDTH`), names
second (only Flux has single-stream blocks), metadata last.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.keymaps import canonical
from adapterhub.transformer_bases import BASE_WIDTHS, WIDTH_BASES
from adapterhub.types import Adapter

from .fused import row_patches
from .keys import Grouped, ModuleKeys

TRANSFORMER_FAMILIES = ("flux", "sd3")

HIDDEN_WIDTH = WIDTH_BASES  # hidden width -> (family, base); the tiny bases have widths of their own
# diffusers modules whose input width is a multiple of the hidden width, in both families: (pattern, multiple)
_HIDDEN_INPUT = (
    (re.compile(r"(attn2?\.(to_[qkv]|add_[qkv]_proj)|ff(_context)?\.net\.0\.proj|norm1?(_context)?\.linear|"
                r"proj_mlp|attn2?\.to_out\.0|attn\.to_add_out)$"), 1),
    (re.compile(r"ff(_context)?\.net\.2$"), 4),  # the MLP's output: 4 x hidden in
    (re.compile(r"single_transformer_blocks\.\d+\.proj_out$"), 5),  # attention + MLP, concatenated
)
# first parts of the diffusers paths inside the two transformers
TRANSFORMER_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "time_text_embed", "norm_out", "proj_out", "pos_embed")
METADATA_FAMILY = (("ss_base_model_version", "flux", "flux"), ("ss_base_model_version", "sd3", "sd3"),
                   ("modelspec.architecture", "flux", "flux"), ("modelspec.architecture", "stable-diffusion-3", "sd3"))

# BFL module (underscore-joined, after the block number) -> diffusers modules, for Flux's blocks
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation_lin": ("norm.linear",)}
TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# SD3's reference (SAI MMDiT) module (underscore-joined, after ``joint_blocks_N_``) -> diffusers modules
JOINT = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block_attn_proj": ("attn.to_out.0",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block_attn_proj": ("attn.to_add_out",), "context_block_mlp_fc1": ("ff_context.net.0.proj",),
    "context_block_mlp_fc2": ("ff_context.net.2",), "context_block_adaLN_modulation_1": ("norm1_context.linear",),
}
SD3_TOP = {
    "x_embedder_proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}
SWAPPED = ("norm_out.linear",)  # BFL / SAI (shift, scale) -> diffusers (scale, shift)
# ``lycoris_``: LyCORIS' own wrapper on BFL's model; its names of diffusers paths fall through to diffusers_target
BFL_PREFIXES = ("lora_unet_", "diffusion_model.", "lora_transformer_", "lycoris_")
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)$")
_JOINT_BLOCK = re.compile(r"joint_blocks_(\d+)_(.+)$")
SD3_ONLY = ("joint_blocks_", "t_embedder_", "y_embedder_", "x_embedder_proj")  # SAI names Flux does not have
# XLabs (x-flux attention processors): a single block's qkv LoRA holds q, k, v only (not the MLP)
XLABS = {"double": {"qkv_lora1": DOUBLE["img_attn_qkv"], "qkv_lora2": DOUBLE["txt_attn_qkv"],
                    "proj_lora1": ("attn.to_out.0",), "proj_lora2": ("attn.to_add_out",)},
         "single": {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}}
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)$")
# diffusers paths joined by ``_`` (LyCORIS' wrapper: ``lycoris_``; OneTrainer / diffusers' "mixture":
# ``lora_transformer_``), decoded by the module names the two transformers have
UNDERSCORED_PREFIXES = ("lycoris_", "lora_transformer_")
_BLOCK_TAILS = {t.replace(".", "_"): t for table in (DOUBLE, SINGLE, JOINT) for parts in table.values() for t in parts}
_TOP_PATHS = {p.replace(".", "_"): p for p in (*TOP.values(), *SD3_TOP.values())}
# sd-scripts' T5 modules (``lora_te3_`` + the T5EncoderModel path joined by ``_``) on each family's T5 encoder
T5_COMPONENT = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
T5_PREFIX = "lora_te3_"
_T5 = re.compile(r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi|wi_0|wi_1|wo)$")
# ComfyUI's own text-encoder names: its model's prefix + the transformers module path
COMFY_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                       "text_encoders.clip_g.transformer.": "text_encoder_2", "text_encoders.t5xxl.transformer.": "t5"}
_UNDERSCORED_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")


@dataclass(frozen=True)
class Piece:
    """One diffusers module a file module patches: its target and the rows of ``up`` it takes
    (``rows`` None: all of them; else ``(start, stop)`` ranges concatenated in order)."""

    target: str
    rows: tuple[tuple[int, int], ...] | None = None


def bfl_targets(name: str) -> tuple[str, ...] | None:
    """The diffusers paths (under ``transformer.``) a module name in the original model's names stands for:
    kohya / ComfyUI Flux (BFL's names), sd-scripts SD3 (SAI's MMDiT names) or XLabs' processors."""
    xlabs = _XLABS.match(name)
    if xlabs is not None:
        found = XLABS[xlabs[1]].get(xlabs[3])
        root = "transformer_blocks" if xlabs[1] == "double" else "single_transformer_blocks"
        return tuple(f"{root}.{xlabs[2]}.{t}" for t in found) if found else None
    prefix = next((p for p in BFL_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return None
    rest = name[len(prefix):].replace(".", "_")
    m = _BLOCK.match(rest)
    if m is None:
        joint = _JOINT_BLOCK.match(rest)
        if joint is not None:
            found = JOINT.get(joint[2])
            return tuple(f"transformer_blocks.{joint[1]}.{t}" for t in found) if found else None
        top = TOP.get(rest) or SD3_TOP.get(rest)
        return (top,) if top else None
    table, root = (DOUBLE, "transformer_blocks") if m[1] == "double" else (SINGLE, "single_transformer_blocks")
    found = table.get(m[3])
    return tuple(f"{root}.{m[2]}.{t}" for t in found) if found else None


def diffusers_target(name: str) -> str | None:
    """The diffusers path of a diffusers / PEFT transformer module name (or one joined by ``_``), or None."""
    for prefix in UNDERSCORED_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            block = _UNDERSCORED_BLOCK.match(rest)
            if block is None:
                return _TOP_PATHS.get(rest)
            tail = _BLOCK_TAILS.get(block[3])
            return f"{block[1]}.{block[2]}.{tail}" if tail else None
    # ai-toolkit's ComfyUI prefix (``diffusion_model.``) and bare paths (ComfyUI reads them) last: a
    # Stable Diffusion UNet has none of these roots
    for prefix in ("base_model.model.transformer.", "base_model.model.", "transformer.", "diffusion_model.", ""):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.split(".", 1)[0] in TRANSFORMER_ROOTS:
                return rest
    return None


def t5_path(name: str) -> str | None:
    """The T5 encoder path of a ``lora_te3_`` module name (``encoder.block.0.layer.0.SelfAttention.q``), or None."""
    m = _T5.match(name)
    return f"encoder.block.{m[1]}.layer.{m[2]}.{m[3]}.{m[4]}" if m else None


def text_encoder_target(name: str, family: str) -> str:
    """The text-encoder target of a non-transformer module name: sd-scripts' ``lora_te3_`` (T5) and ComfyUI's
    ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` names on the family's encoders, else the Stable
    Diffusion translation (``lora_te1_`` ...)."""
    t5 = t5_path(name)
    if t5:
        return f"{T5_COMPONENT[family]}.{t5}"
    for prefix, component in COMFY_TEXT_ENCODERS.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return f"{T5_COMPONENT[family]}.{rest}" if component == "t5" else canonical(f"{component}.{rest}")
    return canonical(name)


def pieces_of(mod: ModuleKeys) -> list[Piece] | None:
    """The diffusers modules ``mod`` patches (fused ones split by rows), or None if it is no
    transformer module. Row splits use the header shapes only."""
    fused = bfl_targets(mod.name)
    if fused is None:
        plain = diffusers_target(mod.name)
        return [Piece(f"transformer.{plain}")] if plain else None
    targets = [f"transformer.{t}" for t in fused]
    if len(targets) == 1 and not is_swapped(fused[0], _out_features(mod), _in_features(mod)):
        return [Piece(targets[0])]
    rows, width = _out_rows(mod), _in_width(mod)
    if (rows is None or width is None) and splits_by_rows(mod):
        rows, width = _out_features(mod), _in_features(mod)
    if rows is None or width is None:
        return None  # neither a low-rank LoRA nor a 2-D LoKr / LoHa / diff: refused by the caller by name
    if len(targets) == 1:
        half = rows // 2
        return [Piece(targets[0], ((half, rows), (0, half)))]
    sizes = [width] * 3 + ([rows - 3 * width] if len(targets) == 4 else [])
    if len(targets) == 3:
        sizes = [rows // 3] * 3
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return [Piece(t, (b,)) for t, b in zip(targets, bounds)]


def is_swapped(target: str, rows: int | None, width: int | None) -> bool:
    """Whether the original model holds ``target``'s rows as (shift, scale) where diffusers holds (scale,
    shift): the final modulation, and SD3's last context modulation, which alone emits only those two
    (``2 x`` its input width rows; the others emit six)."""
    if target in SWAPPED:
        return True
    return target.endswith("norm1_context.linear") and rows is not None and width is not None and rows == 2 * width


def splits_by_rows(mod: ModuleKeys) -> bool:
    """Whether a module of another kind than LoRA can patch a fused module by rows (:mod:`.fused`): a LoKr or
    LoHa of 2-D factors (no Tucker core, no conv kernel) or a 2-D full diff."""
    shapes = mod.shapes
    if mod.kind == "loha":
        return "hada_t1" not in shapes
    if mod.kind == "lokr":
        return "lokr_t2" not in shapes and len(shapes.get("lokr_w2", (0, 0))) == 2
    return mod.kind == "diff" and len(shapes.get("diff", ())) == 2


def _out_rows(mod: ModuleKeys) -> int | None:
    up = mod.shapes.get("up")
    return up[0] if up is not None and len(up) == 2 and "mid" not in mod.roles else None


def _in_width(mod: ModuleKeys) -> int | None:
    down = mod.shapes.get("down")
    return down[1] if down is not None and len(down) == 2 else None


def _out_features(mod: ModuleKeys) -> int | None:
    """The output rows of any kind of module (LoRA, LoHa, LoKr, full diff), from the header shapes."""
    shapes = mod.shapes
    shape = shapes.get("up") or shapes.get("hada_w1_a") or shapes.get("diff")
    if shape is not None:
        return shape[0]
    w1 = shapes.get("lokr_w1") or shapes.get("lokr_w1_a")
    w2 = shapes.get("lokr_w2") or shapes.get("lokr_w2_a")
    return w1[0] * w2[0] if w1 is not None and w2 is not None else None


def _in_features(mod: ModuleKeys) -> int | None:
    """The input width of any kind of module (LoRA, LoHa, LoKr, full diff), from the header shapes."""
    shapes = mod.shapes
    if "diff" in shapes:
        return shapes["diff"][1] if len(shapes["diff"]) == 2 else None
    if "down" in shapes or "hada_w1_b" in shapes:
        shape = shapes.get("down") or shapes["hada_w1_b"]
        return shape[1] if len(shape) == 2 else None
    w1 = shapes.get("lokr_w1") or shapes.get("lokr_w1_b")
    w2 = shapes.get("lokr_w2") or shapes.get("lokr_w2_b")
    if w1 is None or w2 is None or len(w1) != 2 or len(w2) != 2 or "lokr_t2" in shapes:
        return None
    return w1[1] * w2[1]


# ---------------------------------------------------------------------------------------------
# layout, family and base
# ---------------------------------------------------------------------------------------------
def is_transformer_file(grouped: Grouped) -> bool:
    """Whether any module of the file names a Flux / SD3 transformer module."""
    return any(bfl_targets(n) or diffusers_target(n) for n in grouped.modules)


def transformer_layout(grouped: Grouped) -> str | None:
    """The layout named after the tool that writes it, where the generic classification would misname it:
    ``xlabs`` (x-flux's attention processors: they look like diffusers' old attention-processor files),
    ``comfyui`` (the original model's module names, dotted, under ``diffusion_model.``: every transformer
    module; ComfyUI's text-encoder names may sit beside them) and ``onetrainer`` (``lora_transformer_`` + the
    diffusers path joined by ``_``, its encoders as ``lora_te1_`` / ``lora_te2_``). None: the generic layout stands (ai-toolkit's
    diffusers paths under ``diffusion_model.`` are the diffusers layout, sd-scripts' names kohya)."""
    from .flux_control import control_layout  # here: that module imports this one

    control = control_layout(grouped)  # BFL's control LoRAs: bare BFL names beside q/k norm scales
    if control is not None:
        return control
    names = [n for n in grouped.modules if bfl_targets(n) or diffusers_target(n)]
    if any(_XLABS.match(n) for n in names):
        return "xlabs"
    others = [n for n in grouped.modules if n not in names]
    if names and all(n.startswith("diffusion_model.") and bfl_targets(n) for n in names) and \
            all(n.startswith(tuple(COMFY_TEXT_ENCODERS)) for n in others):
        return "comfyui"
    if names and all(n.startswith("lora_transformer_") for n in names) and \
            all(n.startswith(("lora_te1_", "lora_te2_", "lora_te3_")) for n in others):
        return "onetrainer"
    return None


def family_and_base(file: AdapterFile, grouped: Grouped) -> tuple[str, str]:
    """(``flux`` | ``sd3``, base) from the hidden width of a module that takes it as input; else the
    names (single-stream blocks or BFL names are Flux's); else the metadata. ``base`` is ``flux``
    (dev and schnell share every LoRA-visible shape), ``tiny-flux``, ``sd3-medium`` (SD3 Medium's
    1536 width), ``sd3.5-medium`` (the same width with SD3.5's second attention), ``sd3.5-large``,
    ``tiny-sd3``, or ``unknown``."""
    names = list(grouped.modules)
    for mod in grouped.modules.values():
        hidden = _hidden_width(mod)
        if hidden in HIDDEN_WIDTH:
            family, base = HIDDEN_WIDTH[hidden]
            if base == "sd3-medium" and any("attn2" in n for n in names):  # any naming: .attn2. or _attn2_
                base = "sd3.5-medium"
            return family, base
    if any(bfl_targets(n) and any(part in n.replace(".", "_") for part in SD3_ONLY) for n in names):
        return "sd3", "unknown"
    if any(bfl_targets(n) or "single_transformer_blocks" in n for n in names):
        return "flux", "unknown"
    for key, needle, family in METADATA_FAMILY:
        if needle in file.metadata.get(key, "").lower():
            return family, "unknown"
    return "flux", "unknown"  # diffusers joint-block names without a telling shape: Flux is the common case


def _hidden_width(mod: ModuleKeys) -> int | None:
    """The hidden width a transformer module's input width tells, or None."""
    pieces, width = pieces_of(mod), _in_features(mod)
    if not pieces or width is None:
        return None
    target = pieces[0].target
    for pattern, multiple in _HIDDEN_INPUT:
        if pattern.search(target) and width % multiple == 0:
            return width // multiple
    return None


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
def _slice_rows(up, rows):
    import torch

    return torch.cat([up[a:b] for a, b in rows], dim=0).contiguous()


def build_transformer_patches(file: AdapterFile, grouped: Grouped, family: str) -> dict:
    """Patches by target for a Flux / SD3 file; every module must be a transformer module or a text
    encoder one (``lora_te1_`` ...: translated as for Stable Diffusion, it names the pipeline's CLIP;
    ``lora_te3_``: the family's T5 encoder).
    A fused module takes any LoRA, and a 2-D LoKr, LoHa or full diff (their rows: :mod:`.fused`); a bias's
    difference (``diff_b`` / ``b_norm``, beside any kind, as ComfyUI's trainer writes it) patches the bias, by the
    same rows; a norm's (``w_norm`` / ``b_norm`` alone: LyCORIS train_norm) its weight and bias.
    Patches are keyed by target (``target#bias`` for a bias)."""
    from .parse import _config_alpha, _make_patch, check_structure, peft_config

    check_structure(file, grouped)
    cfg = peft_config(file)
    tensors = file.tensors([k for m in grouped.modules.values() for k in m.roles.values()])
    patches: dict = {}
    for name, mod in grouped.modules.items():
        t = {role: tensors[key] for role, key in mod.roles.items()}
        alpha = float(t["alpha"].float().item()) if "alpha" in t else _config_alpha(cfg, name)[0]
        for patch in _module_patches(file, mod, t, alpha, cfg, _make_patch, family):
            key = patch.target if patch.param == "weight" else f"{patch.target}#{patch.param}"
            if key in patches:
                raise AdapterError(file.path, f"two modules target {key}", name)
            patches[key] = patch
    return patches


def _module_patches(file, mod: ModuleKeys, t: dict, alpha, cfg, make_patch, family: str) -> list:
    from .flux_control import InputLoRAPatch
    from .parse import BIAS_ROLES, with_dora

    pieces = pieces_of(mod)
    first_key = next(iter(mod.roles.values()))
    if pieces is None:
        if bfl_targets(mod.name) is not None:
            raise AdapterError(file.path, f"a {mod.kind} on the fused module {mod.name} is not supported "
                                          "(only a low-rank LoRA splits onto diffusers' modules)", first_key)
        target = text_encoder_target(mod.name, family)
        if not target.startswith(("text_encoder.", "text_encoder_2.", "text_encoder_3.")):
            raise AdapterError(file.path, f"module {mod.name} is not a Flux or SD3 module", first_key)
        pieces = [Piece(target)]
    # beside any kind (ComfyUI's trainer writes ``diff_b``; ``b_norm`` is read the same way)
    bias = [p for role in BIAS_ROLES for p in _diff_patches(mod, t, pieces, role, "bias")]
    if mod.kind in ("diff", "norm"):  # a full difference, or LyCORIS train_norm's w_norm / b_norm
        return [*_diff_patches(mod, t, pieces, "diff", "weight"), *_diff_patches(mod, t, pieces, "w_norm", "weight"),
                *bias]
    if mod.kind not in ("lora", "loha", "lokr"):  # with or without a DoRA magnitude (``parse.with_dora``)
        raise AdapterError(file.path, f"a {mod.kind} module is not supported on Flux / SD3 yet", first_key)
    if mod.dora and mod.kind != "lora" and any(p.rows is not None for p in pieces):  # never dropped silently
        raise AdapterError(file.path, f"a DoRA {mod.kind} on the fused module {mod.name} is not supported (only a "
                                      "DoRA LoRA splits onto its parts)", mod.roles["dora_scale"])
    if mod.kind != "lora" and any(p.rows is not None for p in pieces):  # a LoKr / LoHa on a fused module
        whole = make_patch(mod.kind, pieces[0].target, mod.name, t, alpha, cfg)
        whole.file_keys = dict(mod.roles)
        return [*row_patches(whole, pieces, (_out_features(mod), _in_features(mod))), *bias]
    blocks = _rank_blocks(t["up"], pieces) if mod.kind == "lora" and len(pieces) > 1 else None
    out = []
    for j, piece in enumerate(pieces):
        part = dict(t)
        if piece.rows is not None:
            part["up"] = _slice_rows(t["up"], piece.rows)
        if blocks is not None:  # each part's own rank block; the scale stays the file's alpha / its whole rank
            part["up"], part["down"] = part["up"][:, blocks[j]].contiguous(), t["down"][blocks[j]].contiguous()
        patch = make_patch(mod.kind, piece.target, mod.name, part, alpha, cfg)
        if blocks is not None and alpha is not None:
            patch._scale = alpha / t["down"].shape[0]
        patch = with_dora(file, mod, patch, t, piece.rows, len(pieces))  # after the scale: it wraps the patch
        patch.file_keys = dict(mod.roles)
        out.append(InputLoRAPatch.of(patch))  # on the x_embedder: a control model's wider input takes it too
    return [*out, *bias]


def _diff_patches(mod: ModuleKeys, t: dict, pieces: list[Piece], role: str, param: str) -> list:
    """The full difference ``role`` (``diff`` / ``diff_b`` / ``w_norm`` / ``b_norm``) of ``param`` on each piece: whole on a plain module,
    its rows on a fused one (a bias's rows are its fused weight's); none when the module has no ``role``."""
    from .patches import DiffPatch

    if role not in t:
        return []
    out = []
    for piece in pieces:
        patch = DiffPatch(piece.target, mod.name, {"diff": t[role]}, param=param)
        patch.file_keys = {"diff": mod.roles[role]}
        out.append(patch if piece.rows is None else row_patches(patch, [piece], tuple(t[role].shape))[0])
    return out


def _rank_blocks(up, pieces: list[Piece]) -> list[slice] | None:
    """The rank block of each part when a fused module's ``up`` is block-diagonal (part ``j``'s rows are zero
    outside ranks ``j*r .. (j+1)*r``: the parts were separate LoRAs, stacked), else None."""
    count, rank = len(pieces), up.shape[1]
    if rank % count or any(p.rows is None for p in pieces):
        return None
    size = rank // count
    blocks = [slice(j * size, (j + 1) * size) for j in range(count)]
    for j, piece in enumerate(pieces):
        rows = _slice_rows(up, piece.rows)
        if rows[:, : blocks[j].start].any() or rows[:, blocks[j].stop:].any():
            return None
    return blocks


def parse_transformer(file: AdapterFile, grouped: Grouped, kind: str, layout: str) -> Adapter | None:
    """The :class:`Adapter` of a Flux / SD3 LoRA file, or None when no module names a transformer one."""
    from .flux_control import is_control, parse_control

    if is_control(grouped):  # norm scales and biases beside the LoRAs, an input to widen: read there
        return parse_control(file, grouped, kind, layout)
    if not is_transformer_file(grouped):
        return None
    family, base = family_and_base(file, grouped)
    if base == "unknown" and family == "sd3":
        base = _sd3_from_metadata(file)
    if family == "flux" and base in ("flux", "unknown"):
        base = _flux_variant(file, grouped, base)
    adapter = Adapter(type=kind, format=layout, patches=build_transformer_patches(file, grouped, family),
                      metadata=dict(file.metadata), path=file.path, file=file, base=base, family=family)
    return adapter


def _flux_variant(file: AdapterFile, grouped: Grouped, base: str) -> str:
    """``flux-dev`` / ``flux-schnell`` for a FLUX.1-wide file (``base`` ``flux``, or ``unknown`` when no module
    told a width): a module on the guidance embedder is dev's (schnell has none), else the modelspec
    architecture (``flux-1-dev`` / ``flux-1-schnell``, as sd-scripts and our trainer write it) decides, else
    ``base`` stands (every other shape is the same in both). An unknown width is FLUX.1's only when an
    embedder's output rows say so."""
    if base == "unknown":
        if _embedder_width(grouped) not in (None, BASE_WIDTHS["flux-dev"]):
            return base
    targets = [p.target for m in grouped.modules.values() for p in (pieces_of(m) or ())]
    if any(".guidance_embedder." in t for t in targets):
        return "flux-dev"
    arch = file.metadata.get("modelspec.architecture", "").lower()
    for variant in ("flux-dev", "flux-schnell"):
        if arch.startswith(variant.replace("flux-", "flux-1-")):
            return variant
    return base


def _embedder_width(grouped: Grouped) -> int | None:
    """The hidden width an embedder's output rows tell (they emit the hidden state), or None."""
    for mod in grouped.modules.values():
        pieces = pieces_of(mod)
        if pieces and len(pieces) == 1 and pieces[0].target.startswith(
                ("transformer.time_text_embed.", "transformer.x_embedder", "transformer.context_embedder")):
            return _out_features(mod)
    return None


def _sd3_from_metadata(file: AdapterFile) -> str:
    """sd3.5-large / sd3.5-medium from a modelspec architecture such as ``stable-diffusion-3.5-large``."""
    arch = file.metadata.get("modelspec.architecture", "").lower().replace("-", ".")
    for base in ("sd3.5-large", "sd3.5-medium"):
        if base.replace("sd3.5-", "3.5.") in arch:
            return base
    return "unknown"
