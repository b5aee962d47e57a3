"""Opening images from strangers: header-only sizes, RGB conversion, and one error type."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}


class ImageReadError(Exception):
    """An image that cannot be read; the message is one line."""


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return (msg[0] if msg else exc.__class__.__name__)[:200]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), reading only the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageReadError(_describe(exc)) from None
    if w <= 0 or h <= 0:
        raise ImageReadError(f"invalid size {w}x{h}")
    return (h, w) if orientation in _SWAPPED_ORIENTATIONS else (w, h)


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB with transparency composited on ``background`` (palette, LA, RGBA, CMYK, 16-bit)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode == "F":
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """The fully decoded image, orientation applied, as RGB; raises ImageReadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(_describe(exc)) from None
