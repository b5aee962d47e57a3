"""What an image says about how it was made: the webui's infotext, or another generator's metadata.

:func:`read` finds the generator from where and how the metadata is kept:

* the webui (and the tools that write its format: Forge, SD.Next, Fooocus's ``a1111`` scheme, adapterhub):
  a ``parameters`` text (PNG tEXt/iTXt) or EXIF ``UserComment`` (JPEG, WebP) that is not JSON;
* ComfyUI: ``prompt`` (the API graph) and ``workflow`` (the editor's graph) JSON chunks (``SaveImage``), or
  in WebP EXIF Make ``workflow:…`` / Model ``prompt:…`` (``SaveAnimatedWEBP``);
* InvokeAI: ``invokeai_metadata`` (3.x+), ``sd-metadata`` (2.x) or ``Dream`` (1.x);
* NovelAI: ``Software: NovelAI`` with its ``Comment`` JSON;
* Fooocus: ``parameters`` JSON whose ``version`` starts ``Fooocus`` (scheme ``fooocus``);
* SwarmUI: ``parameters`` JSON with ``sui_image_params``.

A webui infotext is parsed by :func:`adapterhub.sample.infotext.parse`. The others are read by sd-parsers
(ComfyUI, InvokeAI, NovelAI, Fooocus) or here (SwarmUI) into the same field names (``Prompt``, ``Negative
prompt``, ``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``, ``Model``), values as strings, with their
own sampler names. Metadata that is recognised but cannot be read is a one-line error naming the generator,
never a guess.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext

WEBUI = "webui"
COMFY_EXIF = {0x010F: ("workflow", "workflow:"), 0x0110: ("prompt", "prompt:")}  # ComfyUI's WebP: Make, Model
INVOKEAI_KEYS = ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream")
# where each generator keeps its metadata, for messages
WHERE = {"ComfyUI": "its prompt/workflow graph JSON", "InvokeAI": "its invokeai_metadata JSON",
         "NovelAI": "its Comment JSON", "Fooocus": "its parameters JSON", "SwarmUI": "its sui_image_params JSON"}


@dataclass
class ImageMetadata:
    """``generator``: :data:`WEBUI` or another generator's name; ``text``: the webui infotext (webui only);
    ``fields``: the parsed fields (webui: :func:`infotext.parse` without defaults)."""

    generator: str
    text: str | None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def is_webui(self) -> bool:
        return self.generator == WEBUI


def read(path: str | Path) -> ImageMetadata:
    """The metadata of the image at ``path`` (see the module doc). One-line :class:`AdapterhubError` when the
    file is not an image, holds no generation metadata, or holds metadata that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            chunks = _chunks(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise AdapterhubError(f"{path}: cannot read as an image ({exc.__class__.__name__})") from None
    try:
        generator = recognise(chunks)
    except AdapterhubError as err:
        raise AdapterhubError(f"{path}: {err}") from None
    if generator is None:
        raise AdapterhubError(f"{path}: no parameters text in this image")
    if generator == WEBUI:
        text = str(chunks["parameters"])
        return ImageMetadata(WEBUI, text, infotext.parse(text, defaults=False))
    try:
        fields = _swarmui_fields(chunks) if generator == "SwarmUI" else _sd_parsers_fields(generator, chunks)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        why = str(exc).splitlines()[0] if isinstance(exc, ValueError) and str(exc).strip() else exc.__class__.__name__
        raise AdapterhubError(f"{path}: {generator} metadata ({WHERE.get(generator, 'JSON')}) that cannot be read "
                              f"({why})") from None
    return ImageMetadata(generator, None, fields)


def _chunks(image) -> dict[str, Any]:
    """The image's text chunks and the EXIF entries generators write, under the names generators use:
    ``parameters`` from EXIF ``UserComment`` when there is no chunk (the webui's JPEG and WebP)."""
    chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, (str, bytes))}
    chunks.pop("exif", None)
    chunks.pop("icc_profile", None)
    if "parameters" not in chunks:
        comment = infotext.image_user_comment(image)
        if comment:
            chunks["parameters"] = comment
    try:
        ifd0 = image.getexif()
    except (OSError, ValueError, SyntaxError):
        ifd0 = {}
    for tag, (key, prefix) in COMFY_EXIF.items():
        value = ifd0.get(tag)
        if isinstance(value, str) and value.startswith(prefix) and key not in chunks:
            chunks[key] = value[len(prefix):]
    return chunks


def _json(value) -> Any:
    try:
        return json.loads(value) if isinstance(value, (str, bytes)) else None
    except ValueError:
        return None


def recognise(chunks: dict[str, Any]) -> str | None:
    """The generator that wrote these chunks, or None when there is no generation metadata. A webui
    ``parameters`` text wins over the rest (as in sd-parsers: ComfyUI nodes that save one keep the graph
    too); a ``parameters`` text that is JSON but no known generator's is refused here."""
    text = chunks.get("parameters")
    parameters = text if isinstance(text, str) and text.strip() else None
    if parameters is not None and not parameters.lstrip().startswith("{"):
        return WEBUI
    if "prompt" in chunks or "workflow" in chunks:
        return "ComfyUI"
    if any(k in chunks for k in INVOKEAI_KEYS):
        return "InvokeAI"
    if chunks.get("Software") == "NovelAI" or ("Comment" in chunks and "Description" in chunks):
        return "NovelAI"
    if parameters is None:
        return None
    data = _json(parameters)
    if not isinstance(data, dict):
        return WEBUI  # a prompt that happens to start with "{"
    if "sui_image_params" in data:
        return "SwarmUI"
    if str(data.get("version", "")).startswith("Fooocus") or chunks.get("fooocus_scheme") == "fooocus":
        return "Fooocus"
    raise AdapterhubError("the parameters text is JSON of a generator adapterhub does not know (keys: "
                          f"{', '.join(list(data)[:6])})")


def _text(value) -> str | None:
    """A field value as the webui's parser gives values: a string; a whole float without ``.0``."""
    if value is None or value == "":
        return None
    if isinstance(value, float):
        return infotext.number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _fields(prompt, negative, sampler, steps, cfg, seed, width=None, height=None, model=None, **extra) -> dict:
    out = {"Prompt": _text(prompt) or "", "Negative prompt": _text(negative) or "", "Steps": _text(steps),
           "Sampler": _text(sampler), "CFG scale": _text(cfg), "Seed": _text(seed),
           "Size": f"{width}x{height}" if width and height else None, "Model": _text(model), **extra}
    return {k: v for k, v in out.items() if v is not None}


def _sd_parsers_fields(generator: str, chunks: dict[str, Any]) -> dict:
    """sd-parsers' reading of the chunks (its parser for ``generator``; ValueError when it cannot, or when
    sd-parsers, an optional package, is not installed)."""
    try:
        from sd_parsers import parsers
        from sd_parsers.exceptions import ParserError
    except ImportError:
        raise ValueError("reading it needs sd-parsers: pip install sd-parsers") from None

    parser_class = {"ComfyUI": parsers.ComfyUIParser, "InvokeAI": parsers.InvokeAIParser,
                    "NovelAI": parsers.NovelAIParser, "Fooocus": parsers.FooocusParser}[generator]
    try:
        info = parser_class().parse(dict(chunks))
    except ParserError as err:
        raise ValueError(str(err)) from None
    if not info.samplers:
        raise ValueError("no sampler in the metadata")
    sampler = info.samplers[0]
    params = sampler.parameters or {}
    meta = info.metadata or {}
    prompt, negative = info.full_prompt, info.full_negative_prompt
    width, height = meta.get("width"), meta.get("height")
    if generator == "Fooocus" and isinstance(meta.get("resolution"), str):  # "(1024, 1024)"
        width, height = [part.strip(" ()") for part in meta["resolution"].split(",")][:2]
    if generator == "ComfyUI":
        width, height = _comfy_size(_json(chunks.get("prompt")) or {})
    if isinstance(prompt, list):  # Fooocus keeps its expanded prompts as lists
        prompt = ", ".join(map(str, prompt))
    if isinstance(negative, list):
        negative = ", ".join(map(str, negative))
    extra = {"Samplers": str(len(info.samplers))} if len(info.samplers) > 1 else {}
    def value(key: str):  # sd-parsers leaves some generators' steps (NovelAI's) in the metadata
        return params.get(key, meta.get(key))

    return _fields(prompt, negative, sampler.name, value("steps"), value("cfg_scale"), value("seed"),
                   width, height, sampler.model.name if sampler.model else None, **extra)


def _comfy_size(graph: dict) -> tuple[Any, Any]:
    for node in graph.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
            return inputs["width"], inputs["height"]
    return None, None


def _swarmui_fields(chunks: dict[str, Any]) -> dict:
    """SwarmUI's ``sui_image_params`` (its ``T2IParamTypes`` ids: ``prompt``, ``negativeprompt``, ``cfgscale`` …)."""
    params = json.loads(chunks["parameters"])["sui_image_params"]
    return _fields(params.get("prompt"), params.get("negativeprompt"), params.get("sampler"), params.get("steps"),
                   params.get("cfgscale"), params.get("seed"), params.get("width"), params.get("height"),
                   params.get("model"))



def summary(meta: ImageMetadata) -> str:
    """Another generator's fields as lines to print: ``Generator: NAME (from …)``, the prompt, the negative
    prompt and ``Key: value, …`` (its own sampler names: not a webui infotext)."""
    fields = dict(meta.fields)
    prompt, negative = fields.pop("Prompt", ""), fields.pop("Negative prompt", "")
    head = f"Generator: {meta.generator} (read from {WHERE.get(meta.generator, 'its metadata')})"
    body = infotext.create(prompt, negative, fields)
    return f"{head}\n{body}"
