"""A generation request: its fields, the checks that need no model, and the step and size rules of its passes.

:class:`Request` is what a caller asks for (prompt, stack, seed, size, sampler, img2img, hires fix, RNG);
:func:`check_request` refuses bad input in one line before a base loads; :func:`normalized` fills in what
the base decides (the size, a random seed, the image count). The webui's conventions for img2img and the
hires fix (:func:`img2img_steps`, :func:`hires_size`, the upscaler names) live here so planning (the job
runner, the server) and generating agree. :class:`Result` is what the generator returns.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample import rng as noise_sources
from adapterhub.sample.samplers import resolve_sampler

MAX_SEED = 4294967294  # the webui draws random seeds below this
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the webui's hires upscalers that need no model: shared.latent_upscale_modes (interpolation mode, antialias)
# and the built-in image upscalers (PIL filters; "None" is a plain Lanczos resize)
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")


@dataclass
class Request:
    """One generation request; ``images`` images in batches of ``batch`` (default: one batch)."""

    prompt: str
    negative: str = ""
    stack: Any = None  # a Stack, a spec string ("style:0.8, char:0.5"), or [(adapter or path, weight), ...]
    seed: int = -1
    width: int | None = None
    height: int | None = None
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    cfg: float = 7.0
    batch: int = 1
    images: int | None = None
    clip_skip: int = 1
    emphasis: str = "Original"
    init_image: Any = None  # img2img: a PIL image or an image file
    denoising_strength: float = 0.75  # img2img: how far into the schedule the init image is noised, (0, 1]
    hr_scale: float | None = None  # hires fix: the first pass at width x height, then this scale (>= 1)
    hr_steps: int = 0  # steps of the hires pass (0: as many as ``steps``)
    hr_denoise: float = 0.7  # denoising strength of the hires pass, (0, 1]
    hr_upscaler: str = "Latent"  # a ``Latent …`` mode or an image upscaler: None, Lanczos, Nearest
    rng: str = "CPU"  # the noise source (:mod:`adapterhub.sample.rng`): CPU, GPU (CUDA only) or NV
    ensd: int = 0  # the webui's eta noise seed delta: later draws (ancestral, SDE) from generators seeded seed + ensd
    # inpainting (img2img with a mask; :mod:`adapterhub.sample.images`): white repaints, as in the webui
    mask: Any = None  # a PIL image or an image file; resized to the init image's size
    mask_blur: int = 4  # the Gaussian blur's sigma in pixels (0: none), along x, and along y unless mask_blur_y
    mask_blur_y: int | None = None  # the sigma along y where it differs (the webui API's mask_blur_x / mask_blur_y)
    inpainting_fill: int = 1  # the masked area's start: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # "Only masked": the masked region cropped, sampled at the size, pasted back
    inpaint_full_res_padding: int = 32  # pixels around the masked region's box (with inpaint_full_res)
    inpainting_mask_invert: bool = False  # black repaints
    initial_noise_multiplier: float = 1.0  # img2img: the init image's noise times this (the webui's option)
    # an inpainting model's img2img: how much of the masked area its masked image hides (the webui's "Inpainting
    # conditioning mask strength"; 1 all of it, 0 none: the whole image)
    inpainting_mask_weight: float = 1.0


@dataclass
class Result:
    images: list  # PIL images (empty when latents were asked for)
    infotexts: list[str]
    seeds: list[int]
    latents: torch.Tensor | None = None
    warnings: list[str] = field(default_factory=list)
    request: Request | None = None

    def pnginfo(self, i: int):
        return infotext.pnginfo(self.infotexts[i])


FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # the webui's "Masked content"
MASK_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa")  # image modes read as a mask


def _load_image(value, what: str = "init image", mode: str | None = "RGB"):
    """A PIL image (``mode``; None: as stored, loaded) from an image or a path; one line naming it if it cannot
    be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert(mode) if mode else value.copy()
    try:
        with Image.open(value) as opened:
            opened.load()
            return opened.convert(mode) if mode else opened.copy()
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as exc:
        raise AdapterhubError(f"{what} {value}: cannot read it as an image ({exc.__class__.__name__})") from None


def hires_upscaler(name: str) -> str:
    """The canonical name of a hires upscaler (case-insensitive), or one line listing them."""
    known = [*LATENT_UPSCALERS, *IMAGE_UPSCALERS]
    for k in known:
        if str(name).strip().lower() == k.lower():
            return k
    raise AdapterhubError(f"hires upscaler {name!r}: choose one of {', '.join(known)} (model upscalers such as "
                          "ESRGAN are not available here)")


def _strength_problem(name: str, value) -> str | None:
    try:
        ok = 0.0 < float(value) <= 1.0
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"{name} {value}: must be more than 0 and at most 1"


def normalized(req: Request, default_size: int) -> Request:
    """``req`` checked (one-line :class:`AdapterhubError`) and completed: the size (``default_size``, or an init
    image's own), a random seed for -1, the image count, the init image read, the upscaler and RNG names
    canonical."""
    init = _load_image(req.init_image) if req.init_image is not None else None
    if init is not None and (req.width is None or req.height is None):
        default_w, default_h = init.width // 8 * 8, init.height // 8 * 8
    else:
        default_w = default_h = default_size
    width, height = req.width or default_w, req.height or default_h
    problems = []
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        problems.append(f"size {width}x{height}: width and height must be positive multiples of 8")
    for name in ("steps", "batch"):
        if int(getattr(req, name)) < 1:
            problems.append(f"{name} {getattr(req, name)}: must be 1 or more")
    if req.images is not None and int(req.images) < 1:
        problems.append(f"images {req.images}: must be 1 or more")
    if not math.isfinite(float(req.cfg)):
        problems.append(f"cfg {req.cfg}: not a finite number")
    if int(req.clip_skip) < 1:
        problems.append(f"clip skip {req.clip_skip}: must be 1 or more")
    if int(req.ensd) < 0:
        problems.append(f"ENSD {req.ensd}: must be 0 or more")
    upscaler = req.hr_upscaler
    if init is not None:
        problems.append(_strength_problem("denoising strength", req.denoising_strength))
    multiplier = float(req.initial_noise_multiplier)
    if not (math.isfinite(multiplier) and multiplier >= 0):
        problems.append(f"noise multiplier {req.initial_noise_multiplier}: must be a number, 0 or more")
    elif multiplier != 1.0 and init is None:
        problems.append("noise multiplier: an img2img setting (give an init image)")
    weight = float(req.inpainting_mask_weight)
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        problems.append(f"inpainting mask weight {req.inpainting_mask_weight}: must be a number from 0 to 1")
    mask = _load_image(req.mask, "mask", mode=None) if req.mask is not None else None
    if mask is not None:
        problems += _mask_problems(req, init, mask)
    if req.hr_scale is not None:
        if init is not None:
            problems.append("hires fix is a txt2img pass (as in the webui): not with an init image")
        if not (isinstance(req.hr_scale, (int, float)) and math.isfinite(req.hr_scale) and req.hr_scale >= 1):
            problems.append(f"hires scale {req.hr_scale}: must be a number, 1 or more")
        if int(req.hr_steps) < 0:
            problems.append(f"hires steps {req.hr_steps}: must be 0 (as many as steps) or more")
        problems.append(_strength_problem("hires denoising strength", req.hr_denoise))
        upscaler = hires_upscaler(req.hr_upscaler)
    source = noise_sources.source(req.rng)
    problems = [p for p in problems if p]
    if problems:
        raise AdapterhubError(problems[0])
    seed = int(req.seed) if req.seed is not None and int(req.seed) >= 0 else random.randrange(MAX_SEED)
    return replace(req, width=width, height=height, seed=seed, images=int(req.images or req.batch), init_image=init,
                   hr_upscaler=upscaler, rng=source, mask=mask)


def _mask_problems(req: Request, init, mask) -> list[str | None]:
    """What is wrong with an inpainting request's mask (read) and its settings."""
    problems: list[str | None] = []
    if mask.mode not in MASK_MODES:
        where = "mask" if hasattr(req.mask, "mode") else f"mask {req.mask}"  # an image, or its file
        problems.append(f"{where}: mode {mask.mode} is not a mask (save it as greyscale, RGB or RGBA)")
    if init is None:
        problems.append("mask: give an init image too (inpainting repaints part of it)")
    if req.hr_scale is not None:
        problems.append("mask: inpainting is an img2img pass, not with the hires fix")
    if int(req.inpainting_fill) not in FILLS:
        problems.append(f"inpainting fill {req.inpainting_fill}: choose 0 (fill), 1 (original), 2 (latent noise) "
                        "or 3 (latent nothing)")
    for name in ("mask_blur", "mask_blur_y", "inpaint_full_res_padding"):
        if getattr(req, name) is not None and int(getattr(req, name)) < 0:
            problems.append(f"{name.replace('_', ' ')} {getattr(req, name)}: must be 0 or more")
    return problems


def mask_problem(req: Request, sampler) -> str | None:
    """Why ``sampler`` cannot inpaint: the k-diffusion algorithms run their own loop, so no step can blend the
    unmasked latents back (None when it can, or when there is no mask)."""
    from adapterhub.sample.samplers import KDIFFUSION

    if req.mask is not None and sampler.scheduler == KDIFFUSION:
        return f"{sampler.name}: no masks (inpainting) with this sampler here; choose another, e.g. Euler a or DPM++ 2M"
    return None


def img2img_steps(steps: int, strength: float, fixed: bool = False) -> tuple[int, int]:
    """``(schedule length, steps run)`` of an img2img pass: the webui's ``setup_img2img_steps``. Plain
    img2img runs ``int(min(d, 0.999) x steps) + 1`` steps of a ``steps``-step schedule; ``fixed`` (the hires
    pass) runs exactly ``steps`` steps of a schedule of ``int(steps / min(d, 0.999))``."""
    strength = min(float(strength), 0.999)
    if fixed:
        return int(steps / strength), steps
    return steps, int(strength * steps) + 1


def sampling_steps(req: Request) -> int:
    """The steps one image of ``req`` is denoised for (both passes of a hires fix); a request whose model counts
    its own (a FLUX.1 Fill request: ``denoised_steps``) says so."""
    own = getattr(req, "denoised_steps", None)
    if own is not None:
        return own()
    if req.init_image is not None:
        return img2img_steps(req.steps, req.denoising_strength)[1]
    if req.hr_scale is not None:
        return req.steps + (req.hr_steps or req.steps)
    return req.steps


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires target, ``int(size x scale)`` as the webui computes it, down to a multiple of 8 (the
    latent grid the webui's ``Latent`` upscalers also land on)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def check_request(req: Request, adapter_dirs: Sequence[str | Path] = ()) -> None:
    """Everything about a request that needs no model: size, counts, sampler and schedule, adapter
    names and tag weights (one-line :class:`AdapterhubError`), so a command can refuse bad input
    before it loads a base or writes anything."""
    from adapterhub.stack import Stack

    normalized(req, 512)  # the init image and the mask too: an unreadable one fails here
    problem = mask_problem(req, resolve_sampler(req.sampler, req.schedule)[0])
    if problem:
        raise AdapterhubError(problem)
    Stack.from_prompt(req.prompt, dirs=adapter_dirs)
    if isinstance(req.stack, str) and req.stack.strip():
        Stack.parse(req.stack, dirs=adapter_dirs)
