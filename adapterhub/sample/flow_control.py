"""Sampling a FLUX.1 control model (a base a Flux control LoRA was merged into, or BFL's Canny / Depth dev) with
its control image.

    gen = FlowControlGenerator("merged_canny")        # the folder ``adapterhub merge`` wrote
    result = gen("a castle", control_image="edges.png", seed=42, steps=20)

A control model's transformer takes the control image's latents beside the noise latents (its ``x_embedder`` is
wider than the packed latents: FLUX.1's 128 inputs for 64). Each step runs as diffusers' ``FluxControlPipeline``
runs it, built on the base's own modules: the control image resized to the request's size, encoded by the VAE (a
sample of its posterior drawn with each image's own generator, seeded with the image's seed, as the pipeline
draws it from the ``generator`` it is given), shifted, scaled, packed and concatenated to the latents each step.
Everything else is :class:`~adapterhub.sample.flow.FlowGenerator`'s: each image's own noise source, the adapter
stack switched in through the weight engine, Forge's infotext. With the same noise and generators the latents
equal ``FluxControlPipeline``'s bit for bit.

Euler on the schedule "Automatic" is the pipeline's loop. Every other sampler and schedule, prompt editing,
alternation and ``AND`` run the k-diffusion loop of :meth:`FlowGenerator.k_denoise`, the control image's latents
made as the pipeline makes them (:func:`control_latents`, each image's generator) and concatenated to the packed
latents at every transformer call (:class:`~adapterhub.sample.flow_samplers.FlowDenoiser`'s ``extra``). Refused
(one line each, before anything runs): CFG above 1 (a distilled model: the pipeline has no negative prompt) and
inpainting. A plain :class:`FlowGenerator` refuses a control model (it needs an image), and this
generator a FLUX.1 Fill model (:mod:`adapterhub.sample.flow_fill`), told apart by the width of the extra input
(:func:`model_input`).
img2img (``init_image``) runs the webui's last steps of the schedule from the init image's latents noised with each
image's noise, as ``FluxControlImg2ImgPipeline`` runs them (on the k-diffusion loop: as plain Flux's img2img); the
hires fix's second pass is such an img2img at the
hires size, the control image resized to it (as the pipeline resizes it to the size it samples).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.flow import FlowGenerator, FlowRequest, flow_request
from adapterhub.sample.request import Request


@dataclass
class FlowControlRequest(FlowRequest):
    """A :class:`FlowRequest` with the control image (a PIL image or an image file): canny edges, a depth map."""

    control_image: Any = None


def model_input(pipe) -> str | None:
    """What the pipeline's Flux transformer takes beside the packed noise latents: ``"control"`` (a control image's
    latents), ``"fill"`` (FLUX.1 Fill: the masked image's latents and the packed mask) or None (a text-to-image
    model, or not a Flux pipeline), told by the width of the extra input
    (:func:`adapterhub.transformer_bases.flux_input_kind`, the rule files are read with too)."""
    from adapterhub.transformer_bases import flux_input_kind

    transformer = getattr(pipe, "transformer", None)
    embedder = getattr(transformer, "x_embedder", None)
    vae = getattr(pipe, "vae", None)
    if embedder is None or vae is None or not hasattr(pipe, "_pack_latents"):
        return None
    return flux_input_kind(embedder.in_features, 4 * int(vae.config.latent_channels),  # 2 x 2 latents a token
                           pipe.vae_scale_factor)


def refuse_control_model(pipe, base, wants: str | None = None) -> None:
    """One line for a model given to a generator of another kind: a control model needs its control image, a Fill
    model an init image and a mask (each has its own generator); ``wants`` is the kind the generator samples
    (None: text-to-image), which a model of no such input is refused for too."""
    kind = model_input(pipe)
    if kind == wants:
        return
    if kind == "control":
        raise AdapterhubError(f"{base}: a FLUX.1 control model (its transformer takes a control image's latents "
                              "beside the noise); sample it with a control image (adapterhub.sample.flow_control."
                              "FlowControlGenerator, or diffusers' FluxControlPipeline)")
    if kind == "fill":
        raise AdapterhubError(f"{base}: a FLUX.1 Fill model (inpainting: its transformer takes the masked image and "
                              "the mask beside the noise) needs an init image and a mask (adapterhub sample "
                              "--init-image --mask, or adapterhub.sample.flow_fill.FlowFillGenerator)")
    what = {"control": "control model (its transformer takes no control image)",
            "fill": "Fill model (its transformer takes no masked image and mask)"}[wants]
    raise AdapterhubError(f"{base}: not a FLUX.1 {what}")


def check_control_request(req: FlowRequest) -> None:
    """What a control model cannot run, in one line: inpainting, CFG above 1 (a distilled model: neither
    ``FluxControlPipeline`` nor BFL's reference has a negative prompt). Every sampler and schedule runs (another
    than Euler on "Automatic": the k-diffusion loop, the control latents beside the noise at every call)."""
    if req.mask is not None:
        raise AdapterhubError("inpainting on a FLUX.1 control model is not supported (img2img and the hires fix are)")
    if req.cfg is not None and req.cfg > 1:
        raise AdapterhubError(f"CFG scale {req.cfg:g}: a FLUX.1 control model runs distilled guidance only "
                              "(CFG scale 1; FluxControlPipeline has no negative prompt)")


def control_request(request: Request, base, image) -> FlowControlRequest:
    """The run's request with its control image (``adapterhub sample --control-image``), the image read now: a bad
    file or a base of another family is one line before a model loads. Whether the base is a control model, loading
    tells. A prompt file's lines and a plot's cells are made from this request: each takes the one control image."""
    from adapterhub.sample.flow import flow_family
    from adapterhub.sample.request import _load_image

    if flow_family(base) != "flux":
        raise AdapterhubError(f"--control-image is a FLUX.1 control model's input: the base {base} is not a Flux model")
    flow = request if isinstance(request, FlowRequest) else flow_request(request, "flux")
    check_control_request(flow)
    return FlowControlRequest(**{**vars(flow), "control_image": _load_image(image, "control image")})


def control_latents(pipe, image, width: int, height: int, generators) -> torch.Tensor:
    """``FluxControlPipeline``'s control input for a batch of ``len(generators)`` images, made as its ``__call__``
    makes it: ``prepare_image`` (resized to ``width`` x ``height``, repeated over the batch), a sample of the VAE's
    posterior (row i drawn with generator i), shifted, scaled and packed 2 x 2: (B, tokens, 4 C)."""
    batch = len(generators)
    pixels = pipe.prepare_image(image=image, width=width, height=height, batch_size=batch, num_images_per_prompt=1,
                                device=pipe._execution_device, dtype=pipe.vae.dtype)
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generators)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return pipe._pack_latents(latents, batch, latents.shape[1], *latents.shape[2:])


FLUX_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


def sibling_pipeline(pipe, cls):
    """A ``cls`` pipeline (``FluxControlPipeline``, ``FluxFillPipeline`` ...) on ``pipe``'s own modules, so stacks and
    compiled runs reach it; its progress bar off (ours reports)."""
    sibling = cls(**{name: getattr(pipe, name) for name in FLUX_PARTS})
    sibling.set_progress_bar_config(disable=True)
    return sibling


class FlowControlGenerator(FlowGenerator):
    """A :class:`FlowGenerator` for a FLUX.1 control model; every request carries its ``control_image``."""

    model_input = "control"

    def __init__(self, base, **options):
        super().__init__(base, **options)  # refuses any other kind of model (refuse_control_model)
        from diffusers import FluxControlPipeline

        self.control_pipe = sibling_pipeline(self.pipe, FluxControlPipeline)
        self._control = None

    def __call__(self, prompt: str, **options):
        given = set(options)
        image = options.pop("control_image", None)
        req = flow_request(FlowRequest(prompt, **options), self.family, given - {"control_image"})
        return self.generate(FlowControlRequest(**{**vars(req), "control_image": image}))

    def request(self, req: Request) -> FlowControlRequest:
        """``req`` checked as :meth:`FlowGenerator.request` does, and what a control model cannot run refused."""
        image = getattr(req, "control_image", None)
        checked = super().request(req)
        if image is None:
            raise AdapterhubError("a FLUX.1 control model needs a control image (control_image)")
        check_control_request(checked)
        from adapterhub.sample.request import _load_image

        return replace(checked, control_image=_load_image(image, "control image"))

    def denoise(self, req: FlowControlRequest, prompt: str, seeds, on_step=None, init=None, mask=None) -> torch.Tensor:
        """:meth:`FlowGenerator.denoise` with the control image and each image's generator for its encoding."""
        self._control = (req.control_image, [torch.Generator("cpu").manual_seed(int(s)) for s in seeds])
        try:
            return super().denoise(req, prompt, seeds, on_step, init, mask)
        finally:
            self._control = None

    def model_extra(self, req: FlowRequest, seeds) -> torch.Tensor:
        """The control image's packed latents for the k-diffusion loop, as ``FluxControlPipeline`` makes them for
        this batch (:func:`control_latents`, each image's generator as :meth:`denoise` seeded it)."""
        image, generators = self._control
        return control_latents(self.control_pipe, image, req.width, req.height, generators)

    def _run(self, kwargs: dict[str, Any], scheduler):
        """``FluxControlPipeline`` on the base's modules, called with ``kwargs`` and the control image."""
        image, generators = self._control
        own = self.control_pipe.scheduler
        self.control_pipe.scheduler = scheduler
        try:
            return self.control_pipe(**kwargs, control_image=image, generator=generators).images
        finally:
            self.control_pipe.scheduler = own
