"""The webui's ``parameters`` text ("infotext"): writing it, reading it back, and the hashes it names.

Layout, quoting and key order follow AUTOMATIC1111 v1.9/1.10 ``create_infotext`` and
``infotext_utils.parse_generation_parameters`` (sampling.md §1): the prompt as typed (``<lora:…>`` tags
included), an optional ``Negative prompt:`` line, then ``Key: value, …`` with ``Steps`` first; a value
containing ``,``, ``:`` or a newline is JSON-quoted.

Each adapter's fields are its type's (``AdapterType.infotext_fields``, whose values
:mod:`adapterhub.infotext_fields` computes): hash lists are joined here and units numbered, as the
sd-webui-controlnet extension writes its units: one ``ControlNet N`` key per unit whose value is
``Field: value, …``, so the whole value is JSON-quoted like any value with commas.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterhub import hashes
# the values the types write (core, below the plugins); named here too, where the service's readers look
from adapterhub.infotext_fields import CONTROL_FIELD, control_unit, embedding_hash, lora_hash, short_hash  # noqa: F401

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # infotext_utils.re_param_code
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
KEY_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
             "VAE", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "RNG", "Tiling",
             "Hires upscale", "Hires steps", "Hires upscaler", "Lora hashes", "TI hashes", "Emphasis", "Version")
DEFAULTS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}


def quote(text: Any) -> Any:
    """``infotext_utils.quote``: JSON-quote a value containing ``,``, ``\\n`` or ``:``."""
    s = str(text)
    if "," not in s and "\n" not in s and ":" not in s:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def number(value: float) -> str:
    """A float the way real infotexts show it: ``7`` for 7.0, else Python's shortest repr."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def ordered(params: Mapping[str, Any]) -> dict[str, Any]:
    """The webui's key order; unknown keys keep their order, before ``Version``."""
    known = {k: params[k] for k in KEY_ORDER if k in params and k != "Version"}
    extra = {k: v for k, v in params.items() if k not in KEY_ORDER}
    tail = {"Version": params["Version"]} if "Version" in params else {}
    return {**known, **extra, **tail}


def create(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The ``parameters`` text, exactly as ``create_infotext`` joins it (``None`` values skipped)."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in ordered(params).items() if v is not None)
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{line}".strip()


def parse(text: str, defaults: bool = True) -> dict[str, Any]:
    """``parse_generation_parameters``: ``Prompt``, ``Negative prompt`` and every key (strings, quoted
    values unquoted; ``Size`` also as ``Size-1``/``Size-2``). The last line counts as parameters only
    when the webui's regex finds at least three ``key: value`` pairs on it."""
    res: dict[str, Any] = {}
    prompt, negative = "", ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in RE_PARAM.findall(lastline):
        value = unquote(value.strip())
        m = RE_SIZE.match(value) if isinstance(value, str) else None
        if m:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        res[key] = value
    if defaults:
        for key, value in DEFAULTS.items():
            res.setdefault(key, value)
    return res


def split(text: str) -> tuple[str, str]:
    """(the prompt and negative lines, the parameter line), by :func:`parse`'s rule; the parameter
    line is ``""`` when the last line has fewer than three ``key: value`` pairs."""
    text = text.strip()
    head, _, last = text.rpartition("\n")
    if len(RE_PARAM.findall(last)) < 3:
        return text, ""
    return head, last


def insert(text: str, params: Mapping[str, Any]) -> str:
    """``text`` with ``params`` added to its parameter line: a key already there keeps its place and
    takes the new value (None removes it), a new key goes in the webui's order (before ``Version``).
    Values already there are re-quoted exactly as :func:`create` quoted them."""
    head, line = split(text)
    current: dict[str, Any] = {key: unquote(value.strip()) for key, value in RE_PARAM.findall(line)}
    current.update(params)
    joined = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in ordered(current).items() if v is not None)
    return f"{head}\n{joined}".strip()


def hashes_text(pairs: Mapping[str, str]) -> str | None:
    """``name: hash, …`` with ``:`` and ``,`` removed from names (``Lora hashes``, ``TI hashes``)."""
    drop = str.maketrans("", "", ":,")
    text = ", ".join(f"{k.translate(drop)}: {v}" for k, v in pairs.items() if v)
    return text or None


def parse_hashes(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        name, sep, value = item.strip().rpartition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------
# hashes (sampling.md §1.6)
# ---------------------------------------------------------------------------------------------
def model_hash(path: str | Path) -> str:
    """``Model hash`` (AutoV2): sha256 of the whole checkpoint, first 10 hex digits. For a diffusers
    folder (which the webui cannot load) the sha256 of its files in path order."""
    return hashes.sha256_file(path)[:10]


# ---------------------------------------------------------------------------------------------
# ControlNet units (sd-webui-controlnet ``ControlNetUnit.serialize`` / ``parse``)
# ---------------------------------------------------------------------------------------------
CONTROL_KEY = re.compile(r"^ControlNet (\d+)$")


def adapter_fields(stack, prompt: str = "", only: str | None = None, compute=None) -> dict[str, str]:
    """The infotext fields the entries of ``stack`` (applied, so that its adapters are loaded) add, in stack
    order, as each entry's type says (``AdapterType.infotext_fields``): hash lists joined (:func:`hashes_text`),
    units numbered. ``only`` keeps one field (its values alone are computed); ``compute(value)`` turns a
    callable value into its text (the generator caches file hashes; default: calls it)."""
    lists: dict[str, dict[str, str]] = {}
    units: dict[str, str] = {}
    counts: dict[str, int] = {}
    for entry in getattr(stack, "entries", None) or ():
        adapter = entry.adapter
        if adapter is None:
            continue
        for field, name, value in adapter.plugin.infotext_fields(adapter, entry, prompt):
            if only is not None and field != only or name is not None and name in lists.get(field, {}):
                continue
            if callable(value):
                value = compute(value) if compute is not None else value()
            if name is None:
                units[f"{field} {counts.get(field, 0)}"] = value
                counts[field] = counts.get(field, 0) + 1
            else:
                lists.setdefault(field, {})[name] = value
    joined = {field: hashes_text(pairs) for field, pairs in lists.items()}
    return {**{k: v for k, v in joined.items() if v is not None}, **units}


def control_units(stack) -> dict[str, str]:
    """``ControlNet 0``, ``ControlNet 1`` … for the conditioning entries of ``stack`` (applied, so that its
    adapters are loaded), in stack order."""
    return adapter_fields(stack, only=CONTROL_FIELD)


def _typed(value: str) -> Any:
    if value in ("True", "False"):
        return value == "True"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def parse_control_unit(text: str) -> dict[str, Any]:
    """A unit's value as the extension reads it: items split at ``,``, each at ``": "``, display names
    to field names (``Guidance Start`` -> ``guidance_start``), values typed (bool, int, float, str).
    ValueError when an item is not ``Field: value``."""
    unit: dict[str, Any] = {}
    for item in text.split(","):
        parts = item.strip().split(": ")
        if len(parts) != 2:
            raise ValueError(f"ControlNet unit item {item.strip()!r} is not 'Field: value'")
        key, value = parts
        unit["_".join(word.lower() for word in key.split(" "))] = _typed(value)
    return unit


def control_units_of(fields: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The parsed ``ControlNet N`` units of :func:`parse`'s result (a malformed unit is skipped)."""
    units = {}
    for key, value in fields.items():
        if CONTROL_KEY.match(key) and isinstance(value, str):
            try:
                units[key] = parse_control_unit(value)
            except ValueError:
                continue
    return units


# ---------------------------------------------------------------------------------------------
# where images keep it: PNG text chunks, JPEG / WebP EXIF UserComment
# ---------------------------------------------------------------------------------------------
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
# UserComment's 8-byte character-code prefix (EXIF 2.3 §4.6.5, table 9) -> Python codec
COMMENT_CODES = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # ``sample --format`` -> Pillow's format
JPEG_QUALITY = 95  # the webui's default is 80; images meant to be re-run keep more of their detail
JPEG_EXIF_LIMIT = 65533  # the most an APP1 segment holds after its length ("Exif\0\0", TIFF header, IFDs, data)


def pnginfo(parameters: str):
    """A ``PngInfo`` with the ``parameters`` chunk (Pillow writes iTXt when the text is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def user_comment(text: str) -> bytes:
    """EXIF ``UserComment`` as the webui writes it (``piexif.helper.UserComment.dump(text, encoding="unicode")``):
    the ``UNICODE`` prefix, then UTF-16 big-endian."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def read_user_comment(raw: bytes | str) -> str:
    """A ``UserComment``'s text: decoded by its prefix (``UNICODE``: UTF-16 big-endian, as piexif writes it; by
    its byte order mark if it has one; little-endian when that reads as more ASCII), else as UTF-8 without the
    prefix's NULs, as the webui falls back; trailing NULs dropped."""
    if isinstance(raw, str):
        return raw.rstrip("\0")
    prefix, body = raw[:8], raw[8:]
    codec = COMMENT_CODES.get(prefix)
    if codec == "utf-16-be" and body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        codec = "utf-16"
    elif codec == "utf-16-be" and _ascii_share(body, "utf-16-le") > _ascii_share(body, "utf-16-be"):
        codec = "utf-16-le"  # exiftool writes UTF-16 in the EXIF's byte order; piexif always big-endian
    if codec is None:
        body = raw[8:] if prefix == b"\0" * 8 else raw
        codec = "utf-8"
    return body.decode(codec, errors="replace" if codec != "utf-8" else "ignore").rstrip("\0")


def _ascii_share(body: bytes, codec: str) -> int:
    """How many characters of ``body`` read as ``codec`` are printable ASCII (an infotext is mostly ASCII)."""
    return sum(32 <= ord(c) < 127 for c in body.decode(codec, errors="replace"))


def exif(parameters: str):
    """A Pillow ``Exif`` carrying ``parameters`` as its ``UserComment``, for JPEG and WebP."""
    from PIL import Image

    data = Image.Exif()
    data.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(parameters)
    return data


def save_image(image, target, parameters: str, fmt: str = "png") -> None:
    """Write ``image`` to ``target`` (a path or a binary file) as ``fmt`` (png, jpg, webp) with the infotext
    where the webui keeps it: PNG ``parameters`` chunk; JPEG (quality :data:`JPEG_QUALITY`) and WebP
    (lossless) EXIF ``UserComment``. A text too long for JPEG's EXIF segment is a one-line error."""
    from adapterhub.errors import AdapterhubError

    kind = FORMATS[fmt]
    if kind == "PNG":
        image.save(target, format=kind, pnginfo=pnginfo(parameters))
        return
    data = exif(parameters).tobytes()
    if kind == "JPEG" and len(data) > JPEG_EXIF_LIMIT:
        raise AdapterhubError(f"{target}: the parameters text is too long for a JPEG's EXIF segment ({len(data)} "
                              f"bytes, at most {JPEG_EXIF_LIMIT}): use --format png or webp")
    options = {"quality": JPEG_QUALITY} if kind == "JPEG" else {"lossless": True}
    image.convert("RGB").save(target, format=kind, exif=data, **options)


def image_user_comment(image) -> str | None:
    """The EXIF ``UserComment`` text of an open image (JPEG, WebP, PNG eXIf), or None."""
    try:
        raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block reads as none
        return None
    text = read_user_comment(raw) if raw else ""
    return text or None


def read_png(path: str | Path) -> str | None:
    """The ``parameters`` text of an image (PNG tEXt or iTXt), else its EXIF ``UserComment`` (the webui's
    JPEG and WebP), or None."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        text = image.info.get("parameters")
        if text is None:
            text = image_user_comment(image)
    return str(text) if text is not None else None
