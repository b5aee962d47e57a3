"""Contact sheets and labelled X/Y/Z grids, laid out as the webui's ``modules/images.py`` does.

``make_grid`` is the plain contact sheet of ``adapterhub sample --grid``. ``xyz_grid`` is the X/Y/Z
plot's sheet: per Z value one grid of X columns by Y rows, the X labels centred over the columns and
the Y labels in a strip on the left (``draw_grid_annotations``: font size ``(w + h) // 25``, line
spacing half of it, a left strip of 3/4 of a cell's width, labels wrapped at word boundaries, here
half a line's spacing narrower than a cell so that neighbouring labels never touch); with
a Z axis those grids side by side under their Z labels. Text uses PIL's default font (FreeType
Aileron when Pillow has FreeType) at a floor of 12 px, so labels stay readable on small cells, and
the left strip grows to fit the widest single word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FONT = 12
Box = tuple[int, int, int, int]  # left, top, right, bottom


def grid_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols): the webui's default is round(sqrt(n)) rows."""
    if rows is None or rows <= 0:
        rows = max(1, min(n, round(math.sqrt(n))))
    return rows, math.ceil(n / rows)


def make_grid(images: list, rows: int | None = None, labels: list[str] | None = None):
    """One image with ``images`` (same size) in rows; ``labels`` are drawn on a strip under each."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images for a grid")
    rows, cols = grid_shape(len(images), rows)
    w, h = images[0].size
    strip = 14 if labels else 0
    sheet = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        sheet.paste(image.convert("RGB").resize((w, h)), (x, y))
        if labels:
            draw.text((x + 2, y + h + 1), str(labels[i])[: max(1, w // 6)], fill="black")
    return sheet


# ---------------------------------------------------------------------------------------------
# X/Y/Z grids
# ---------------------------------------------------------------------------------------------
@dataclass
class Sheet:
    """A grid image and where each cell landed in it (grid order: X fastest, then Y, then Z)."""

    image: object
    boxes: list[Box]


def image_grid(images: list, rows: int):
    """``images.image_grid`` with fixed rows: row-major, black where a row is short."""
    from PIL import Image

    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), (i % cols * w, i // cols * h))
    return sheet


def _font(cell_w: int, cell_h: int):
    from PIL import ImageFont

    size = max(MIN_FONT, (cell_w + cell_h) // 25)
    return ImageFont.load_default(size=size), size


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """Words joined into lines no wider than ``width`` (a longer word gets a line of its own)."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _line_heights(draw, lines: list[str], font) -> list[int]:
    heights = []
    for line in lines:
        _, top, _, bottom = draw.multiline_textbbox((0, 0), line, font=font)
        heights.append(bottom - top)
    return heights


def annotate(sheet, cell_w: int, cell_h: int, top: list[str], left: list[str]):
    """``draw_grid_annotations``: ``top`` labels centred over the columns, ``left`` labels centred on
    the rows in a left strip (none when every left label is empty). Returns (image, (dx, dy)): the
    annotated image and where the sheet's top-left corner went."""
    from PIL import Image, ImageDraw

    font, size = _font(cell_w, cell_h)
    spacing = size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))
    words = [w for text in left for w in text.split()]
    pad_left = 0
    if words:
        widest = max(measure.textlength(w, font=font) for w in words)
        pad_left = max(cell_w * 3 // 4, math.ceil(widest) + spacing)
    top_lines = [_wrap(measure, t, font, cell_w - spacing) for t in top]  # a gap between neighbours
    left_lines = [_wrap(measure, t, font, pad_left) for t in left]
    top_heights = [_line_heights(measure, lines, font) for lines in top_lines]
    left_heights = [_line_heights(measure, lines, font) for lines in left_lines]
    block = [sum(h) + spacing * (len(h) - 1) for h in top_heights]
    pad_top = max(block) + spacing * 2
    result = Image.new("RGB", (sheet.width + pad_left, sheet.height + pad_top), "white")
    result.paste(sheet, (pad_left, pad_top))
    draw = ImageDraw.Draw(result)

    def texts(x: float, y: float, lines: list[str], heights: list[int]) -> None:
        for line, height in zip(lines, heights):
            draw.text((x, y + height / 2), line, font=font, fill="black", anchor="mm")
            y += height + spacing

    for col, (lines, heights) in enumerate(zip(top_lines, top_heights)):
        texts(pad_left + cell_w * col + cell_w / 2, pad_top / 2 - block[col] / 2, lines, heights)
    for row, (lines, heights) in enumerate(zip(left_lines, left_heights)):
        height = sum(heights) + spacing * (len(heights) - 1)
        texts(pad_left / 2, pad_top + cell_h * row + cell_h / 2 - height / 2, lines, heights)
    return result, (pad_left, pad_top)


def xyz_grid(images: list, nx: int, ny: int = 1, nz: int = 1, x_labels: list[str] | None = None,
             y_labels: list[str] | None = None, z_labels: list[str] | None = None, legend: bool = True) -> Sheet:
    """The X/Y/Z plot sheet of ``nx * ny * nz`` same-size ``images`` in grid order (index
    ``ix + iy * nx + iz * nx * ny``); labels are drawn when ``legend`` (Z labels only with a Z axis)."""
    if len(images) != nx * ny * nz or not images:
        raise ValueError(f"{len(images)} images for a {nx}x{ny}x{nz} grid")
    w, h = images[0].size
    per_z = nx * ny
    subs, offsets = [], []
    for iz in range(nz):
        sub = image_grid(images[iz * per_z:(iz + 1) * per_z], rows=ny)
        offset = (0, 0)
        if legend:
            sub, offset = annotate(sub, w, h, list(x_labels or [""] * nx), list(y_labels or [""] * ny))
        subs.append(sub)
        offsets.append(offset)
    sub_w, sub_h = subs[0].size
    sheet, shift = (subs[0], (0, 0)) if nz == 1 else (image_grid(subs, rows=1), (0, 0))
    if nz > 1 and legend:
        sheet, shift = annotate(sheet, sub_w, sub_h, list(z_labels or [""] * nz), [""])
    boxes = []
    for iz in range(nz):
        for iy in range(ny):
            for ix in range(nx):
                left = shift[0] + iz * sub_w + offsets[iz][0] + ix * w
                top = shift[1] + offsets[iz][1] + iy * h
                boxes.append((left, top, left + w, top + h))
    return Sheet(sheet, boxes)
