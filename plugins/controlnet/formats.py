"""ControlNet files: diffusers ``ControlNetModel`` folders and the original single-file checkpoints.

Layouts (``Sniff.format``):

* ``diffusers``: ``controlnet_cond_embedding.*``, ``controlnet_down_blocks.N``, ``controlnet_mid_block``
  and UNet-encoder names (``down_blocks.*``); a folder carries its ``config.json``.
* ``ldm``: lllyasviel's original checkpoints, ``control_model.time_embed.0.weight``,
  ``control_model.input_blocks.*``, ``input_hint_block.{0..14}``, ``zero_convs.N.0``,
  ``middle_block_out.0`` (also without the ``control_model.`` prefix, and the v1.0 files that bundle a
  whole Stable Diffusion model beside it: only ``control_model.*`` is read).

Original checkpoints are converted on load with diffusers' own converter
(``convert_controlnet_checkpoint``, what ``ControlNetModel.from_single_file`` runs), plus the SDXL
``label_emb`` -> ``add_embedding`` keys it leaves out. A file without a config gets one from the
matching base architecture's UNet recipe (:mod:`adapterhub.base`), with the structure the tensors
show (block widths, layers, transformer depth, conditioning embedding) read from their shapes; nothing
is fetched. ``parse`` reads shapes only: it converts and checks every key and shape against a model
built on the meta device, and leaves the tensors on disk until the first attach.
"""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

from adapterhub.archs import arch_from_context_width, arch_from_metadata
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.types import Adapter, Sniff

# torch, diffusers, adapterhub.base and adapterhub.conditioning are imported inside the functions that
# build models or read values: registering and sniffing the type (``adapterhub plugins``, ``inspect`` of
# another type's file) must not pay for them.

DIFFUSERS, LDM = "diffusers", "ldm"
CLASS_NAME = "ControlNetModel"
LDM_PREFIX = "control_model."
WRAPPERS = ("", "state_dict.")  # a pickle's ``{"state_dict": {...}}`` opens with this prefix
# SDXL's added conditioning, which diffusers' converter leaves out
LABEL_EMB = {f"label_emb.0.{i}.{p}": f"add_embedding.linear_{n}.{p}"
             for i, n in ((0, 1), (2, 2)) for p in ("weight", "bias")}
# control kinds named in configs (``_name_or_path``) and metadata, for ``inspect``


# --------------------------------------------------------------------------------------------
# recognising the layout, the architecture and the variant (keys, shapes and metadata only)
# --------------------------------------------------------------------------------------------
def layout_of(keys) -> tuple[str, str] | None:
    """``(layout, prefix)``: the layout and the key prefix its tensors carry, or None."""
    for wrapper in WRAPPERS:
        if f"{wrapper}{LDM_PREFIX}time_embed.0.weight" in keys:
            return LDM, f"{wrapper}{LDM_PREFIX}"
        if f"{wrapper}time_embed.0.weight" in keys and f"{wrapper}input_hint_block.0.weight" in keys:
            return LDM, wrapper
        if f"{wrapper}controlnet_cond_embedding.conv_in.weight" in keys \
                and f"{wrapper}controlnet_mid_block.weight" in keys:
            return DIFFUSERS, wrapper
    return None


def shapes_of(file: AdapterFile, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(info.shape) for k, info in file.keys.items() if k.startswith(prefix)}


def _projection_widths() -> dict[int, str]:
    """SDXL-style added-conditioning width -> architecture, from the recipes."""
    from adapterhub.base import PRESETS

    return {rec.unet["projection_class_embeddings_input_dim"]: name for name, rec in PRESETS.items()
            if rec.unet.get("addition_embed_type") == "text_time"}


def base_of(shapes: dict, metadata: dict, config: dict | None) -> str:
    """Our own metadata, then kohya/modelspec metadata, then the config's or the tensors' context width."""
    from adapterhub.base import METADATA_KEY, PRESETS

    if metadata.get(METADATA_KEY) in PRESETS:
        return metadata[METADATA_KEY]
    arch = arch_from_metadata(metadata)
    if arch != "unknown":
        return arch
    width = (config or {}).get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    if width is None:
        width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    arch = arch_from_context_width(width)
    if arch == "unknown":
        added = shapes.get("add_embedding.linear_1.weight") or shapes.get("label_emb.0.0.weight")
        if added is not None:
            arch = _projection_widths().get(added[1], "unknown")
    return arch


def variant_of(shapes: dict, config: dict) -> str:
    """diffusers' own probes (``infer_diffusers_model_type``): SDXL large / mid / small; else standard."""
    if config.get("addition_embed_type") != "text_time" and "add_embedding.linear_1.weight" not in shapes:
        return "standard"
    if "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight" in shapes:
        return "xl-large"
    if "down_blocks.1.attentions.0.norm.weight" in shapes:
        return "xl-mid"
    return "xl-small"


# --------------------------------------------------------------------------------------------
# conversion and configuration
# --------------------------------------------------------------------------------------------
def ldm_to_diffusers(state: dict, layers_per_block: int) -> tuple[dict, list[str]]:
    """diffusers names for an original (unprefixed) state dict, and the source keys nothing used.
    Works on meta tensors too (it only moves values)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(dict(state), {"layers_per_block": layers_per_block})
    for ldm_key, key in LABEL_EMB.items():
        if ldm_key in state:
            converted[key] = state[ldm_key]
    converted = {k: v for k, v in converted.items() if v is not None}
    used = {id(v) for v in converted.values()}
    return converted, [k for k, v in state.items() if id(v) not in used]


def _count(shapes: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def derive_config(shapes: dict, arch: str) -> dict:
    """A ``ControlNetModel`` config for diffusers-named ``shapes``: the architecture's UNet recipe, with
    every structural value the tensors show read from them."""
    from diffusers import ControlNetModel

    from adapterhub.base import recipe

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in recipe(arch).unet.items() if k in accepted}
    blocks = _count(shapes, r"down_blocks\.(\d+)\.resnets\.0\.conv1\.weight$")
    if blocks == 0 or "conv_in.weight" not in shapes:
        raise ValueError("no UNet encoder tensors (conv_in, down_blocks.N.resnets)")
    attention = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in shapes) for b in range(blocks)]
    config.update(
        in_channels=shapes["conv_in.weight"][1],
        block_out_channels=[shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(blocks)],
        layers_per_block=_count(shapes, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        transformer_layers_per_block=[_count(shapes, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                                      or 1 for b in range(blocks)],
        mid_block_type=("UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in shapes)
                        else "UNetMidBlock2D"),
        conditioning_channels=shapes["controlnet_cond_embedding.conv_in.weight"][1],
        conditioning_embedding_out_channels=[shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
            shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0]
            for j in range(1, _count(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\."), 2)],
    )
    proj = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    if proj is not None:
        config["use_linear_projection"] = len(proj) == 2
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is not None:
        config["cross_attention_dim"] = context
    if "add_embedding.linear_1.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    else:
        for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            config.pop(key, None)
    return config


def meta_model(config: dict):
    """A ``ControlNetModel`` for ``config`` on the meta device (no memory, no initialisation)."""
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel.from_config(dict(config))


# --------------------------------------------------------------------------------------------
# the plugin's entry points
# --------------------------------------------------------------------------------------------
def sniff(file: AdapterFile) -> Sniff | None:
    found = layout_of(file.keys)
    if found is None:
        return None
    layout, prefix = found
    shapes = shapes_of(file, prefix)
    base = base_of(shapes, file.metadata, file.config if layout == DIFFUSERS else None)
    return Sniff(0.95, layout, {"base": base, "targets": 0, "family": "stable-diffusion"})


def parse(file: AdapterFile, found: Sniff, type_name: str) -> Adapter:
    import torch

    from adapterhub.base import PRESETS, recipe
    from adapterhub.conditioning import check_state, control_kind

    layout, prefix = layout_of(file.keys) or (found.format, "")
    shapes = shapes_of(file, prefix)
    config = dict(file.config) if layout == DIFFUSERS and file.config else None
    if config is not None and config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise AdapterError(file.path, f"config.json describes a {config['_class_name']}; "
                                      f"only {CLASS_NAME} is supported")
    base = base_of(shapes, file.metadata, config)
    source = {k: f"{prefix}{k}" for k in shapes}
    if layout == LDM:
        if base not in PRESETS:
            raise AdapterError(file.path, "cannot tell which base architecture this original ControlNet is for "
                                          "(no cross-attention or added-conditioning tensor of a known width)")
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        converted, unused = ldm_to_diffusers(meta, recipe(base).unet["layers_per_block"])
        if unused:
            raise AdapterError(file.path, "tensor not understood in an original ControlNet", f"{prefix}{unused[0]}")
        by_id = {id(v): k for k, v in meta.items()}
        source = {k: f"{prefix}{by_id[id(v)]}" for k, v in converted.items()}
        shapes = {k: tuple(v.shape) for k, v in converted.items()}
    if config is None:
        if base not in PRESETS:
            raise AdapterError(file.path, "no config.json, and the architecture is not one adapterhub knows")
        try:
            config = derive_config(shapes, base)
        except (KeyError, ValueError, IndexError) as exc:
            raise AdapterError(file.path, f"cannot work out the ControlNet configuration from the tensors: "
                                          f"{exc}") from None
    try:
        model = meta_model(config)
    except Exception as exc:  # noqa: BLE001 - a config diffusers refuses is a bad file
        raise AdapterError(file.path, f"invalid ControlNet configuration: {str(exc).splitlines()[0][:200]}") from None
    check_state(file.path, model, shapes, source, CLASS_NAME)
    full_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    extra = {"layout": layout, "prefix": prefix, "config": full_config,
             "variant": variant_of(shapes, full_config), "control": control_kind(file.metadata, config),
             "parameters": sum(math.prod(s) for s in shapes.values())}
    return Adapter(type=type_name, format=layout, patches={}, metadata=dict(file.metadata), path=file.path,
                   file=file, base=base, extra=extra)


def summary(adapter: Adapter) -> dict:
    config = adapter.extra["config"]
    facts = {"layout": adapter.extra["layout"], "variant": adapter.extra["variant"],
             "conditioning_channels": config["conditioning_channels"],
             "down_residuals": len(config["down_block_types"]) * (config["layers_per_block"] + 1),
             "cross_attention_dim": config["cross_attention_dim"],
             "global_pool_conditions": bool(config.get("global_pool_conditions")),
             "parameters": adapter.extra["parameters"]}
    if adapter.extra.get("control"):
        facts["control"] = adapter.extra["control"]
    return facts


def load_model(adapter: Adapter):
    """The ``ControlNetModel`` (read on first use, then kept in ``adapter.extra["model"]``)."""
    from adapterhub.conditioning import materialise

    if adapter.extra.get("model") is not None:
        return adapter.extra["model"]
    file, prefix, config = adapter.file, adapter.extra["prefix"], adapter.extra["config"]
    if file is None:
        raise AdapterError(adapter.path, "the ControlNet's file is not open")
    state = {k[len(prefix):]: v for k, v in file.tensors([k for k in file.keys if k.startswith(prefix)]).items()}
    if adapter.extra["layout"] == LDM:
        state, _ = ldm_to_diffusers(state, config["layers_per_block"])
    return materialise(adapter, state, meta_model(config), "ControlNet")


def save(adapter: Adapter, path: Path, format: str | None) -> Path:
    """``diffusers``: a ``ControlNetModel`` folder. ``a1111``: one .safetensors file of the same tensors,
    what the webui's ControlNet extension (``convert_from_diffuser_state_dict``) and ComfyUI load; the base
    goes into the metadata, and the config is read back from the shapes (:func:`derive_config`)."""
    from adapterhub.conditioning import save_model_folder

    if format == "a1111":
        return save_single_file(adapter, load_model(adapter).state_dict(), path)
    return save_model_folder(adapter, load_model(adapter), path, format, "ControlNet")


def save_single_file(adapter: Adapter, state: dict, path: Path) -> Path:
    """``state`` as one safetensors file, the adapter's metadata and base kept."""
    from adapterhub.base import METADATA_KEY
    from adapterhub.io import save_safetensors

    metadata = {k: v for k, v in adapter.metadata.items() if k != "format"}
    metadata.setdefault(METADATA_KEY, adapter.base)
    return save_safetensors(state, path, {"format": "pt", **metadata})


def example(model, path: Path, seed: int = 0, **options) -> Path:
    """``ControlNetModel.from_unet`` of ``model``'s UNet, its zero convolutions filled with small random
    values (seeded) so the control visibly acts, saved as a diffusers folder."""
    import torch
    from diffusers import ControlNetModel

    from adapterhub.base import METADATA_KEY
    from adapterhub.conditioning import write_model_folder
    from adapterhub.weights import architecture_of, component

    unet = component(model, "unet")
    if unet is None:
        raise AdapterError(path, "the model has no unet to build a ControlNet from")
    small = unet.config.block_out_channels[0] < 320  # the tiny bases: a cheap conditioning embedding
    embedding = options.get("conditioning_embedding_out_channels", (8, 16, 16, 32) if small else (16, 32, 96, 256))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(embedding))
        zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero:
                conv.weight.normal_(0.0, options.get("scale", 0.02))
                conv.bias.normal_(0.0, options.get("scale", 0.02))
    return write_model_folder(controlnet, Path(path), {METADATA_KEY: architecture_of(model)})
