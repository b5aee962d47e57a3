"""What an adapter changes, block by block: the norm of its weight deltas per UNet block, and a chart of them.

A picture a person can read for any weight-space adapter (LoRA, LoCon, LoHa, LoKr, AdaLoRA ...), real or
random: where in the model it acts. Used by ``inspect --plot`` and by ``demo`` (whose tiny base has random
weights, so its rendered images are noise whatever the adapters do).

Blocks are the "LoRA Block Weight" slots of :mod:`adapterhub.blocks` (``BASE`` for the text encoders,
``IN00``..``IN11``, ``MID``, ``OUT00``..``OUT11``), plus ``other`` for modules in no block (``conv_in``,
``time_embedding`` ...). A transformer (FLUX.1, SD3) has a bar per block instead: ``D00``.. its double-stream
blocks (SD3: ``J00``.. its joint blocks; diffusers' ``transformer_blocks.N``), then ``S00``.. Flux's single-stream
blocks (``single_transformer_blocks.N``), ``other`` for the embedders and the final layer. A block's norm is the Frobenius norm of all its deltas together at multiplier 1:
``sqrt(sum over its modules of ||delta||^2)``, the change ``merge`` makes to those weights.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


from adapterhub.blocks import SLOTS, block_of
from adapterhub.errors import AdapterError

ORDER = (*SLOTS, "other")


_TRANSFORMER_BLOCK = re.compile(r"transformer\.(single_transformer_blocks|transformer_blocks)\.(\d+)\.")


def slot_of(target: str, family: str | None = None) -> str:
    """The block of a canonical target path: ``BASE`` for a text encoder, ``other`` outside every block; a
    transformer's ``D``/``J``/``S`` + its block number (``J`` for ``family`` ``sd3``'s joint blocks)."""
    if target.startswith("text_encoder"):
        return "BASE"
    found = _TRANSFORMER_BLOCK.match(target)
    if found is not None:
        letter = "S" if found[1].startswith("single") else "J" if family == "sd3" else "D"
        return f"{letter}{int(found[2]):02d}"
    if target.startswith("transformer."):
        return "other"
    return block_of(target) or "other"


def _model_order(slot: str) -> tuple:
    """UNet slots in :data:`ORDER`; transformer blocks after ``BASE``, double / joint before single, by number."""
    if slot in ORDER[:-1]:
        return (0, ORDER.index(slot), 0)
    if slot == "other":
        return (3, 0, 0)
    return (1 if slot[0] in "DJ" else 2, 0, int(slot[1:]))


def block_norms(adapter) -> dict[str, float]:
    """Block -> norm of the adapter's deltas there (blocks it does not touch are left out), in model order.

    Raises :class:`AdapterError` naming the file for a type that is no weight delta (textual inversion,
    hypernetwork, ControlNet ...: attached at run time, nothing to measure per block)."""
    return measure(adapter)[0]


def measure(adapter) -> tuple[dict[str, float], int]:
    """(:func:`block_norms`, how many patches have no norm of their own: a change that depends on the base weights,
    or a shape the file leaves open; those are not drawn)."""
    if not adapter.plugin.weight_space:
        raise AdapterError(adapter.path, f"a {adapter.type} has no weight deltas to plot per block (it is attached "
                                         "at run time, not merged)")
    squares: dict[str, float] = {}
    family, unmeasured = getattr(adapter, "family", None), 0
    for patch in adapter.patches.values():
        value = patch.squared_norm()  # the patch's own (Patch.squared_norm): no type's formula here
        if value is None:
            unmeasured += 1
        else:
            slot = slot_of(patch.target, family)
            squares[slot] = squares.get(slot, 0.0) + value
    norms = {slot: squares[slot] ** 0.5 for slot in sorted(squares, key=_model_order) if squares[slot] > 0.0}
    return norms, unmeasured


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def draw_chart(rows: Sequence[tuple[str, dict[str, float] | str]], title: str = ""):
    """A PIL image: one bar row per adapter, ``(label, {block: norm})``, each row scaled to its own largest
    block (its value printed), the blocks in model order on a shared axis; ``(label, "text")`` writes the text
    in place of bars (an adapter with nothing to measure)."""
    from PIL import Image, ImageDraw

    used = sorted({s for _, n in rows if isinstance(n, dict) for s in n}, key=_model_order) or list(ORDER[:1])
    label_w, bar_w, row_h, top, bottom = 210, 30, 70, 52, 34
    width = max(label_w + bar_w * len(used) + 20, 640)
    image = Image.new("RGB", (width, top + row_h * max(len(rows), 1) + bottom), "white")
    draw, font, small = ImageDraw.Draw(image), _font(14), _font(11)
    draw.text((10, 8), title or "what each adapter changes, per block", fill="black", font=font)
    draw.text((10, 28), "bar: norm of the weight change in the block, each row scaled to its own largest block",
              fill="dimgray", font=small)
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
    for r, (label, norms) in enumerate(rows):
        y0 = top + r * row_h
        draw.line((10, y0, width - 10, y0), fill="#dddddd")
        draw.text((10, y0 + 8), label[:28], fill="black", font=font)
        if not isinstance(norms, dict):
            draw.text((label_w, y0 + 24), str(norms), fill="dimgray", font=small)
            continue
        peak = max(norms.values(), default=0.0)
        draw.text((10, y0 + 30), f"largest: {peak:.3g}", fill="dimgray", font=small)
        for i, slot in enumerate(used):
            value = norms.get(slot, 0.0)
            h = 0 if peak <= 0 else round((row_h - 14) * value / peak)
            x = label_w + i * bar_w
            draw.rectangle((x + 3, y0 + row_h - 4 - h, x + bar_w - 3, y0 + row_h - 4),
                           fill=palette[r % len(palette)] if h else None)
    base_y = top + row_h * max(len(rows), 1)
    for i, slot in enumerate(used):
        short = slot.replace("OUT", "O").replace("IN", "I").replace("BASE", "TE").replace("other", "oth")
        draw.text((label_w + i * bar_w + 2, base_y + 6), short, fill="black", font=small)
    draw.text((10, base_y + 6), "blocks (TE: text encoder)", fill="dimgray", font=small)
    return image


def save_chart(rows: Sequence[tuple[str, dict[str, float] | str]], path: str | Path, title: str = "") -> Path:
    """:func:`draw_chart` written to ``path`` as a PNG, atomically (nothing half written)."""
    from adapterhub.io import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        draw_chart(rows, title).save(tmp, format="PNG")
    return path
