"""One naming for every module an adapter targets: the diffusers module path with its component.

``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.text_projection``.

Foreign namings are translated here, once, by one engine driven by tables:

* ``PREFIXES``: which component a name belongs to and whether it is ``_``-joined (kohya) or dotted.
* ``ATOMS``: the module-name parts that themselves contain ``_`` (``to_q``, ``down_blocks`` ...). A
  ``_``-joined name is split on ``_`` and re-joined with ``.`` except inside an atom (longest match).
* ``SGM``: the ldm/sgm UNet block names (``input_blocks_4_1``) used by kohya for SDXL, mapped to
  diffusers blocks from the UNet's ``layers_per_block`` (:func:`sgm_to_diffusers`) and back from its
  :class:`UNetLayout` (:func:`diffusers_to_sgm`, which the checkpoint writer uses too).
* ``DOTTED_FIXES``: renames inside dotted names (the old diffusers attention-processor layout).

When a name does not translate to a module of the model at hand, :func:`resolve` falls back to
matching the ``_``-joined form against the model's own module names (what kohya, A1111 and ComfyUI do).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# (prefix, component, joined-with-underscores). Checked in order; the first match wins.
PREFIXES: tuple[tuple[str, str, bool], ...] = (
    ("lora_unet_", "unet", True),
    ("lora_te1_", "text_encoder", True),
    ("lora_te2_", "text_encoder_2", True),
    ("lora_te_", "text_encoder", True),
    ("lycoris_", "unet", True),
    ("oft_unet_", "unet", True),
    ("unet.", "unet", False),
    ("text_encoder_2.", "text_encoder_2", False),
    ("text_encoder.", "text_encoder", False),
    ("base_model.model.", None, False),  # PEFT: component from the rest of the name
    ("diffusion_model.", "unet", False),
    ("", None, False),
)

ATOMS: tuple[str, ...] = (
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
    "time_proj", "norm_out", "class_embedding", "encoder_hid_proj",
    # CLIP text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
    # ldm / sgm
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
)

_ATOM_TOKENS = sorted((tuple(a.split("_")) for a in ATOMS), key=len, reverse=True)

# Old diffusers attention-processor names and old text-encoder LoRA layers.
DOTTED_FIXES: tuple[tuple[str, str], ...] = (
    (".processor.to_out", ".to_out.0"),
    (".processor.", "."),
)

# sgm resnet sub-layers -> diffusers
SGM_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
              "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
SGM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def join_atoms(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    tokens = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for atom in _ATOM_TOKENS:
            if tuple(tokens[i:i + len(atom)]) == atom:
                out.append("_".join(atom))
                i += len(atom)
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def rename_first(path: str, pairs) -> str:
    """``path`` with the first ``(old, new)`` of ``pairs`` that is the path or a dotted prefix of it replaced."""
    for old, new in pairs:
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def _sgm_resnet(rest: str) -> str:
    return rename_first(rest, SGM_RESNET.items())


@lru_cache(maxsize=4096)
def sgm_to_diffusers(path: str, layers_per_block: int = 2, attn_blocks: tuple[bool, ...] | None = None) -> str:
    """Map an ldm/sgm UNet path (dotted) to the diffusers path.

    ``attn_blocks`` says which up blocks (diffusers order) have attentions; by default every up block
    but the first has them when it is not the lowest resolution (SD1/SDXL); it only matters for
    ``output_blocks.N.1`` of blocks without attention, which are then upsamplers.
    """
    top = rename_first(path, SGM_TOP.items())
    if top != path:
        return top
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.?(.*)$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3]
        block, j = divmod(n - 1, layers_per_block + 1)
        if j == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0." + ("conv" + rest[2:] if rest.startswith("op") else rest)
        kind = "resnets" if k == 0 else "attentions"
        rest = _sgm_resnet(rest) if kind == "resnets" else rest
        return f"down_blocks.{block}.{kind}.{j}." + rest
    m = re.match(r"middle_block\.(\d+)\.?(.*)$", path)
    if m:
        k, rest = int(m[1]), m[2]
        if k == 1:
            return "mid_block.attentions.0." + rest
        return f"mid_block.resnets.{k // 2}." + _sgm_resnet(rest)
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.?(.*)$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3]
        block, j = divmod(n, layers_per_block + 1)
        has_attn = attn_blocks[block] if attn_blocks is not None else None
        if k == 0:
            return f"up_blocks.{block}.resnets.{j}." + _sgm_resnet(rest)
        if k == 1 and has_attn is not False and not rest.startswith("conv"):
            return f"up_blocks.{block}.attentions.{j}." + rest
        return f"up_blocks.{block}.upsamplers.0." + rest
    return path


def split_prefix(module_name: str) -> tuple[str | None, str, bool]:
    """Return (component or None, the rest, joined-with-underscores)."""
    for prefix, component, joined in PREFIXES:
        if module_name.startswith(prefix):
            return component, module_name[len(prefix):], joined
    return None, module_name, False  # pragma: no cover - "" always matches


def _guess_component(rest: str) -> str | None:
    if rest.startswith(("text_model.", "text_projection", "encoder.layers.", "embeddings.", "final_layer_norm")):
        return "text_encoder"
    if rest.split(".")[0] in {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out",
                              "time_embedding", "add_embedding", "conv_norm_out",
                              "input_blocks", "middle_block", "output_blocks"}:
        return "unet"
    return None


@lru_cache(maxsize=65536)
def canonical(module_name: str, layers_per_block: int = 2) -> str:
    """Translate a module name from any known layout to ``component.diffusers.path``.

    Names that belong to no Stable Diffusion component (an LLM's ``transformer.h.0.attn``, a Flux
    ``transformer.single_transformer_blocks``) come back prefixed with ``?.`` so callers can tell.
    """
    component, rest, joined = split_prefix(module_name)
    if joined:
        rest = join_atoms(rest)
    for old, new in DOTTED_FIXES:
        rest = rest.replace(old, new)
    if component is None:
        component = _guess_component(rest)
    if component in ("text_encoder", "text_encoder_2"):
        rest = text_model_path(rest)
    if component == "unet" and rest.split(".")[0] in {"input_blocks", "middle_block", "output_blocks",
                                                       "time_embed", "label_emb", "out"}:
        rest = sgm_to_diffusers(rest, layers_per_block)
    return f"{component}.{rest}" if component else f"?.{rest}"


def is_stable_diffusion(path: str) -> bool:
    return path.split(".", 1)[0] in COMPONENTS


def underscored(path: str) -> str:
    return path.replace(".", "_")


CLIP_TEXT_ROOTS = ("encoder", "embeddings", "final_layer_norm")


def text_model_path(name: str) -> str:
    """Module names inside a CLIP text model always carry ``text_model.``: transformers >= 5 flattens
    ``CLIPTextModel`` (``encoder.layers.0``) while files and ``CLIPTextModelWithProjection`` keep it."""
    if name.split(".", 1)[0] in CLIP_TEXT_ROOTS:
        return f"text_model.{name}"
    return name


# Architectures whose UNet kohya's scripts (and LyCORIS inside them) name by the sgm modules of
# ``sdxl_original_unet.SdxlUNet2DConditionModel``; every other UNet is named by its diffusers path.
SGM_NAMED_ARCHS = ("sdxl", "tiny-sdxl")
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


@dataclass(frozen=True)
class UNetLayout:
    """What the ldm/sgm block numbers of a UNet depend on. The default is SDXL's (and tiny-sdxl's)."""

    layers_per_block: int = 2
    up_has_attention: tuple[bool, ...] = (True, True, False)  # per up block, diffusers order

    @classmethod
    def of(cls, config) -> "UNetLayout":
        """From a diffusers UNet config (a dict, a ``FrozenDict`` or a ``unet.config``)."""
        get = config.get if hasattr(config, "get") else lambda key: getattr(config, key)
        return cls(int(get("layers_per_block")), tuple("CrossAttn" in t for t in get("up_block_types")))


_DIFFUSERS_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                              r"\.(\d+)(?:\.(.*))?$")
_DIFFUSERS_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")
_SGM_TOP_OF = {diffusers: sgm for sgm, diffusers in SGM_TOP.items()}
_SGM_RESNET_OF = tuple((diffusers, sgm) for sgm, diffusers in SGM_RESNET.items())


def _dotted(head: str, rest: str | None) -> str:
    return f"{head}.{rest}" if rest else head


@lru_cache(maxsize=65536)
def diffusers_to_sgm(path: str, layout: UNetLayout = UNetLayout()) -> str | None:
    """A diffusers UNet path (module or parameter) -> the ldm/sgm one, or None for a path outside the table.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``; a downsampler's ``conv`` is the
    ``op`` of ``input_blocks.{(n+1)(i+1)}.0``; an upsampler is ``output_blocks.{(n+1)i+n}.{2 if the block
    has attentions else 1}.conv``; resnet layers are renamed (``conv1`` -> ``in_layers.2``). The inverse of
    :func:`sgm_to_diffusers`.
    """
    top = rename_first(path, _SGM_TOP_OF.items())
    if top != path:
        return top
    n = layout.layers_per_block
    m = _DIFFUSERS_BLOCK.match(path)
    if m:
        side, block, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "downsamplers":  # diffusers' Downsample2D.conv is the sgm Downsample's op
            rest = "op" + rest[4:] if rest and (rest == "conv" or rest.startswith("conv.")) else rest
            return _dotted(f"input_blocks.{block * (n + 1) + n + 1}.0", rest)
        if kind == "upsamplers":  # after the block's resnet (and attention, when it has one)
            if block >= len(layout.up_has_attention):
                return None
            return _dotted(f"output_blocks.{block * (n + 1) + n}.{2 if layout.up_has_attention[block] else 1}", rest)
        index = block * (n + 1) + j + 1 if side == "down_blocks" else block * (n + 1) + j
        where = "input_blocks" if side == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return _dotted(f"{where}.{index}.0", rest and rename_first(rest, _SGM_RESNET_OF))
        return _dotted(f"{where}.{index}.1", rest)
    m = _DIFFUSERS_MID.match(path)
    if m:
        if m[1] == "attentions":
            return _dotted("middle_block.1", m[3])
        return _dotted(f"middle_block.{2 * int(m[2])}", m[3] and rename_first(m[3], _SGM_RESNET_OF))
    return None


def unet_layout(arch: str | None) -> UNetLayout | None:
    """The sgm layout kohya names ``arch``'s UNet by (read from the architecture's UNet config), or None
    where kohya names it by diffusers paths (SD1, SD2, their tiny bases, unknown architectures)."""
    if arch not in SGM_NAMED_ARCHS:
        return None
    from adapterhub.base import recipe

    return UNetLayout.of(recipe(arch).unet)


def kohya_name(path: str, arch: str | None = "sd1") -> str:
    """The kohya module name for a canonical path, as kohya's scripts for ``arch`` name it.

    SD1/SD2: ``lora_unet_`` + the diffusers path, ``lora_te_`` (sd-scripts' ``train_network.py``).
    SDXL: ``lora_unet_`` + the sgm path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``),
    ``lora_te1_`` / ``lora_te2_`` (``sdxl_train_network.py``, LyCORIS); what AUTOMATIC1111, ComfyUI,
    diffusers and ``sdxl_merge_lora.py`` all read. A UNet path outside the sgm table keeps its diffusers
    name. Text-encoder paths always carry ``text_model.``.
    """
    component, rest = path.split(".", 1)
    layout = unet_layout(arch)
    if component == "unet":
        rest = (diffusers_to_sgm(rest, layout) or rest) if layout is not None else rest
    else:
        rest = text_model_path(rest)
    prefix = "lora_te1" if component == "text_encoder" and layout is not None else _KOHYA_PREFIX[component]
    return f"{prefix}_{underscored(rest)}"


def kohya_arch(base: str | None, paths) -> str:
    """The architecture to name an adapter's modules for: its base when known, else SDXL when it
    changes a second text encoder, else SD1 (whose names SD2 shares)."""
    if base in SGM_NAMED_ARCHS or base in ("sd1", "sd2", "tiny-sd1"):
        return base
    return "sdxl" if any(p.startswith("text_encoder_2.") for p in paths) else "sd1"
