"""Contact sheets: images in a grid, as the webui's ``image_grid`` lays them out."""
from __future__ import annotations

import math


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
