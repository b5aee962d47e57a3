"""One naming for every module an adapter targets: the diffusers module path with its component.

``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.text_projection``.

Foreign namings are translated here, once, by one engine driven by tables:

* ``PREFIXES``: which component a name belongs to and whether it is ``_``-joined (kohya) or dotted.
* ``ATOMS``: the module-name parts that themselves contain ``_`` (``to_q``, ``down_blocks`` ...). A
  ``_``-joined name is split on ``_`` and re-joined with ``.`` except inside an atom (longest match).
* ``SGM``: the ldm/sgm UNet block names (``input_blocks_4_1``) used by kohya for SDXL, mapped to
  diffusers blocks from the UNet's ``layers_per_block``.
* ``DOTTED_FIXES``: renames inside dotted names (the old diffusers attention-processor layout).

When a name does not translate to a module of the model at hand, :func:`resolve` falls back to
matching the ``_``-joined form against the model's own module names (what kohya, A1111 and ComfyUI do).
"""
from __future__ import annotations

import re
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


def kohya_name(path: str, sdxl: bool = False) -> str:
    """The kohya module name for a canonical path (diffusers block names, as sd-scripts SD1/2 write)."""
    component, rest = path.split(".", 1)
    if component != "unet":
        rest = text_model_path(rest)
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te",
              "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{underscored(rest)}"
