"""``--from-png``: an image's webui infotext as the options of a re-run, the way the webui re-runs it.

:func:`from_png` reads the image's ``parameters`` text and returns the options it gives (options the user set
win) and the warnings of the re-run: a LoRA or embedding that is not here is named and left out, a model
upscaler becomes Lanczos, ``RNG`` GPU (or none: the webui's default) is reproduced with NV. Another
generator's metadata is refused by name. :func:`other_model` compares the model afterwards.
"""
from __future__ import annotations

import re
from pathlib import Path

from adapterhub.errors import AdapterhubError

# infotext key -> (option name, converter)
FROM_PNG = {"Prompt": ("prompt", str), "Negative prompt": ("negative", str), "Steps": ("steps", int),
            "Sampler": ("sampler", str), "Schedule type": ("schedule", str), "CFG scale": ("cfg", float),
            "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Hires upscale": ("hires", float),
            "Hires steps": ("hires_steps", int), "Hires upscaler": ("hires_upscaler", str), "ENSD": ("ensd", int),
            "Distilled CFG Scale": ("distilled_cfg", float)}  # Forge's, for Flux-dev
FALLBACK_UPSCALER = "Lanczos"  # for a model upscaler (ESRGAN family) named in an infotext


def from_png(path: str, options: dict, given: set[str]) -> tuple[dict, list[str]]:
    """``options`` (the ``adapterhub sample`` option names) updated with what the image's infotext gives, except
    the names in ``given``; and the re-run's warnings (``note: `` marks the ones that are only notes)."""
    from adapterhub.sample import imagemeta, infotext

    meta = imagemeta.read(path)
    if not meta.is_webui:
        raise AdapterhubError(f"{path}: made by {meta.generator} ({imagemeta.WHERE[meta.generator]}), not a webui "
                              "infotext: --from-png re-runs webui images only (png-info shows what it holds)")
    params = infotext.parse(meta.text)
    for key, (name, convert) in FROM_PNG.items():
        if name in given or key not in params:
            continue
        try:
            options[name] = convert(params[key])
        except ValueError:
            raise AdapterhubError(f"{path}: {key} {params[key]!r} is not a valid value") from None
    if "size" not in given and "Size-1" in params:
        options["size"] = f"{params['Size-1']}x{params['Size-2']}"
    # "Denoising strength": the hires pass's in a txt2img infotext, else img2img's (used with --init-image)
    strength = "hires_denoise" if "Hires upscale" in params else "denoise" if options.get("init_image") else None
    if strength and strength not in given and "Denoising strength" in params:
        try:
            options[strength] = float(params["Denoising strength"])
        except ValueError:
            raise AdapterhubError(f"{path}: Denoising strength {params['Denoising strength']!r} is not a valid "
                                  "value") from None
    warnings: list[str] = []
    options["source_model"] = (params.get("Model"), params.get("Model hash"))  # compared once the base is known
    if "rng" not in given:
        options["rng"] = _rng(path, params, "RNG" in meta.fields, warnings)
    if "hires_upscaler" not in given and "Hires upscaler" in params:
        options["hires_upscaler"] = _upscaler(path, params["Hires upscaler"], warnings)
    _networks(path, params, options, given, warnings)
    for key in ("Beta schedule alpha", "Beta schedule beta"):  # Forge's setting; we run its default
        if key in params and _float(params[key]) != 0.6:
            warnings.append(f"{key} {params[key]}: the Beta schedule runs with Forge's default 0.6, so the image "
                            "will differ")
    return options, warnings


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _networks(path: str, params: dict, options: dict, given: set[str], warnings: list[str]) -> None:
    """The networks an infotext names, as the webui finds them: prompt tags whose network is missing are left
    out, embeddings of ``TI hashes`` found in ``--adapter-dir`` (or the catalog) join the stack (the webui loads
    its embeddings folder), missing ones are named."""
    from adapterhub.sample import infotext

    dirs = [Path(d) for d in options["adapter_dirs"]]
    for key in ("prompt", "negative"):
        if key not in given:
            options[key] = _drop_missing_networks(path, options[key] or "", dirs, warnings)
    for name in infotext.parse_hashes(params.get("TI hashes", "")):
        if _find(name, dirs) is None:
            warnings.append(f"{path}: embedding {name!r} (TI hashes) is not in --adapter-dir or the catalog: its "
                            "word is read as plain text")
        elif "stacks" not in given:
            options["stacks"] = (*options["stacks"], name)


def other_model(path: str, source: tuple, text: str) -> str | None:
    """A warning when the image was made with another model than this run's (by ``Model hash``, else by name):
    the webui re-runs with whatever model is loaded, silently."""
    from adapterhub.sample import infotext

    (name, digest), fields = source, infotext.parse(text)
    mine = (fields.get("Model"), fields.get("Model hash"))
    if (digest and digest == mine[1]) or (not digest and (not name or name == mine[0])):
        return None
    made = f"{name or 'a model'}" + (f" [{digest}]" if digest else "")
    used = f"{mine[0]}" + (f" [{mine[1]}]" if mine[1] else "")
    return f"{path}: made with {made}; this run used {used}, so the image will differ"


def _rng(path: str, params: dict, written: bool, warnings: list[str]) -> str:
    """The RNG source to re-run with: CPU and NV as written; GPU, the webui's default (no ``RNG`` field),
    with NV, its emulation of NVIDIA's GPU noise on any device, and a note saying so."""
    from adapterhub.sample import rng

    try:
        source = rng.source(params.get("RNG", "GPU"))
    except AdapterhubError as err:
        raise AdapterhubError(f"{path}: {err}") from None
    if source != "GPU":
        return source
    why = "RNG GPU" if written else "no RNG field (the webui's default: GPU)"
    warnings.append(f"note: {path}: {why}: reproduced with RNG NV, the webui's emulation of NVIDIA GPU noise, "
                    "the same on any device")
    return "NV"


def _upscaler(path: str, name: str, warnings: list[str]) -> str:
    """A hires upscaler we have as it is; a model upscaler (ESRGAN, 4x-UltraSharp …) falls back to Lanczos,
    the built-in image upscaler nearest to it (both enlarge the decoded image), with a warning."""
    from adapterhub.sample.request import hires_upscaler

    try:
        return hires_upscaler(name)
    except AdapterhubError:
        warnings.append(f"{path}: hires upscaler {name!r} is a model upscaler that is not available here: using "
                        f"{FALLBACK_UPSCALER} instead")
        return FALLBACK_UPSCALER


def _find(name: str, dirs: list[Path]) -> Path | None:
    from adapterhub.stack import find_adapter

    try:
        return find_adapter(name, dirs)
    except AdapterhubError:
        return None


def _drop_missing_networks(path: str, prompt: str, dirs: list[Path], warnings: list[str]) -> str:
    """``prompt`` without the extra-network tags (``<lora:…>``, ``<hypernet:…>``, any a registered type declares)
    whose network is not in ``dirs`` or the catalog, one warning each (the webui reports and skips them too)."""
    from adapterhub.stack import TAG, tag_kind

    def keep(match) -> str:
        kind = tag_kind(match.group(1))
        if kind is None:
            return match.group(0)
        name = match.group(2).split(":")[0].strip().strip("\"'")
        if _find(name, dirs) is not None:
            return match.group(0)
        warnings.append(f"{path}: {kind.label} {name!r} ({match.group(0)}) is not in --adapter-dir or the catalog: "
                        "left out")
        return ""

    cleaned = TAG.sub(keep, prompt)
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip() if cleaned != prompt else prompt
