"""The FastAPI application: the webui's ``/sdapi/v1`` routes over one :class:`Service` (a generator, its
worker and queue, the networks, the options).

Errors have the webui's JSON shape, ``{"error", "detail", "body", "errors"}`` with the HTTP status (401
wrong credentials, 404 unknown sampler or model, 422 bad values, 429 full queue, 500 anything else: its
traceback goes to the server's log, never to the client); a body that is not valid JSON or has fields of
the wrong type gets FastAPI's 422 ``{"detail": [...]}``, as from the webui. The server keeps serving after
any of them.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub.errors import AdapterhubError
from adapterhub.serve.jobs import Outcome, QueueFull, Worker, png_base64
from adapterhub.serve.models import Img2ImgRequest, PNGInfoRequest, Txt2ImgRequest
from adapterhub.serve.networks import Networks
from adapterhub.serve.plan import ApiError, Plan, clip_skip, decode_bytes, plan

log = logging.getLogger("adapterhub.serve")
# infotext keys the webui's ``info`` reports in fields of their own, not in ``extra_generation_params``
DISCONNECT_CHECK = 0.25  # seconds between checks that a waiting request's client is still connected
STANDARD_KEYS = {"Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Size-1", "Size-2",
                 "Model hash", "Model", "Denoising strength", "Clip skip", "Version"}


def parse_auth(text: str | None) -> dict[str, str]:
    """``USER:PASS[,USER:PASS...]`` (the webui's ``--api-auth``) as {user: password}; one line if malformed."""
    if not text:
        return {}
    users = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise AdapterhubError(f"--api-auth {pair.strip()!r}: write it as USER:PASS (several: USER:PASS,USER:PASS)")
        users[user] = password
    return users


@dataclass
class Service:
    """What the routes serve: a generator (loaded), its worker, the networks, the webui options."""

    generator: Any
    adapter_dirs: list[Path] = field(default_factory=list)
    catalog: str | bool | None = None
    max_queue: int = 16
    max_size: tuple[int, int] | None = (2048, 2048)
    credentials: dict[str, str] = field(default_factory=dict)
    max_body: int = 64 << 20  # bytes a request body may have (base64 init images included)

    def __post_init__(self):
        self.adapter_dirs = [Path(d) for d in self.adapter_dirs]
        self.generator.adapter_dirs = list(self.adapter_dirs)
        self.networks = Networks(self.adapter_dirs, self.catalog)
        self.worker = Worker(self.generator, self.max_queue)
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": self.model_title, "sd_checkpoint_hash": self.generator.model_hash,
            "CLIP_stop_at_last_layers": 1, "randn_source": "CPU", "emphasis": "Original", "return_grid": True,
            "samples_format": "png", "eta_noise_seed_delta": 0, "enable_pnginfo": True,
            "show_progress_every_n_steps": 1, "live_previews_enable": True,
        }

    @property
    def model_title(self) -> str:
        h = self.generator.model_hash
        return f"{self.generator.model_name} [{h}]" if h else self.generator.model_name

    @property
    def model_titles(self) -> set[str]:
        names = {self.model_title, self.generator.model_name}
        if self.generator.model_hash:
            names.add(self.generator.model_hash)
        return names

    @property
    def flow(self):
        """The generator when it is a Flux / SD3 one (its requests are planned for the family), else None."""
        from adapterhub.sample.flow import FlowGenerator

        return self.generator if isinstance(self.generator, FlowGenerator) else None

    def close(self) -> None:
        self.worker.close()


class BodyLimit:
    """ASGI middleware: a request body beyond ``limit`` bytes gets 413 (the webui's error shape), refused from its
    ``Content-Length`` before a byte is read, or as soon as a streamed body passes the limit; nothing larger is
    ever held in memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    def _detail(self) -> str:
        return f"request body beyond this server's limit of {self.limit} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = _error(413, "HTTPException", self._detail(), f"413: {self._detail()}")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI passes an HTTPException from reading the body on as it is
                    raise StarletteHTTPException(413, self._detail())
            return message

        await self.app(scope, limited, send)


def _error(status: int, error: str, detail: Any, errors: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": error, "detail": detail, "body": "", "errors": errors})


def create_app(service: Service) -> FastAPI:
    """The application serving ``service`` (the caller owns the service: ``service.close()`` when done)."""
    basic = HTTPBasic(auto_error=False)

    def authorised(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not service.credentials:
            return
        if credentials is not None:
            expected = service.credentials.get(credentials.username)
            # compare_digest on both branches: an unknown user takes as long as a wrong password
            ok = secrets.compare_digest(credentials.password.encode(), (expected or "\0").encode())
            if ok and expected is not None:
                return
        raise ApiError(401, "Incorrect username or password")

    # the schema pages are routes of their own that no dependency guards: with credentials they are left out
    public = not service.credentials
    app = FastAPI(title="adapterhub", description="AUTOMATIC1111-compatible web API",
                  dependencies=[Depends(authorised)], docs_url="/docs" if public else None, redoc_url=None,
                  openapi_url="/openapi.json" if public else None)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.max_body)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Basic"} if exc.status_code == 401 else None
        return _error(exc.status_code, "HTTPException", exc.detail, f"{exc.status_code}: {exc.detail}", headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "HTTPException", exc.detail, f"{exc.status_code}: {exc.detail}",
                      getattr(exc, "headers", None))

    @app.exception_handler(AdapterhubError)
    async def known_error(request: Request, exc: AdapterhubError):
        return _error(422, type(exc).__name__, str(exc), str(exc))

    @app.exception_handler(Exception)
    async def unknown_error(request: Request, exc: Exception):
        log.exception("API error: %s %s", request.method, request.url.path)
        return _error(500, type(exc).__name__, "", str(exc))

    # -- generation -------------------------------------------------------------------------------
    async def generate(req: Txt2ImgRequest | Img2ImgRequest, request: Request) -> dict[str, Any]:
        planned = await run_in_threadpool(plan, req, options=service.options, model_titles=service.model_titles,
                                          networks=service.networks, dirs=service.adapter_dirs,
                                          max_size=service.max_size, device=service.generator.device,
                                          flow=service.flow)
        try:
            future = service.worker.submit(planned)
        except QueueFull as exc:
            raise ApiError(429, f"queue full: {exc} (--max-queue)") from None
        outcome = await _outcome(future, planned, request)
        if outcome is None:  # nobody is listening any more
            return JSONResponse(status_code=499, content={"error": "ClientClosedRequest", "detail": "",
                                                          "body": "", "errors": "client hung up"})
        return await run_in_threadpool(_response, service, req, planned, outcome)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate(req, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate(req, request)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return service.worker.state.progress(not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        service.worker.state.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        service.worker.state.skip()
        return {}

    # -- images -----------------------------------------------------------------------------------
    @app.post("/sdapi/v1/png-info")
    def png_info(req: PNGInfoRequest):
        return _png_info(decode_bytes(req.image, "image"))

    # -- lists ------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers")
    def samplers():
        from adapterhub.sample.flow import FLOW_SAMPLERS
        from adapterhub.sample.samplers import SAMPLERS

        offered = SAMPLERS.values()
        if service.flow is not None:  # a Flux / SD3 base: the family's flow-matching samplers only
            offered = [s for s in offered if s.name in FLOW_SAMPLERS[service.flow.family]]
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in offered]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        from adapterhub.sample.flow import FLOW_SCHEDULES
        from adapterhub.sample.samplers import SCHEDULES

        return [{"name": key, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
                for key, (label, flags) in SCHEDULES.items() if flags is not None
                and (service.flow is None or label in FLOW_SCHEDULES)]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        from adapterhub.sample.generator import IMAGE_UPSCALERS

        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for n in IMAGE_UPSCALERS]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        from adapterhub.sample.generator import LATENT_UPSCALERS

        return [{"name": n} for n in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        gen = service.generator
        return [{"title": service.model_title, "model_name": gen.model_name, "hash": gen.model_hash, "sha256": None,
                 "filename": str(gen.base_path or gen.model_name), "config": None}]

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": n.name, "alias": n.alias, "path": str(n.path), "metadata": n.metadata}
                for n in service.networks.of_kind("lora")]

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks():
        return [{"name": n.name, "path": str(n.path)} for n in service.networks.of_kind("hypernetwork")]

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return _embeddings(service)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        service.networks.refresh()

    @app.post("/sdapi/v1/refresh-embeddings")
    def refresh_embeddings():
        service.networks.refresh()

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return {}  # one model per server

    @app.get("/sdapi/v1/scripts")
    def scripts():
        from adapterhub.serve.controls import SCRIPT

        return {"txt2img": [SCRIPT], "img2img": [SCRIPT]}  # always-on scripts are listed by the webui too

    # -- the ControlNet extension's routes --------------------------------------------------------
    @app.get("/controlnet/model_list")
    def controlnet_models(update: bool = True):
        from adapterhub.serve.controls import model_title
        from adapterhub.serve.networks import CONTROL

        if update:  # the extension re-scans its folder unless told not to
            service.networks.refresh()
        return {"model_list": [model_title(n) for n in service.networks.of_kind(CONTROL)]}

    @app.get("/controlnet/module_list")
    def controlnet_modules(alias_names: bool = False):
        from adapterhub.serve.controls import MODULES

        detail = {"none": {"model_free": False, "sliders": []},
                  "canny": {"model_free": False, "sliders": [
                      {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                      {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]}}
        return {"module_list": list(MODULES), "module_detail": {m: detail[m] for m in MODULES}}

    # -- options ----------------------------------------------------------------------------------
    @app.get("/sdapi/v1/options")
    def get_options():
        return dict(service.options)

    @app.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any]):
        checkpoint = values.get("sd_model_checkpoint")
        if checkpoint is not None and str(checkpoint) not in service.model_titles:
            raise ApiError(404, f"model {checkpoint!r} not found (this server runs {service.model_title})")
        if "CLIP_stop_at_last_layers" in values:
            values = {**values, "CLIP_stop_at_last_layers": clip_skip(values["CLIP_stop_at_last_layers"])}
        if "randn_source" in values:
            from adapterhub.sample.rng import source

            values = {**values, "randn_source": source(str(values["randn_source"]))}
        values = {**values, "sd_model_checkpoint": service.model_title} if checkpoint is not None else values
        service.options.update(values)

    return app


async def _outcome(future, planned: Plan, request: Request, every: float = DISCONNECT_CHECK) -> Outcome | None:
    """The plan's outcome, or None when the client hangs up first: then the plan is cancelled (a queued one never
    runs, a running one stops at its next step, as ``/interrupt`` stops it), so nobody's request waits for it."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=every)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            planned.cancelled = True
            future.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is nobody's now
            log.info("client hung up: %s request cancelled", planned.kind)
            return None


def _response(service: Service, req, planned: Plan, outcome: Outcome) -> dict[str, Any]:
    """The webui's response: base64 PNGs (a grid first when there are several images and the plan returns one:
    ``save_images`` and ``return_grid``), the request with its defaults, and ``info``, the JSON string of the
    webui's ``Processed.js()``."""
    images, texts = list(outcome.images), list(outcome.infotexts)
    first = 0
    if planned.return_grid and len(images) > 1:
        from adapterhub.sample.grid import make_grid

        images, texts, first = [make_grid(images), *images], [texts[0], *texts], 1
    encoded = [png_base64(image, text) for image, text in zip(images, texts)] if planned.send_images else []
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None
    return {"images": encoded, "parameters": parameters, "info": json.dumps(_info(service, req, planned, outcome,
                                                                                    texts, first))}


def _info(service: Service, req, planned: Plan, outcome: Outcome, texts: list[str], first: int) -> dict[str, Any]:
    from adapterhub.sample import infotext
    from adapterhub.sample.samplers import resolve_sampler

    gen, one = service.generator, planned.requests[0]
    n = len(outcome.seeds)
    fields = infotext.parse(outcome.infotexts[0], defaults=False) if outcome.infotexts else {}
    seed = outcome.seeds[0] if outcome.seeds else one.seed
    from adapterhub import __version__

    return {
        "prompt": planned.prompt, "all_prompts": [planned.prompt] * n,
        "negative_prompt": planned.negative, "all_negative_prompts": [planned.negative] * n,
        "seed": seed, "all_seeds": list(outcome.seeds), "subseed": req.subseed, "all_subseeds": [req.subseed] * n,
        "subseed_strength": req.subseed_strength, "width": one.width, "height": one.height,
        "sampler_name": resolve_sampler(one.sampler)[0].name, "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": gen.model_name, "sd_model_hash": gen.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": planned.denoising_strength,
        "extra_generation_params": {k: v for k, v in fields.items() if k not in STANDARD_KEYS},
        "index_of_first_image": first, "infotexts": texts, "styles": list(req.styles or []),
        "job_timestamp": outcome.job_timestamp, "clip_skip": planned.clip_skip,
        "is_using_inpainting_conditioning": False, "version": f"adapterhub {__version__}",
        "comments": "\n".join(outcome.comments), "interrupted": outcome.interrupted,
    }


def _embeddings(service: Service) -> dict[str, dict]:
    """The webui's ``{"loaded": {name: {...}}, "skipped": {...}}``: skipped when no text encoder of the base
    has the embedding's width (an SDXL embedding on SD1, say)."""
    pipe = service.generator.pipe
    widths = {int(enc.config.hidden_size) for enc in (getattr(pipe, "text_encoder", None),
                                                      getattr(pipe, "text_encoder_2", None)) if enc is not None}
    loaded, skipped = {}, {}
    for n in service.networks.of_kind("embedding"):
        row = {"step": n.metadata.get("step"), "sd_checkpoint": None, "sd_checkpoint_name": None,
               "shape": int(n.width or 0), "vectors": int(n.vectors or 0)}
        (loaded if n.width in widths else skipped)[n.token or n.name] = row
    return {"loaded": loaded, "skipped": skipped}


def _png_info(raw: bytes) -> dict[str, Any]:
    """``/png-info``: the webui infotext (``info``), its parsed fields (``parameters``: the webui's parser) and
    the image's other text chunks (``items``); another generator's metadata is named in ``parameters``."""
    from PIL import Image, UnidentifiedImageError

    from adapterhub.sample import imagemeta, infotext

    try:
        with Image.open(io.BytesIO(raw)) as image:
            items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)
                     and k != "parameters"}
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ApiError(422, f"image: invalid encoded image ({exc.__class__.__name__})") from None
    try:
        meta = imagemeta.read(io.BytesIO(raw))
    except AdapterhubError:  # no generation metadata: the webui answers with an empty info
        return {"info": "", "items": items, "parameters": {}}
    if not meta.is_webui:
        return {"info": "", "items": items, "parameters": {"Generator": meta.generator, **meta.fields}}
    return {"info": meta.text, "items": items, "parameters": infotext.parse(meta.text)}
