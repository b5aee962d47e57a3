"""What a generated image records: the infotext fields of a request, and the file hashes they name.

:func:`request_fields` assembles the webui's ``parameters`` fields for one request, in the webui's order
(:func:`adapterhub.sample.infotext.create` writes them); the adapters' own fields (hash lists, ControlNet
units) come from each entry's type (:func:`adapterhub.sample.infotext.adapter_fields`). :class:`HashCache`
keeps the file hashes those fields name, so an unchanged file is not read again for the next image; the
hash formulas are the types' and :mod:`adapterhub.sample.infotext`'s, never written here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterhub.sample import infotext
from adapterhub.sample import rng as noise_sources
from adapterhub.sample.samplers import schedule_label


class HashCache:
    """Call it with a hash to compute (a callable); a file hash (``functools.partial(fn, path, ...)``) is kept by
    the file's path, mtime and size and the hash function."""

    def __init__(self):
        self._hashes: dict = {}

    def __call__(self, value) -> str:
        if not getattr(value, "args", None) or not isinstance(value.args[0], (str, Path)):
            return value()  # not a file's hash: nothing to key a cache on
        path = Path(value.args[0])
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, value.func.__name__)
        if key not in self._hashes:
            self._hashes[key] = value()
        return self._hashes[key]


def request_fields(req, sampler, schedule: str, stack, model_name: str | None, model_hash: str | None,
                   compute=None) -> dict[str, Any]:
    """The infotext fields of the (normalized) request ``req`` run with ``sampler`` and ``schedule`` on the model
    ``model_name`` [``model_hash``] with ``stack`` applied; ``compute`` turns a hash the stack's types ask for
    into its text (a :class:`HashCache`; default: calls it). ``Seed`` is the request's first image's."""
    from adapterhub import __version__

    fields = infotext.adapter_fields(stack, req.prompt + "\n" + req.negative, compute=compute)
    emphasis = req.emphasis if req.emphasis != "Original" and any(c in req.prompt + req.negative for c in "([") \
        else None
    denoise = infotext.number(req.denoising_strength) if req.init_image is not None else None
    hires = {}
    if req.hr_scale is not None:  # the webui's txt2img writes the hires denoising as "Denoising strength"
        denoise = infotext.number(req.hr_denoise)
        hires = {"Hires upscale": infotext.number(req.hr_scale), "Hires steps": req.hr_steps or None,
                 "Hires upscaler": req.hr_upscaler}
    return {
        "Steps": req.steps, "Sampler": sampler.name, "Schedule type": schedule_label(sampler, schedule),
        "CFG scale": infotext.number(req.cfg), "Seed": req.seed, "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash, "Model": model_name, "Denoising strength": denoise,
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None, **hires,
        "RNG": req.rng if req.rng != "GPU" else None,  # the webui leaves its default out
        # as the webui: only where the sampler draws noise again
        "ENSD": req.ensd if req.ensd and noise_sources.draws_more(sampler.name) else None,
        # the webui's order: the hash lists, Emphasis, then the extensions' fields (ControlNet units)
        "Lora hashes": fields.pop("Lora hashes", None), "TI hashes": fields.pop("TI hashes", None),
        "Emphasis": emphasis, **fields, "Version": f"adapterhub {__version__}",
    }


def infotexts(req, seeds: list[int], fields: dict[str, Any]) -> list[str]:
    """One infotext per image: ``fields`` with each image's seed."""
    return [infotext.create(req.prompt, req.negative, {**fields, "Seed": s}) for s in seeds]


def request_warnings(req, sampler, is_xl: bool) -> list[str]:
    """What an image's infotext cannot say about how it was made: settings recorded but not applied, a
    sampler's own note, noise the RNG source cannot reproduce, img2img conventions that differ."""
    warnings = []
    if is_xl and req.clip_skip > 1:
        warnings.append("clip skip is recorded but, as in the webui, not applied to SDXL")
    if sampler.note:
        warnings.append(f"{sampler.name}: {sampler.note}")
    if noise_sources.later_draws_note(req.rng, sampler.name):
        warnings.append(noise_sources.later_draws_note(req.rng, sampler.name))
    if sampler.timestep_based and (req.init_image is not None or req.hr_scale is not None):
        warnings.append(f"{sampler.name}: img2img follows the k-diffusion samplers' convention here (noised to "
                        "the first step it runs); the webui's timestep samplers noise one step above it")
    return warnings
