"""The sd-webui-controlnet extension's API: the units of ``alwayson_scripts.controlnet.args`` on txt2img and
img2img, and its ``/controlnet/model_list`` and ``/controlnet/module_list``.

A unit (the extension's ``ControlNetUnit``, as the ``webuiapi`` client sends it) becomes a stack entry of the
conditioning network its ``model`` names (``name [hash]`` as the model list gives it, or the bare name: a
ControlNet or T2I-Adapter of the adapter folders or the catalog), with the unit's image (``image``, or the
older ``input_image``; img2img without one: the init image, as the extension does), ``weight`` and guidance
window (``guidance_start`` / ``guidance_end``). The entry is what ``adapterhub sample --control
IMAGE:MODEL:WEIGHT:START:END`` makes, so a request gives the image that command gives.

Preprocessors (``module``): ``none`` (the image is the control map) and ``canny`` (scikit-image's Canny
detector with the unit's ``threshold_a`` / ``threshold_b`` as low / high thresholds on the 0-255 scale; the
extension's defaults 100 / 200 when they are negative). Everything that would give another picture than
the unit asks for is refused (422, one line naming the unit): an unknown model or preprocessor, a mask, a
resize mode other than "Just Resize" for an image of another aspect ratio, "My prompt is more important", a
hires option other than "Both". A disabled unit, or one without a model, is left out (the extension skips
them too).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from adapterhub.serve.plan import ApiError, decode_image

SCRIPT = "controlnet"  # the extension's always-on script, as requests name it (any case)
MODULES = ("none", "canny")
CANNY_DEFAULTS = (100.0, 200.0)  # the extension's canny thresholds when a unit sends -1
JUST_RESIZE = (0, "Just Resize", "just resize")
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,})\]$")  # "name [hash]" as the model list writes it


@dataclass
class Units:
    """What a request's units give: stack entries (in unit order), notes for ``info``, and per entry the
    preprocessor's fields for its ``ControlNet N`` infotext unit (empty for ``none``)."""

    entries: list = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    module_fields: list[dict[str, str]] = field(default_factory=list)


def script_args(alwayson_scripts: dict) -> tuple[list | None, list[str]]:
    """The ControlNet units of ``alwayson_scripts`` (None when it names no ControlNet) and the other scripts'
    names (the webui finds scripts case-insensitively)."""
    units, others = None, []
    for name, value in (alwayson_scripts or {}).items():
        if str(name).lower() != SCRIPT:
            others.append(str(name))
            continue
        args = value.get("args") if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise ApiError(422, f"alwayson_scripts.{name}: expected {{\"args\": [unit, ...]}}")
        units = args
    return units, others


def model_title(network) -> str:
    """``name [hash]``: how the extension lists a model (the webui's old 8-digit model hash)."""
    from adapterhub.sample.infotext import short_hash

    return f"{network.name} [{short_hash(network.path)}]"


def find_model(name: str, models: list) -> Any:
    """The conditioning network a unit's ``model`` names (``name [hash]`` or ``name``), or None."""
    text = str(name).strip()
    match = TITLE.match(text)
    bare = match.group(1) if match else text
    for network in models:
        if network.name == bare or network.name.lower() == bare.lower():
            return network
    return None


def _number(unit: dict, key: str, default: float, where: str) -> float:
    value = unit.get(key, default)
    try:
        number = float(default if value is None else value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ApiError(422, f"{where}: {key} {value!r} is not a number")
    return number


def _image_text(unit: dict) -> tuple[str | None, str | None]:
    """The unit's image and mask as sent (``image`` may be ``{"image", "mask"}``, the extension's older form)."""
    image = unit.get("image") or unit.get("input_image")
    mask = unit.get("mask") or unit.get("mask_image")
    if isinstance(image, dict):
        image, mask = image.get("image"), mask or image.get("mask")
    if image is not None and not isinstance(image, str):
        raise ApiError(422, "image must be a base64 string")
    return image or None, mask or None


def _preprocess(module: str, image, unit: dict, where: str) -> tuple[Any, dict[str, str]]:
    """The control map ``module`` makes of ``image``, and the fields its infotext unit records."""
    if module == "none":
        return image, {}
    from adapterhub.sample.infotext import number
    from adapterhub.preprocessors import canny

    low, high = (_number(unit, key, default, where) for key, default in
                 (("threshold_a", CANNY_DEFAULTS[0]), ("threshold_b", CANNY_DEFAULTS[1])))
    low = CANNY_DEFAULTS[0] if low < 0 else low
    high = CANNY_DEFAULTS[1] if high < 0 else high
    if low > high:
        raise ApiError(422, f"{where}: canny threshold_a {number(low)} is above threshold_b {number(high)}")
    return canny(image, low, high), {"Module": module, "Threshold A": number(low), "Threshold B": number(high)}


def _check_modes(unit: dict, image, size: tuple[int, int], hires: bool, where: str) -> bool:
    """Refuse the modes that would give another picture; returns whether the unit runs in guess mode."""
    mode = unit.get("resize_mode", 0)
    if mode not in JUST_RESIZE and image.width * size[1] != image.height * size[0]:
        raise ApiError(422, f"{where}: resize_mode {mode!r} for a {image.width}x{image.height} image at "
                            f"{size[0]}x{size[1]}: only \"Just Resize\" is done here (or send an image of the "
                            "request's aspect ratio)")
    control = unit.get("control_mode", 0)
    label = CONTROL_MODES.get(control, control) if isinstance(control, int) else str(control)
    if label not in CONTROL_MODES.values():
        raise ApiError(422, f"{where}: control_mode {control!r}: choose one of {', '.join(CONTROL_MODES.values())}")
    if label == CONTROL_MODES[1]:
        raise ApiError(422, f"{where}: control_mode \"{label}\" is not available here (Balanced, or ControlNet is "
                            "more important)")
    option = unit.get("hr_option", "Both")
    if hires and option not in (None, "Both"):
        raise ApiError(422, f"{where}: hr_option {option!r}: the unit runs on both passes here (Both)")
    return label == CONTROL_MODES[2]


def units(args: list, *, models: list, size: tuple[int, int], init_image=None, hires: bool = False) -> Units:
    """The stack entries of a request's ControlNet units (see the module doc); :class:`ApiError` otherwise.
    ``models``: the conditioning networks offered; ``size``: the request's width and height."""
    from adapterhub.stack import Entry

    out = Units()
    for i, unit in enumerate(args):
        where = f"ControlNet unit {i}"
        if not isinstance(unit, dict):
            raise ApiError(422, f"{where}: expected an object of unit fields (module, model, image, weight ...)")
        if unit.get("enabled", True) is False:
            continue
        model = unit.get("model")
        if model in (None, "", "None", "none"):
            out.comments.append(f"{where}: no model, left out")
            continue
        network = find_model(model, models)
        if network is None:
            raise ApiError(422, f"{where}: model {model!r} not found (GET /controlnet/model_list lists this "
                                "server's)")
        module = str(unit.get("module") or "none").lower()
        if module not in MODULES:
            raise ApiError(422, f"{where}: module {unit.get('module')!r}: this server runs {', '.join(MODULES)}")
        try:
            text, mask = _image_text(unit)
        except ApiError as err:
            raise ApiError(422, f"{where}: {err.detail}") from None
        if mask:
            raise ApiError(422, f"{where}: masks are not applied here (send the unit without one)")
        if text is not None:
            image = decode_image(text, f"{where}: image").convert("RGB")
        elif init_image is not None:
            image = init_image
        else:
            raise ApiError(422, f"{where}: no image (give the unit an image)")
        weight = _number(unit, "weight", 1.0, where)
        start, end = (_number(unit, key, default, where) for key, default in
                      (("guidance_start", 0.0), ("guidance_end", 1.0)))
        if not 0.0 <= start < end <= 1.0:
            raise ApiError(422, f"{where}: guidance_start {start:g} and guidance_end {end:g} must satisfy "
                                "0 <= start < end <= 1")
        guess = _check_modes(unit, image, size, hires, where)
        image, fields = _preprocess(module, image, unit, where)
        options = {"image": image, "start": start, "end": end, **({"guess_mode": True} if guess else {})}
        out.entries.append(Entry(str(network.path), te=weight, options=options, path=network.path))
        out.module_fields.append(fields)
    return out


def with_modules(units_text: dict[str, str], module_fields: list[dict[str, str]]) -> dict[str, str]:
    """The ``ControlNet N`` infotext units with each one's preprocessor: ``Module`` and its thresholds, in the
    extension's order (after ``Resize Mode``), where the unit ran one."""
    from adapterhub.sample.infotext import parse_control_unit

    out = {}
    for (key, text), fields in zip(units_text.items(), module_fields):
        if not fields:
            out[key] = text
            continue
        pairs = [item.strip().split(": ", 1) for item in text.split(",")]
        named = {k: v for k, v in pairs}
        named["Module"] = fields["Module"]
        ordered: dict[str, str] = {}
        for k, v in named.items():
            ordered[k] = v
            if k == "Resize Mode":
                ordered.update({f: fields[f] for f in fields if f != "Module"})
        out[key] = ", ".join(f"{k}: {v}" for k, v in ordered.items())
        parse_control_unit(out[key])  # still a unit the extension reads
    return {**units_text, **out}
