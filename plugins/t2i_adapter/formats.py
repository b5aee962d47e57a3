"""T2I-Adapter files: diffusers ``T2IAdapter`` folders and safetensors, and TencentARC's original ``.pth``.

Layouts (``Sniff.format``):

* ``diffusers``: ``adapter.conv_in``, ``adapter.body.{b}.in_conv``, ``adapter.body.{b}.resnets.{j}.block1/2``
  (full and full-XL adapters); ``adapter.body.{b}.in_conv/out_conv`` + ``resnets`` (light adapter).
* ``tencentarc``: the original ``Adapter`` keeps its residual blocks in one flat list,
  ``body.{k}.block1/block2/in_conv`` with ``k = b x num_res_blocks + j`` and ``conv_in``; the original
  ``Adapter_light`` has ``body.{b}.in_conv/out_conv`` and ``body.{b}.body.{j}.block1/block2``. Converted
  on load to the diffusers names (what diffusers' ``scripts/convert_original_t2i_adapter.py`` writes out
  by hand for the published shapes, here for any width and depth).

Without a config the adapter's config is read from the shapes: ``channels`` from each block's width,
``num_res_blocks`` from the first block, ``in_channels`` and ``downscale_factor`` from ``conv_in``'s
input width (``in x factor^2``, factor 8 for SD, 16 for the SDXL adapters, taking 1 or 3 input
channels). Which base it is for follows from where its feature maps fit a UNet (:func:`fit_problem`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from adapterhub.archs import arch_from_metadata
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile
from adapterhub.types import Adapter, Sniff

# torch, diffusers, adapterhub.base and adapterhub.conditioning are imported inside the functions that
# build models or read values: registering and sniffing the type (``adapterhub plugins``, ``inspect`` of
# another type's file) must not pay for them.

DIFFUSERS, TENCENTARC = "diffusers", "tencentarc"
CLASS_NAME = "T2IAdapter"
WRAPPERS = ("", "state_dict.")
FULL, FULL_XL, LIGHT = "full_adapter", "full_adapter_xl", "light_adapter"
CONFIG_KEYS = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type")
DEFAULT_RES_BLOCKS = 2  # TencentARC's released full adapters (``nums_rb=2``)


# --------------------------------------------------------------------------------------------
# recognising the layout
# --------------------------------------------------------------------------------------------
def layout_of(keys) -> tuple[str, str] | None:
    """``(layout, prefix)`` or None."""
    for p in WRAPPERS:
        if (f"{p}adapter.conv_in.weight" in keys or f"{p}adapter.body.0.in_conv.weight" in keys) and \
                f"{p}adapter.body.0.resnets.0.block1.weight" in keys:
            return DIFFUSERS, p
        if f"{p}conv_in.weight" in keys and f"{p}body.0.block1.weight" in keys:
            return TENCENTARC, p
        if f"{p}body.0.in_conv.weight" in keys and f"{p}body.0.body.0.block1.weight" in keys \
                and f"{p}body.0.out_conv.weight" in keys:
            return TENCENTARC, p
    return None


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


_FULL_KEY = re.compile(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)")
_LIGHT_KEY = re.compile(r"body\.(\d+)\.(?:(in_conv|out_conv)|body\.(\d+)\.(block1|block2))\.(weight|bias)")


def tencentarc_names(keys) -> tuple[dict[str, str], list[str]]:
    """diffusers name -> original key for TencentARC ``keys`` (no prefix), and the keys not understood."""
    keys = list(keys)
    names: dict[str, str] = {}
    unused = []
    if "body.0.out_conv.weight" in keys:  # Adapter_light
        for key in keys:
            m = _LIGHT_KEY.fullmatch(key)
            if m is None:
                unused.append(key)
            elif m.group(2):
                names[f"adapter.body.{m.group(1)}.{m.group(2)}.{m.group(5)}"] = key
            else:
                names[f"adapter.body.{m.group(1)}.resnets.{m.group(3)}.{m.group(4)}.{m.group(5)}"] = key
        return names, unused
    # the first block that changes width starts with an ``in_conv``: the blocks before it are one stage
    starts = sorted(int(m.group(1)) for k in keys if (m := _FULL_KEY.fullmatch(k)) and m.group(2) == "in_conv")
    per_stage = next((k for k in starts if k > 0), DEFAULT_RES_BLOCKS)
    for key in keys:
        if key in ("conv_in.weight", "conv_in.bias"):
            names[f"adapter.{key}"] = key
            continue
        m = _FULL_KEY.fullmatch(key)
        if m is None or (m.group(2) == "in_conv" and int(m.group(1)) % per_stage):
            unused.append(key)
            continue
        stage, j = divmod(int(m.group(1)), per_stage)
        inner = m.group(2) if m.group(2) == "in_conv" else f"resnets.{j}.{m.group(2)}"
        names[f"adapter.body.{stage}.{inner}.{m.group(3)}"] = key
    return names, unused


def _split_input(width: int) -> tuple[int, int]:
    """``conv_in``'s input width -> (image channels, pixel-unshuffle factor)."""
    for factor in (8, 16):
        channels, rest = divmod(width, factor * factor)
        if rest == 0 and channels in (1, 3):
            return channels, factor
    raise ValueError(f"an input width of {width} is no 1- or 3-channel image unshuffled by 8 or 16")


def derive_config(shapes: dict) -> dict:
    """The ``T2IAdapter`` config for diffusers-named ``shapes``."""
    blocks = _count(shapes, r"adapter\.body\.(\d+)\.")
    res_blocks = _count(shapes, r"adapter\.body\.0\.resnets\.(\d+)\.")
    if not blocks or not res_blocks:
        raise ValueError("no adapter.body.N.resnets tensors")
    if "adapter.body.0.out_conv.weight" in shapes:
        in_channels, factor = _split_input(shapes["adapter.body.0.in_conv.weight"][1])
        channels = [shapes[f"adapter.body.{b}.out_conv.weight"][0] for b in range(blocks - 1)]
        kind = LIGHT
    else:
        in_channels, factor = _split_input(shapes["adapter.conv_in.weight"][1])
        channels = [shapes[f"adapter.body.{b}.resnets.0.block1.weight"][0] for b in range(blocks)]
        kind = FULL if factor == 8 else FULL_XL
    return {"in_channels": in_channels, "channels": channels, "num_res_blocks": res_blocks,
            "downscale_factor": factor, "adapter_type": kind}


# --------------------------------------------------------------------------------------------
# where the feature maps go: the geometry both base detection and attach check
# --------------------------------------------------------------------------------------------
def feature_maps(config: dict) -> list[tuple[int, int]]:
    """(channels, pixel downscale) of each feature map the adapter returns, in order."""
    factor, channels, kind = config["downscale_factor"], list(config["channels"]), config["adapter_type"]
    if kind == FULL:
        return [(c, factor * 2 ** j) for j, c in enumerate(channels)]
    if kind == FULL_XL:  # body 2 is the only one that downsamples
        return [(c, factor * (1 if j < 2 else 2)) for j, c in enumerate(channels)]
    if kind == LIGHT:
        return [(c, factor * 2 ** j) for j, c in enumerate(channels)] + [(channels[-1], factor * 2 ** len(channels))]
    raise ValueError(f"unknown adapter_type {kind!r}")


def unet_points(unet_config, vae_scale: int = 8) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Where ``UNet2DConditionModel`` adds ``down_intrablock_additional_residuals``: (channels, pixel
    downscale) per down block (a cross-attention block before its downsampler, a plain one after it),
    then the mid block (which takes one more map if its shape matches)."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k: getattr(unet_config, k)
    kinds, widths = list(get("down_block_types")), list(get("block_out_channels"))
    points = []
    for i, (kind, width) in enumerate(zip(kinds, widths)):
        final = i == len(widths) - 1
        points.append((width, vae_scale * 2 ** (i if "CrossAttn" in kind or final else i + 1)))
    return points, (widths[-1], vae_scale * 2 ** (len(widths) - 1))


def fit_problem(config: dict, unet_config, vae_scale: int = 8) -> str | None:
    """Why the adapter's feature maps do not fit the UNet, or None when they do."""
    maps = feature_maps(config)
    points, mid = unet_points(unet_config, vae_scale)
    for j, (found, wanted) in enumerate(zip(maps, points)):
        if found != wanted:
            return (f"feature map {j} has {found[0]} channels at 1/{found[1]} of the image, the UNet's down block {j} "
                    f"takes {wanted[0]} at 1/{wanted[1]}")
    if len(maps) > len(points) + 1 or (len(maps) == len(points) + 1 and maps[-1] != mid):
        return f"{len(maps)} feature maps, the UNet takes {len(points)} (and one more in its mid block)"
    return None


def base_of(config: dict, metadata: dict) -> str:
    from adapterhub.base import METADATA_KEY, PRESETS

    if metadata.get(METADATA_KEY) in PRESETS:
        return metadata[METADATA_KEY]
    arch = arch_from_metadata(metadata)
    if arch != "unknown":
        return arch
    # sd1 before sd2: the two share their UNet shapes, and nearly every published adapter is for sd1
    return next((name for name, rec in PRESETS.items() if fit_problem(config, rec.unet) is None), "unknown")


# --------------------------------------------------------------------------------------------
# the plugin's entry points
# --------------------------------------------------------------------------------------------
def _described(file: AdapterFile) -> tuple[str, str, dict, dict[str, str], dict]:
    """layout, prefix, diffusers-named shapes, their source keys, config (from the folder or the shapes)."""
    layout, prefix = layout_of(file.keys)
    raw = {k[len(prefix):]: tuple(info.shape) for k, info in file.keys.items() if k.startswith(prefix)}
    if layout == TENCENTARC:
        names, unused = tencentarc_names(raw)
        if unused:
            raise AdapterError(file.path, "tensor not understood in a TencentARC T2I-Adapter", f"{prefix}{unused[0]}")
    else:
        names = {k: k for k in raw}
    shapes = {k: raw[v] for k, v in names.items()}
    source = {k: f"{prefix}{v}" for k, v in names.items()}
    config = file.config if layout == DIFFUSERS and file.config else None
    if config is not None:
        if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise AdapterError(file.path, f"config.json describes a {config['_class_name']}; "
                                          f"only {CLASS_NAME} is supported")
        config = {k: config[k] for k in CONFIG_KEYS if k in config}
    else:
        try:
            config = derive_config(shapes)
        except (KeyError, ValueError) as exc:
            raise AdapterError(file.path, f"cannot work out the T2I-Adapter configuration from the tensors: "
                                          f"{exc}") from None
    return layout, prefix, shapes, source, config


def sniff(file: AdapterFile) -> Sniff | None:
    if layout_of(file.keys) is None:
        return None
    try:
        layout, _, _, _, config = _described(file)
        base = base_of(config, file.metadata)
    except (AdapterError, ValueError):
        return Sniff(0.9, layout_of(file.keys)[0], {"family": "stable-diffusion"})  # parse says what is wrong
    return Sniff(0.95, layout, {"base": base, "targets": 0, "family": "stable-diffusion"})


def meta_model(config: dict):
    import torch
    from diffusers import T2IAdapter

    with torch.device("meta"):
        return T2IAdapter(**config)


def parse(file: AdapterFile, found: Sniff, type_name: str) -> Adapter:
    if layout_of(file.keys) is None:
        raise AdapterError(file.path, "not a T2I-Adapter (no adapter.body / body.N.block1 tensors)")
    from adapterhub.conditioning import check_state, control_kind

    layout, prefix, shapes, source, config = _described(file)
    try:
        model = meta_model(config)
    except Exception as exc:  # noqa: BLE001 - a config diffusers refuses is a bad file
        raise AdapterError(file.path, f"invalid T2I-Adapter configuration: {str(exc).splitlines()[0][:200]}") from None
    check_state(file.path, model, shapes, source, CLASS_NAME)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if k in CONFIG_KEYS}
    extra = {"layout": layout, "config": config, "source": source, "control": control_kind(file.metadata, file.config),
             "parameters": sum(math.prod(s) for s in shapes.values())}
    return Adapter(type=type_name, format=layout, patches={}, metadata=dict(file.metadata), path=file.path,
                   file=file, base=base_of(config, file.metadata), extra=extra)


def summary(adapter: Adapter) -> dict:
    config = adapter.extra["config"]
    facts = {"layout": adapter.extra["layout"], "variant": config["adapter_type"],
             "conditioning_channels": config["in_channels"], "channels": list(config["channels"]),
             "num_res_blocks": config["num_res_blocks"], "downscale_factor": config["downscale_factor"],
             "feature_maps": len(feature_maps(config)), "parameters": adapter.extra["parameters"]}
    if adapter.extra.get("control"):
        facts["control"] = adapter.extra["control"]
    return facts


def load_model(adapter: Adapter):
    """The ``T2IAdapter`` (read on first use, then kept in ``adapter.extra["model"]``)."""
    from adapterhub.conditioning import materialise

    if adapter.extra.get("model") is not None:
        return adapter.extra["model"]
    file, source = adapter.file, adapter.extra["source"]
    if file is None:
        raise AdapterError(adapter.path, "the T2I-Adapter's file is not open")
    tensors = file.tensors(source.values())
    state = {k: tensors[v] for k, v in source.items()}
    return materialise(adapter, state, meta_model(adapter.extra["config"]), "T2I-Adapter")


def save(adapter: Adapter, path: Path, format: str | None) -> Path:
    """``diffusers``: a ``T2IAdapter`` folder. ``a1111`` (or ``tencentarc``): one file in TencentARC's
    original layout, what the webui's ControlNet extension loads (.safetensors, or a weights-only
    pickle for .pth/.pt); SD1-shaped adapters only, as TencentARC published no other."""
    from adapterhub.conditioning import save_model_folder

    if format in ("a1111", TENCENTARC):
        return _save_tencentarc(adapter, path)
    return save_model_folder(adapter, load_model(adapter), path, format, "T2I-Adapter")


def original_names(state_keys, config: dict) -> dict[str, str]:
    """TencentARC key -> diffusers key: the inverse of :func:`tencentarc_names`, checked against it."""
    per_stage = config["num_res_blocks"]
    names = {}
    for key in state_keys:
        m = re.fullmatch(r"adapter\.(?:(conv_in\..+)|body\.(\d+)\.(in_conv|out_conv)\.(.+)"
                         r"|body\.(\d+)\.resnets\.(\d+)\.(block[12]\..+))", key)
        if m is None:
            raise ValueError(f"no TencentARC name for {key}")
        if m[1]:
            names[m[1]] = key
        elif m[2] is not None:
            block = int(m[2]) if config["adapter_type"] == LIGHT else int(m[2]) * per_stage
            names[f"body.{block}.{m[3]}.{m[4]}"] = key
        elif config["adapter_type"] == LIGHT:
            names[f"body.{m[5]}.body.{m[6]}.{m[7]}"] = key
        else:
            names[f"body.{int(m[5]) * per_stage + int(m[6])}.{m[7]}"] = key
    back, unused = tencentarc_names(names)
    if unused or len(back) != len(names) or any(names[original] != key for key, original in back.items()):
        raise ValueError("the TencentARC names do not read back to the same tensors")
    return names


def _save_tencentarc(adapter: Adapter, path: Path) -> Path:
    import torch

    from adapterhub.base import METADATA_KEY
    from adapterhub.io import atomic_path, save_safetensors

    config = adapter.extra["config"]
    if config["adapter_type"] == FULL_XL:
        raise AdapterError(path, "an SDXL T2I-Adapter has no TencentARC (a1111) layout; write it as diffusers")
    state = load_model(adapter).state_dict()
    try:
        names = original_names(state, config)
    except ValueError as exc:
        raise AdapterError(path, f"cannot write the TencentARC layout: {exc}") from None
    tensors = {original: state[key].contiguous() for original, key in names.items()}
    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt", ".ckpt", ".bin"):
        with atomic_path(path, suffix=path.suffix) as tmp:
            torch.save(tensors, str(tmp))
        return path
    metadata = {k: v for k, v in adapter.metadata.items() if k != "format"}
    metadata.setdefault(METADATA_KEY, adapter.base)
    return save_safetensors(tensors, path, {"format": "pt", **metadata})


def example_config(unet_config, vae_scale: int = 8) -> dict:
    """A full adapter whose feature maps land where ``unet_config``'s UNet takes them: the SD layout when
    the first down block has cross-attention, else the SDXL one (one more map for the mid block)."""
    widths = list(unet_config.block_out_channels)
    if "CrossAttn" in unet_config.down_block_types[0]:
        return {"in_channels": 3, "channels": widths, "num_res_blocks": 2, "downscale_factor": vae_scale,
                "adapter_type": FULL}
    return {"in_channels": 3, "channels": widths + widths[-1:], "num_res_blocks": 2, "downscale_factor": 2 * vae_scale,
            "adapter_type": FULL_XL}


def example(model, path: Path, seed: int = 0, **options) -> Path:
    """A seeded random ``T2IAdapter`` shaped for ``model``'s UNet, saved as a diffusers folder."""
    import torch
    from diffusers import T2IAdapter

    from adapterhub.base import METADATA_KEY
    from adapterhub.conditioning import write_model_folder
    from adapterhub.weights import architecture_of, component

    unet = component(model, "unet")
    if unet is None:
        raise AdapterError(path, "the model has no unet to build a T2I-Adapter for")
    vae_scale = int(getattr(model, "vae_scale_factor", None) or 8)
    config = example_config(unet.config, vae_scale)
    problem = fit_problem(config, unet.config, vae_scale)
    if problem:
        raise AdapterError(path, f"no T2I-Adapter layout fits this UNet: {problem}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(**config)
        with torch.no_grad():  # keep the features small next to the UNet's activations
            for param in adapter.parameters():
                param.mul_(options.get("scale", 0.5))
    return write_model_folder(adapter, Path(path), {METADATA_KEY: architecture_of(model)})

