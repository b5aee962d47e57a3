"""Block weights ("LoRA Block Weight"): one multiplier per UNet block, by the extension's conventions.

The AUTOMATIC1111 extension hako-mikan/sd-webui-lora-block-weight names 26 slots after the original
(LDM/SGM) UNet: ``BASE`` (the text encoders), ``IN00``..``IN11`` (``input_blocks.N``), ``MID``
(``middle_block``; the extension writes ``M00``) and ``OUT00``..``OUT11`` (``output_blocks.N``). A vector
gives a value to some of them:

=========  =====  ==========================================================================
family     count  slots
=========  =====  ==========================================================================
sd1, sd2   17     BASE IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11 (the attention blocks)
sd1, sd2   26     every slot (LyCORIS: convs in resnets and samplers too)
sdxl       12     BASE IN04 IN05 IN07 IN08 MID OUT00..OUT05 (the attention blocks)
sdxl       20     BASE IN00..IN08 MID OUT00..OUT08
=========  =====  ==========================================================================

As in the extension (``to26``), a slot the vector does not list gets 0, and a module in no slot
(``conv_out``, ``time_embedding``, ``add_embedding``) keeps its plain multiplier (factor 1). kohya's
``--lbws`` differs on one point: it gives unlisted slots 1.

:data:`BLOCK_TABLE` maps each slot to diffusers module paths (``input_blocks.{1+3i+j}`` is
``down_blocks.i.{resnets,attentions}.j``, the downsampler of level ``i`` is ``input_blocks.{3i+3}``,
``output_blocks.{3i+j}`` is ``up_blocks.i.{resnets,attentions}.j`` with the upsampler in ``j = 2``),
for UNets with two layers per block (every SD1, SD2 and SDXL UNet, and the tiny bases).

Presets (:data:`PRESETS`): the extension's defaults ``NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL
ALL0.5`` for SD1/SD2 (17 values), and the same names for SDXL (12 values), read as the same groups:
``S`` shallow / ``D`` deep, ``IN`` / ``OUT`` side, each with ``BASE`` (the extension ships SD1 values
only; the SDXL reading is adapterhub's).
"""
from __future__ import annotations

import math
from typing import Sequence

from adapterhub.errors import AdapterhubError

SLOTS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))

_SD1_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12)))
_SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))
_SDXL_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
LAYOUTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd1": {17: _SD1_17, 26: SLOTS},
    "sdxl": {12: _SDXL_12, 20: _SDXL_20},
}


def _level(side: str, i: int, j: int) -> tuple[str, ...]:
    return (f"unet.{side}.{i}.resnets.{j}", f"unet.{side}.{i}.attentions.{j}")


# slot -> the diffusers module paths (with their component) whose modules belong to it
BLOCK_TABLE: dict[str, tuple[str, ...]] = {
    "BASE": ("text_encoder", "text_encoder_2"),
    "IN00": ("unet.conv_in",),
    "IN01": _level("down_blocks", 0, 0),
    "IN02": _level("down_blocks", 0, 1),
    "IN03": ("unet.down_blocks.0.downsamplers.0",),
    "IN04": _level("down_blocks", 1, 0),
    "IN05": _level("down_blocks", 1, 1),
    "IN06": ("unet.down_blocks.1.downsamplers.0",),
    "IN07": _level("down_blocks", 2, 0),
    "IN08": _level("down_blocks", 2, 1),
    "IN09": ("unet.down_blocks.2.downsamplers.0",),
    "IN10": _level("down_blocks", 3, 0),
    "IN11": _level("down_blocks", 3, 1),
    "MID": ("unet.mid_block",),
    "OUT00": _level("up_blocks", 0, 0),
    "OUT01": _level("up_blocks", 0, 1),
    "OUT02": (*_level("up_blocks", 0, 2), "unet.up_blocks.0.upsamplers.0"),
    "OUT03": _level("up_blocks", 1, 0),
    "OUT04": _level("up_blocks", 1, 1),
    "OUT05": (*_level("up_blocks", 1, 2), "unet.up_blocks.1.upsamplers.0"),
    "OUT06": _level("up_blocks", 2, 0),
    "OUT07": _level("up_blocks", 2, 1),
    "OUT08": (*_level("up_blocks", 2, 2), "unet.up_blocks.2.upsamplers.0"),
    "OUT09": _level("up_blocks", 3, 0),
    "OUT10": _level("up_blocks", 3, 1),
    "OUT11": (*_level("up_blocks", 3, 2), "unet.up_blocks.3.upsamplers.0"),
}
_SLOT_OF_PATH = {path: slot for slot, paths in BLOCK_TABLE.items() for path in paths}

PRESETS: dict[str, dict[str, tuple[float, ...]]] = {
    "sd1": {  # the extension's DEF_WEIGHT_PRESET, in _SD1_17 order
        "NONE": (0,) * 17,
        "ALL": (1,) * 17,
        "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
        "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
        "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
        "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
        "ALL0.5": (0.5,) * 17,
    },
    "sdxl": {  # _SDXL_12 order: BASE, IN04 IN05 (shallow), IN07 IN08 (deep), MID, OUT00-02 (deep), OUT03-05 (shallow)
        "NONE": (0,) * 12,
        "ALL": (1,) * 12,
        "INS": (1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        "IND": (1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0),
        "INALL": (1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0),
        "MIDD": (1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0),
        "OUTD": (1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0),
        "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1),
        "OUTALL": (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1),
        "ALL0.5": (0.5,) * 12,
    },
}

def block_of(target: str) -> str | None:
    """The slot of a canonical target path (``unet.down_blocks.1.attentions.0...to_q`` -> ``IN04``),
    or None for a module outside every block."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        slot = _SLOT_OF_PATH.get(".".join(parts[:n]))
        if slot is not None:
            return slot
    return None


def family_of(model) -> str:
    """``sd1`` (SD1, SD2 and the tiny SD1: 17/26 values) or ``sdxl`` (12/20 values)."""
    from adapterhub.weights import architecture_of, component

    arch = architecture_of(model)
    if arch in ("sd1", "sd2", "tiny-sd1"):
        return "sd1"
    if arch in ("sdxl", "tiny-sdxl"):
        return "sdxl"
    return "sdxl" if component(model, "text_encoder_2") is not None else "sd1"


def check_layout(model) -> None:
    """Block weights follow the two-layers-per-block layout of every SD UNet; refuse any other."""
    from adapterhub.weights import component

    unet = component(model, "unet")
    layers = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if layers != 2:
        raise AdapterhubError(f"block weights need a UNet with 2 layers per block (this one has {layers})")


def parse(text: str) -> str | tuple[float, ...]:
    """``lbw=`` text: a preset name (kept as a name, resolved per model family) or numbers."""
    text = text.strip()
    if not text:
        raise AdapterhubError("lbw= is empty: give a preset name or comma-separated numbers")
    if "," not in text and parse_number(text) is None:
        name = text.upper()
        if not any(name in presets for presets in PRESETS.values()):
            raise AdapterhubError(f"lbw={text}: unknown preset (known: {', '.join(PRESETS['sd1'])})")
        return name
    values = []
    for item in text.split(","):
        value = parse_number(item)
        if value is None:
            raise AdapterhubError(f"lbw={text}: {item.strip()!r} is not a number")
        values.append(value)
    return tuple(values)


def resolve(spec: str | Sequence[float], family: str) -> dict[str, float]:
    """All 26 slot factors for a preset name or a vector of one of ``family``'s lengths."""
    if isinstance(spec, str):
        spec = parse(spec)
    values = tuple(float(v) for v in (PRESETS[family][spec] if isinstance(spec, str) else spec))
    layouts = LAYOUTS[family]
    if len(values) not in layouts:
        counts = " or ".join(str(n) for n in layouts)
        raise AdapterhubError(f"block weights for {family} take {counts} values, not {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise AdapterhubError(f"block weights must be finite numbers: {values}")
    factors = dict.fromkeys(SLOTS, 0.0)
    factors.update(zip(layouts[len(values)], values))
    return factors


def factor(target: str, factors: dict[str, float]) -> float:
    """The block factor of one target (1 for a module in no block)."""
    slot = block_of(target)
    return 1.0 if slot is None else factors[slot]


def parse_number(text: str) -> float | None:
    """``float(text)``, or None when it is not a number."""
    try:
        return float(text.strip())
    except ValueError:
        return None
