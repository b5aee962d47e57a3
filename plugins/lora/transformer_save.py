"""Writing Flux / SD3 LoRAs in kohya sd-scripts' names (the reverse of :mod:`.transformer_keys`).

sd-scripts names Flux modules after BFL's model (``lora_unet_double_blocks_0_img_attn_qkv``) and SD3 ones
after SAI's MMDiT (``lora_unet_joint_blocks_0_x_block_attn_qkv``); both fuse modules diffusers keeps apart.
Patches on the parts of one fused module become one LoRA on it:

* the parts present share one ``down`` and scale (a kohya file read back, XLabs' qkv): that ``down`` and
  the parts' ``up`` stacked by rows (zero rows for a missing part), the file's own tensors;
* otherwise block-diagonal: ``down`` is the parts' ``down`` stacked (each padded to the largest rank
  ``r``), ``up`` holds part ``j``'s ``up`` in its rows and rank block ``j`` and zeros elsewhere, so
  ``up @ down`` is exactly each part's product in its rows; a missing part is a zero block. One alpha
  carries a shared scale (``scale * n * r``); differing scales are baked into ``up`` (float32), alpha
  ``n * r``. diffusers' kohya converter and our reader recognise the block structure and give each
  part back its own rank-``r`` LoRA.

DoRA parts join too when every part has a per-output-row magnitude: the magnitudes stacked by the same rows.
A LoKr / LoHa / full diff read from a fused module (each part its rows of it) is written back whole, as read.

BFL's and SAI's final modulation (and SD3's last context modulation) hold (shift, scale) where diffusers
holds (scale, shift): their rows are swapped back. Text encoders as sd-scripts names them: ``lora_te1_`` /
``lora_te2_`` for the CLIP encoders, ``lora_te3_`` for T5.
"""
from __future__ import annotations

import re

import torch

from adapterhub.errors import AdapterError
from adapterhub.keymaps import kohya_name
from adapterhub.types import Adapter

from .dora import ROW, DoRAPatch
from .patches import AdaLoRAPatch, LoRAPatch
from .transformer_keys import DOUBLE, JOINT, SD3_TOP, SINGLE, T5_COMPONENT, T5_PREFIX, TOP, is_swapped

_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
# output rows of each part of a fused module, in multiples of the hidden width (Flux: MLP ratio 4)
PART_WIDTHS = {"attn.to_q": 1, "attn.to_k": 1, "attn.to_v": 1, "attn.add_q_proj": 1, "attn.add_k_proj": 1,
               "attn.add_v_proj": 1, "attn2.to_q": 1, "attn2.to_k": 1, "attn2.to_v": 1, "proj_mlp": 4}
TEXT_ENCODERS = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}


def flux_module_of(target: str) -> tuple[str, tuple[str, ...], int] | None:
    """(kohya name, the diffusers parts it fuses, this target's index among them) of a Flux target."""
    m = _BLOCK.match(target)
    if m is None:
        rest = target.removeprefix("transformer.")
        name = next((bfl for bfl, path in TOP.items() if path == rest), None)
        return (f"lora_unet_{name}", (rest,), 0) if name else None
    table, kind = (DOUBLE, "double") if m[1] == "transformer_blocks" else (SINGLE, "single")
    for bfl, parts in table.items():
        if m[3] in parts:
            return f"lora_unet_{kind}_blocks_{m[2]}_{bfl}", parts, parts.index(m[3])
    return None


def sd3_module_of(target: str) -> tuple[str, tuple[str, ...], int] | None:
    """(kohya name, the diffusers parts it fuses, this target's index among them) of an SD3 target, in
    sd-scripts' names (``lora_unet_joint_blocks_0_x_block_attn_qkv``)."""
    m = _BLOCK.match(target)
    if m is None:
        rest = target.removeprefix("transformer.")
        name = next((sai for sai, path in SD3_TOP.items() if path == rest), None)
        return (f"lora_unet_{name}", (rest,), 0) if name else None
    if m[1] != "transformer_blocks":
        return None
    for sai, parts in JOINT.items():
        if m[3] in parts:
            return f"lora_unet_joint_blocks_{m[2]}_{sai}", parts, parts.index(m[3])
    return None


MODULE_NAMERS = {"flux": flux_module_of, "sd3": sd3_module_of}


def kohya_tensors(adapter: Adapter, module_tensors) -> dict[str, torch.Tensor]:
    """The kohya tensors of a Flux / SD3 adapter; ``module_tensors(name, patch)`` writes one unfused module
    (any kind), as for Stable Diffusion."""
    namer = MODULE_NAMERS.get(adapter.family)
    if namer is None:
        raise AdapterError(adapter.path, f"no kohya names for {adapter.family} modules yet; write it as diffusers "
                                         "or peft")
    fused: dict[str, tuple[tuple[str, ...], list]] = {}
    out: dict[str, torch.Tensor] = {}
    for patch in adapter.patches.values():
        component, _, path = patch.target.partition(".")
        if component in TEXT_ENCODERS[adapter.family]:
            out.update(module_tensors(kohya_name(patch.target, "sdxl"), patch))
            continue
        if component == T5_COMPONENT[adapter.family]:  # sd-scripts: the T5EncoderModel path joined by _
            out.update(module_tensors(T5_PREFIX + path.replace(".", "_"), patch))
            continue
        found = namer(patch.target) if patch.param == "weight" else None
        if found is None:
            what = patch.target if patch.param == "weight" else f"the {patch.param} difference of {patch.target}"
            raise AdapterError(adapter.path, f"{what} has no kohya name for {adapter.family}", patch.source)
        name, parts, index = found
        if len(parts) == 1 and not is_swapped(parts[0], *_out_in(patch)):
            out.update(module_tensors(name, patch))
        else:
            fused.setdefault(name, (parts, [None] * len(parts)))[1][index] = patch
    for name, (parts, patches) in fused.items():
        whole = _whole_module(patches)
        out.update(module_tensors(name, whole) if whole is not None else _fused_module(adapter, name, parts, patches))
    return out


def _whole_module(patches: list) -> object | None:
    """The patch of the whole fused module when the parts are its rows (a LoKr / LoHa / full diff read from a
    fused module: :class:`.fused.RowsPatch`), every row once: written back as the file had it; else None."""
    from .fused import RowsPatch

    if not all(isinstance(p, RowsPatch) and p.inner is patches[0].inner for p in patches):
        return None
    ranges = sorted(r for p in patches for r in p.rows)
    bounds = [0, *(b for _, b in ranges)]
    complete = [a for a, _ in ranges] == bounds[:-1] and bounds[-1] == patches[0].fused_shape[0]
    return patches[0].inner if complete else None


def _out_in(patch) -> tuple[int | None, int | None]:
    """The target weight's (rows, input width) as the patch's tensors tell them."""
    shape = patch.expected_shape()
    if shape:
        return shape[0], (shape[1] if len(shape) > 1 else None)
    if hasattr(patch, "_factor_dims"):  # LoKr: a Kronecker product of (l, m) and (k, n) factors
        (l, m), (k, n) = patch._factor_dims()
        return l * k, m * n
    return getattr(patch, "out_features", None), getattr(patch, "in_features", None)


def _factors(adapter: Adapter, name: str, patch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) of a patch joining a fused or swapped module: a plain LoRA's own tensors, an
    AdaLoRA's ``A * E`` (float32); other kinds cannot join (their product is no stack of rows)."""
    from .save import low_rank

    if not isinstance(patch, (LoRAPatch, AdaLoRAPatch)) or "mid" in patch.tensors:
        # PEFT holds a LoHa per module; a LoKr's factor shapes no other layout here can carry
        where = "write it as peft" if patch.kind == "loha" else "keep it in its own layout"
        raise AdapterError(adapter.path, f"a {patch.kind} on {patch.target} cannot join the fused kohya module "
                                         f"{name} (only LoRA factors can); {where}", patch.source)
    return low_rank(adapter, patch, "kohya")


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def _fused_module(adapter: Adapter, name: str, parts: tuple[str, ...], patches: list) -> dict[str, torch.Tensor]:
    if any(isinstance(p, DoRAPatch) for p in patches):
        return _fused_dora(adapter, name, parts, patches)
    factors = [None if p is None else _factors(adapter, name, p) for p in patches]
    present = [f for f in factors if f is not None]
    up0, down0, scale0 = present[0]
    if len(parts) == 1:  # a final modulation: rows swapped back to BFL's / SAI's (shift, scale)
        half = up0.shape[0] // 2
        return {f"{name}.lora_down.weight": down0, f"{name}.lora_up.weight": torch.cat([up0[half:], up0[:half]]),
                f"{name}.alpha": _alpha(scale0 * down0.shape[0])}
    shared = all(s == scale0 and u.dtype == up0.dtype and d.dtype == down0.dtype and torch.equal(d, down0)
                 for u, d, s in present)
    if shared:  # one down: the parts' up stacked, zero rows for a missing part
        width = down0.shape[1]
        ups = [f[0] if f is not None else torch.zeros(PART_WIDTHS[part] * width, down0.shape[0], dtype=up0.dtype)
               for f, part in zip(factors, parts)]
        return {f"{name}.lora_down.weight": down0, f"{name}.lora_up.weight": torch.cat(ups),
                f"{name}.alpha": _alpha(scale0 * down0.shape[0])}
    return _block_diagonal(name, parts, factors)


def _fused_dora(adapter: Adapter, name: str, parts: tuple[str, ...], patches: list) -> dict[str, torch.Tensor]:
    """DoRA on every part of a fused module, each magnitude per output row: the inner LoRAs joined as any parts
    are and the magnitudes stacked by the same rows, ``(out, 1)`` (each row's norm is its own: the fused module's
    DoRA is exactly its parts'). A part without DoRA (its rows would need the base's norms) or a magnitude per
    input channel split across parts is refused, naming where it goes instead: a missing part, to the layouts that
    keep diffusers' modules apart (peft, diffusers); a plain LoRA part or a per-column magnitude, which those
    refuse too (:func:`.save.refuse_dora_mix`, :func:`.save.peft_magnitude`), to its own layout.
    A swapped module (one part) has its rows swapped back."""
    for patch, part in zip(patches, parts):
        ok = isinstance(patch, DoRAPatch) and (len(parts) == 1 or patch.side_for(patch.expected_shape()) == ROW)
        if not ok:
            first = next(p for p in patches if isinstance(p, DoRAPatch))
            has = "one per input channel" if isinstance(patch, DoRAPatch) else "no DoRA magnitude"
            where = "write it as peft or diffusers" if patch is None else "keep it in its own layout"
            raise AdapterError(adapter.path, f"the DoRA parts of the fused kohya module {name} cannot be joined: "
                                             f"{part} has {has}; {where}", first.source)
    out = _fused_module(adapter, name, parts, [p.inner for p in patches])
    if len(parts) == 1 and patches[0].side_for(patches[0].expected_shape()) != ROW:
        magnitude = patches[0].magnitude  # a column's norm does not depend on the rows' order
    else:
        rows = torch.cat([p.magnitude.reshape(-1) for p in patches])
        if len(parts) == 1:  # (scale, shift) back to BFL's / SAI's (shift, scale), as the factors' rows
            half = rows.shape[0] // 2
            rows = torch.cat([rows[half:], rows[:half]])
        magnitude = rows.reshape(-1, 1)
    return {**out, f"{name}.dora_scale": magnitude.contiguous()}


def _block_diagonal(name: str, parts: tuple[str, ...], factors: list) -> dict[str, torch.Tensor]:
    present = [f for f in factors if f is not None]
    n, r, width = len(parts), max(d.shape[0] for _, d, _ in present), present[0][1].shape[1]
    same_scale = all(s == present[0][2] for _, _, s in present)
    dtypes = {t.dtype for u, d, _ in present for t in (u, d)}
    dtype = dtypes.pop() if len(dtypes) == 1 and same_scale else torch.float32
    rows = [f[0].shape[0] if f is not None else PART_WIDTHS[part] * width for f, part in zip(factors, parts)]
    down = torch.zeros(n * r, width, dtype=dtype)
    up = torch.zeros(sum(rows), n * r, dtype=dtype)
    start = 0
    for j, found in enumerate(factors):
        if found is not None:
            u, d, s = found
            down[j * r: j * r + d.shape[0]] = d.to(dtype)
            up[start: start + rows[j], j * r: j * r + d.shape[0]] = u.to(dtype) if same_scale else u.float() * s
        start += rows[j]
    scale = present[0][2] if same_scale else 1.0
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": _alpha(scale * n * r)}
