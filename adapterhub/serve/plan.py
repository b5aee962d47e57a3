"""A webui API request planned as generator requests: one :class:`~adapterhub.sample.generator.Request` per
``n_iter`` iteration (``batch_size`` images each, seeds ``seed + k x batch_size`` on: the webui's
``all_seeds``), so that a request gives the images ``adapterhub sample --images N --batch B`` gives, and an
interrupt can stop between iterations.

Everything is checked here, before the request is queued (:class:`ApiError`, the webui's statuses): an
unknown sampler (404, as the webui), sizes beyond the server's limit, bad values, scripts and the mask fields not
done here (422: doing something else would give another picture). An img2img ``mask`` inpaints
(:func:`_inpaint`: the webui's fields). ControlNet units
(``alwayson_scripts.controlnet``) join the stack (:mod:`adapterhub.serve.controls`). A missing LoRA or hypernetwork
is left out with a note in ``info`` (the webui warns and goes on). Embeddings whose word is in the prompt or
the negative prompt join the stack, as the webui applies its embeddings folder.
"""
from __future__ import annotations

import base64
import binascii
import io
import random
from dataclasses import dataclass, field
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.serve.models import Img2ImgRequest, Txt2ImgRequest

HIRES_DENOISE = 0.7  # the webui's hires denoising strength when a request gives none
DEFAULT_UPSCALER = "Latent"  # the webui's default hires upscaler (``latent_upscale_default_mode``)
EMPHASIS = ("Original", "No norm", "Ignore", "None")  # the webui's emphasis modes (``sd_emphasis``)


class ApiError(AdapterhubError):
    """A request the server refuses: an HTTP status and a one-line ``detail`` (the webui's error JSON)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status_code = status
        self.detail = detail


@dataclass
class Plan:
    """What the worker runs for one API request, and what the response reports."""

    kind: str  # txt2img or img2img
    requests: list  # generator Requests, one per n_iter iteration
    prompt: str  # as sent (tags of missing networks included: the webui keeps them in the infotext)
    negative: str
    comments: list[str] = field(default_factory=list)  # notes for ``info`` (missing networks, ignored fields)
    send_images: bool = True
    return_grid: bool = True  # the webui's API: only with save_images (it sets do_not_save_grid = not save_images)
    clip_skip: int = 1
    denoising_strength: float | None = None
    control_fields: list = field(default_factory=list)  # per ControlNet unit, its preprocessor's infotext fields
    cancelled: bool = False  # its client hung up: the worker stops it at the next step (or never starts it)

    @property
    def images(self) -> int:
        return sum(r.images for r in self.requests)


def decode_bytes(text: str, what: str = "image") -> bytes:
    """The bytes of a base64 image (a ``data:image/…;base64,`` prefix allowed). Only data: the webui's fetching
    of http(s) URLs is not done here (a server must not be a proxy for its clients)."""
    text = (text or "").strip()
    if text.startswith(("http://", "https://")):
        raise ApiError(422, f"{what}: URLs are not fetched; send the image as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what}: invalid encoded image (not base64)") from None


def decode_image(text: str, what: str = "image"):
    """A PIL image from base64 (:func:`decode_bytes`): 422 with one line if it is not one."""
    from PIL import Image, UnidentifiedImageError

    raw = decode_bytes(text, what)
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ApiError(422, f"{what}: invalid encoded image ({exc.__class__.__name__})") from None


def _overrides(req, options: dict[str, Any], model_titles: set[str]) -> dict[str, Any]:
    """The options in force for this request: the server's, with the request's ``override_settings``."""
    merged = dict(options)
    for key, value in (req.override_settings or {}).items():
        merged[key] = value
    checkpoint = (req.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint is not None and str(checkpoint) not in model_titles:
        raise ApiError(404, "Model not found")  # one model per server: another is not loaded for a request
    return merged


def clip_skip(value) -> int:
    """``CLIP_stop_at_last_layers`` as a whole number, 1 or more (422 otherwise)."""
    try:
        number = int(value)
        ok = number >= 1 and number == float(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ApiError(422, f"CLIP_stop_at_last_layers {value!r}: must be a whole number, 1 or more")
    return number


def _check_size(width: int, height: int, limit: tuple[int, int] | None, what: str = "size") -> None:
    if limit is not None and (width > limit[0] or height > limit[1]):
        raise ApiError(422, f"{what} {width}x{height} is beyond this server's --max-size {limit[0]}x{limit[1]}")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ApiError(422, f"{what} {width}x{height}: width and height must be positive multiples of 8")


def _ignored(req, comments: list[str]) -> None:
    """Notes for the fields the webui would act on and adapterhub does not (the picture is made without them)."""
    if req.styles:
        comments.append(f"styles {', '.join(req.styles)}: prompt styles are not applied here")
    if req.restore_faces:
        comments.append("restore_faces: face restoration is not available here")
    if req.tiling:
        comments.append("tiling: not available here")
    if req.subseed_strength:
        comments.append("subseed_strength: variation seeds are not applied here")
    if req.refiner_checkpoint:
        comments.append("refiner_checkpoint: the refiner is not run here")
    if req.save_images:
        comments.append("save_images: images are only returned (with the grid), not saved on the server")
    if (req.override_settings or {}).get("eta_noise_seed_delta"):
        comments.append("eta_noise_seed_delta: not applied here")


def _scripts(req, networks, init_image, hires: bool):
    """The ControlNet units' stack entries (:mod:`adapterhub.serve.controls`); any other script is refused as
    the webui refuses one it has not."""
    from adapterhub.serve.controls import Units, find_model, script_args, units
    from adapterhub.serve.networks import CONTROL

    args, others = script_args(req.alwayson_scripts)
    for name in others:
        raise ApiError(422, f"always on script {name} not found")
    if not args:
        return Units()
    models = networks.of_kind(CONTROL)
    named = [u.get("model") for u in args if isinstance(u, dict) and u.get("enabled", True) is not False]
    if any(m not in (None, "", "None", "none") and find_model(m, models) is None for m in named):
        networks.refresh()  # a model added since the last scan (the extension re-scans its folder too)
        models = networks.of_kind(CONTROL)
    return units(args, models=models, size=(req.width, req.height), init_image=init_image,
                 hires=hires)


def plan(req: Txt2ImgRequest | Img2ImgRequest, *, options: dict[str, Any], model_titles: set[str], networks,
         dirs, max_size: tuple[int, int] | None = None, device=None, flow=None) -> Plan:
    """The :class:`Plan` of one API request (see the module doc), or :class:`ApiError`. ``device``: the
    generator's, which the noise source must be able to run on. ``flow``: the server's
    :class:`~adapterhub.sample.flow.FlowGenerator` on a Flux or SD3 base (None on Stable Diffusion): the requests
    are its ``FlowRequest`` s, checked by it (what the family cannot do is 422, one line)."""
    from adapterhub.sample.generator import MAX_SEED, Request, check_request
    from adapterhub.serve.networks import drop_missing_networks, missing_notes

    kind = "img2img" if isinstance(req, Img2ImgRequest) else "txt2img"
    settings = _overrides(req, options, model_titles)
    if req.script_name:
        raise ApiError(422, f"Script '{req.script_name}' not found")
    comments: list[str] = []
    _ignored(req, comments)
    _check_family(req, flow, comments)
    common = _sampling(req, settings, max_size)
    if device is not None:
        from adapterhub.sample.rng import check_device

        try:
            check_device(common["rng"], device)
        except AdapterhubError as err:
            raise ApiError(422, str(err)) from None
    hires = _hires(req, comments, max_size) if kind == "txt2img" and req.enable_hr else {}
    init_image = _init_image(req, comments) if kind == "img2img" else None
    inpaint = _inpaint(req) if kind == "img2img" else {}
    if kind == "img2img" and req.initial_noise_multiplier is not None:  # None: the webui's option, 1
        inpaint["initial_noise_multiplier"] = float(req.initial_noise_multiplier)
    controls = _scripts(req, networks, init_image, bool(hires))
    comments += controls.comments
    denoise = hires["hr_denoise"] if hires else req.denoising_strength if init_image is not None else None
    prompt, missing = drop_missing_networks(req.prompt, dirs)
    negative, missing_negative = drop_missing_networks(req.negative_prompt, dirs)
    comments += missing_notes(missing + missing_negative)
    # paths, not names: a file name with a comma or a colon is no spec
    embeddings = [(n.path, 1.0) for n in networks.embeddings_in(prompt, negative)]
    stack = [*embeddings, *controls.entries]
    seed = req.seed if req.seed is not None and req.seed >= 0 else random.randrange(MAX_SEED)
    requests = [Request(prompt, negative=negative, stack=stack, seed=seed + k * req.batch_size,
                        batch=req.batch_size, images=req.batch_size, init_image=init_image,
                        denoising_strength=denoise if init_image is not None else 0.75, **common, **hires, **inpaint)
                for k in range(req.n_iter)]
    if flow is not None:
        requests = [_flow_request(r, req, flow) for r in requests]
    try:
        check_request(requests[0], dirs) if flow is None else flow.request(requests[0])
    except AdapterhubError as err:
        raise ApiError(422, str(err)) from None
    return Plan(kind, requests, req.prompt, req.negative_prompt, comments, send_images=req.send_images,
                return_grid=bool(settings.get("return_grid", True)) and req.save_images,
                clip_skip=common["clip_skip"], denoising_strength=denoise, control_fields=controls.module_fields)


def _check_family(req, flow, comments: list[str]) -> None:
    """What a request asks of the base's family that is not done here: ControlNet units on a Flux or SD3 base (422).
    Forge's ``distilled_cfg_scale`` on a model without distilled guidance (Stable Diffusion, SD3, FLUX.1 schnell) is
    ignored and noted in ``info``, as Forge ignores it there: Forge clients send it with every request."""
    from adapterhub.serve.controls import script_args

    if req.distilled_cfg_scale is not None and (flow is None or not _has_distilled_guidance(flow)):
        comments.append(f"distilled_cfg_scale {req.distilled_cfg_scale}: not applied (the model has no distilled "
                        "guidance; cfg_scale is)")
        req.distilled_cfg_scale = None
    if flow is None:
        return
    args, _ = script_args(req.alwayson_scripts)
    if args:
        name = "Flux" if flow.family == "flux" else "SD3"
        raise ApiError(422, f"ControlNet: not available for {name} models")


def _has_distilled_guidance(flow) -> bool:
    """Whether the flow generator's model has Flux-dev's guidance embedding (None while not loaded: its family)."""
    embeds = getattr(flow, "guidance_embeds", None)
    return flow.family == "flux" if embeds is None else bool(embeds)


def _flow_request(request, req, flow):
    """A planned generator request as the flow generator's ``FlowRequest``, with Forge's distilled CFG."""
    from dataclasses import replace

    from adapterhub.sample.flow import flow_request

    return replace(flow_request(request, flow.family), distilled_cfg=req.distilled_cfg_scale)


def _sampling(req, settings: dict[str, Any], max_size: tuple[int, int] | None) -> dict[str, Any]:
    """The generator request's fields every request has: sampler (404 when unknown, as the webui), schedule,
    steps, CFG, size (422 beyond ``max_size``), clip skip, emphasis and noise source (from the options)."""
    from adapterhub.sample.rng import source
    from adapterhub.sample.samplers import resolve_sampler

    sampler = req.sampler_name or req.sampler_index
    try:
        resolve_sampler(sampler)
    except AdapterhubError:
        raise ApiError(404, "Sampler not found") from None
    try:
        resolve_sampler(sampler, req.scheduler or "Automatic")
        rng = source(str(settings.get("randn_source") or "CPU"))
    except AdapterhubError as err:
        raise ApiError(422, str(err)) from None
    for name in ("batch_size", "n_iter", "steps"):
        if getattr(req, name) < 1:
            raise ApiError(422, f"{name} {getattr(req, name)}: must be 1 or more")
    _check_size(req.width, req.height, max_size)
    emphasis = str(settings.get("emphasis") or "Original")
    if emphasis not in EMPHASIS:  # the encoder would take an unknown mode as Original without a word
        raise ApiError(422, f"emphasis {emphasis!r}: choose one of {', '.join(EMPHASIS)}")
    return {"sampler": sampler, "schedule": req.scheduler or "Automatic", "steps": req.steps, "cfg": req.cfg_scale,
            "width": req.width, "height": req.height, "emphasis": emphasis, "rng": rng,
            "clip_skip": clip_skip(settings.get("CLIP_stop_at_last_layers", 1))}


def _init_image(req: Img2ImgRequest, comments: list[str]):
    """img2img's init image (the first of ``init_images``, "Just resize")."""
    if not req.init_images:
        raise ApiError(404, "Init image not found")
    if req.resize_mode:
        comments.append(f"resize_mode {req.resize_mode}: the init image is resized to the size (Just resize)")
    if len(req.init_images) > 1:
        comments.append(f"init_images: {len(req.init_images)} given; the first is used for every image")
    return decode_image(req.init_images[0], "init_images[0]").convert("RGB")


def _inpaint(req: Img2ImgRequest) -> dict[str, Any]:
    """The generator request's inpainting fields from ``mask`` and the webui's mask fields (none without a mask).
    ``mask_blur`` sets both axes, as in the webui, else ``mask_blur_x`` and ``mask_blur_y`` each (default 4); a
    separate ``latent_mask`` is refused (another picture)."""
    if req.latent_mask:
        raise ApiError(422, "latent_mask: a separate latent mask is not available here (send only mask)")
    if not req.mask:
        return {}
    blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else \
        (4 if req.mask_blur_x is None else req.mask_blur_x, 4 if req.mask_blur_y is None else req.mask_blur_y)
    return {"mask": decode_image(req.mask, "mask"), "mask_blur": int(blur_x),
            "mask_blur_y": None if blur_y == blur_x else int(blur_y), "inpainting_fill": req.inpainting_fill,
            "inpaint_full_res": bool(req.inpaint_full_res), "inpaint_full_res_padding": req.inpaint_full_res_padding,
            "inpainting_mask_invert": bool(req.inpainting_mask_invert)}


def _hires(req: Txt2ImgRequest, comments: list[str], max_size: tuple[int, int] | None) -> dict[str, Any]:
    """The hires fix's fields: ``hr_resize_x/y`` (a target size) become the scale they give; a target of
    another aspect ratio (the webui crops to it) is refused, and so is one beyond ``max_size``."""
    from adapterhub.sample.generator import hires_size, hires_upscaler

    scale = float(req.hr_scale)
    if req.hr_resize_x or req.hr_resize_y:
        sx = req.hr_resize_x / req.width if req.hr_resize_x else None
        sy = req.hr_resize_y / req.height if req.hr_resize_y else None
        if sx is not None and sy is not None and abs(sx - sy) > 1e-6:
            raise ApiError(422, f"hr_resize {req.hr_resize_x}x{req.hr_resize_y}: only a target of the first "
                                f"pass's aspect ratio ({req.width}x{req.height}) is supported here")
        scale = sx if sx is not None else sy
    _check_size(*hires_size(req.width, req.height, scale), max_size, "hires size")
    for name in ("hr_sampler_name", "hr_scheduler", "hr_checkpoint_name"):
        if getattr(req, name):
            comments.append(f"{name}: the hires pass uses the first pass's sampler, schedule and model here")
    if (req.hr_prompt and req.hr_prompt != req.prompt) or \
            (req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt):
        comments.append("hr_prompt: the hires pass uses the first pass's prompts here")
    try:
        upscaler = hires_upscaler(req.hr_upscaler or DEFAULT_UPSCALER)
    except AdapterhubError as err:
        raise ApiError(422, str(err)) from None
    denoise = req.denoising_strength if req.denoising_strength is not None else HIRES_DENOISE
    return {"hr_scale": scale, "hr_steps": int(req.hr_second_pass_steps or 0), "hr_denoise": float(denoise),
            "hr_upscaler": upscaler}
