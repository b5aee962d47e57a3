"""Sampling FLUX.1 Fill (Black Forest Labs' inpainting model) with an init image and a mask.

    gen = FlowFillGenerator("FLUX.1-Fill-dev")         # a diffusers folder (FluxFillPipeline), or tiny-flux-fill
    result = gen("a castle", init_image="photo.png", mask="mask.png", seed=42, steps=20)

A Fill model's transformer takes, beside the packed noise latents, the latents of the init image with the masked
area blanked out and the mask itself (``vae_scale**2`` values a latent pixel, packed as the latents are): FLUX.1
Fill dev's 64 + 64 + 256 inputs (:func:`adapterhub.sample.flow_control.model_input` tells it from a control model
by that width). Euler on the schedule "Automatic" runs diffusers' ``FluxFillPipeline`` loop, built on the base's own
modules (so stacks and the compiled backend reach it), distilled guidance (default 30, the pipeline's), no real CFG.
Every other sampler and schedule, prompt editing, alternation and ``AND`` run the k-diffusion loop
(:meth:`FlowFillGenerator.k_denoise`): the same input beside the noise (:func:`fill_latents`, the pipeline's own
preparation) at every transformer call, the masked area repainted by the model (nothing blended). What this module
adds is the webui's side, as for the other Flux passes (:mod:`adapterhub.sample.flow`): each image n its own noise
(seed + n, the request's RNG) and its own generator (seeded with its seed) for the masked image's VAE sample, the
adapter stack switched in through the weight engine, the mask made as the webui makes it
(:func:`adapterhub.sample.images.prepare_mask`: ``mask_blur``, inverted with ``inpainting_mask_invert``, "Just
resize" to the request's size; the pipeline then takes it as binary) and the result laid under the webui's overlay
(the original pixels outside the blurred mask), and Forge's infotext (``Denoising strength``, ``Mask blur``,
``Distilled CFG Scale``). With the same noise and generators the latents equal ``FluxFillPipeline``'s bit for bit.

``denoising_strength`` is the pipeline's ``strength`` (default 1: the masked area from pure noise; below 1 the
pipeline's last ``steps x strength`` steps from the init image's latents, the VAE posterior's mean as our img2img
takes it, noised with the image's noise to the first of them).

"Only masked" (``inpaint_full_res`` with its padding, the webui API's default) runs the model on the crop around the
mask and its padding at the request's size, then lays the result back into the original, as the webui does for any
inpainting model.

Refused in one line, before anything runs: no init image or mask; CFG above 1 (a distilled model: the pipeline has no
negative prompt); the hires fix; "masked content" latent noise or latent nothing (the model sees the masked area
blank and starts it from noise; "fill", the API's default, fills the init image's masked area in pixels, which only a
strength below 1 starts from); a noise multiplier or an inpainting mask weight (inputs of the webui's SD inpainting, not of
this pipeline).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.flow import FLOW_SCHEDULES, FlowGenerator, FlowRequest, flow_request, flow_sampler
from adapterhub.sample.flow_control import sibling_pipeline
from adapterhub.sample.request import Request

FILL_GUIDANCE = 30.0  # FluxFillPipeline's default guidance_scale (BFL's for FLUX.1 Fill dev)
FILL_STRENGTH = 1.0  # FluxFillPipeline's default strength: the masked area from pure noise


@dataclass
class FlowFillRequest(FlowRequest):
    """A :class:`FlowRequest` for a FLUX.1 Fill model: ``init_image`` and ``mask`` required,
    ``denoising_strength`` the pipeline's ``strength`` (default 1)."""

    denoising_strength: float = FILL_STRENGTH

    def denoised_steps(self) -> int:
        """The steps one image runs: the pipeline's count (its ``get_timesteps``), the last ``int(steps x
        strength)`` (:func:`~adapterhub.sample.request.sampling_steps` and the progress count it)."""
        skipped = int(max(self.steps - min(self.steps * float(self.denoising_strength), self.steps), 0))
        return self.steps - skipped


def is_fill_base(base) -> bool:
    """Whether ``base`` (a name or a path) is a FLUX.1 Fill model, told from its files without building it."""
    from adapterhub.transformer_bases import transformer_input

    return transformer_input(str(base)) == "fill"


def check_fill_request(req: Request, base=None) -> None:
    """What ``FluxFillPipeline``'s loop cannot run, in one line (see the module doc); ``base``, when given, named
    where an image is missing."""
    if req.init_image is None or req.mask is None:
        model = f"{base}: a FLUX.1 Fill model" if base is not None else "a FLUX.1 Fill model"
        raise AdapterhubError(f"{model} needs an init image and a mask (--init-image, --mask: it repaints where the "
                              "mask is white)")
    if req.cfg is not None and req.cfg > 1:
        raise AdapterhubError(f"CFG scale {req.cfg:g}: a FLUX.1 Fill model runs distilled guidance only (CFG scale 1; "
                              "FluxFillPipeline has no negative prompt)")
    if req.hr_scale is not None:
        raise AdapterhubError("hires fix: not on a FLUX.1 Fill model (it repaints the init image at one size: "
                              "sample at the size you want)")
    if int(req.inpainting_fill) not in (0, 1):
        raise AdapterhubError("--inpainting-fill (masked content) latent noise / latent nothing: a FLUX.1 Fill model "
                              "sees the masked area blank and starts it from noise; 'original' or 'fill' apply")
    if float(req.initial_noise_multiplier) != 1.0:
        raise AdapterhubError("noise multiplier: not on a FLUX.1 Fill model (FluxFillPipeline's noise as drawn)")
    if float(req.inpainting_mask_weight) != 1.0:
        raise AdapterhubError("inpainting mask weight: not on a FLUX.1 Fill model (it takes the masked image whole)")


def fill_request(request: Request, base, strength_given: bool = False) -> FlowFillRequest:
    """The run's request for the Fill base ``base`` (``adapterhub sample --base <fill> --init-image --mask``),
    checked before the model loads; ``strength_given``: ``--denoise`` was set (else the pipeline's 1). A prompt
    file's lines and a plot's cells are made from this request (the same init image and mask)."""
    flow = request if isinstance(request, FlowRequest) else flow_request(request, "flux")
    strength = flow.denoising_strength if strength_given else FILL_STRENGTH
    fill = FlowFillRequest(**{**vars(flow), "denoising_strength": strength})
    check_fill_request(fill, base)
    return fill


class FlowFillGenerator(FlowGenerator):
    """A :class:`FlowGenerator` for a FLUX.1 Fill model; every request carries ``init_image`` and ``mask``."""

    model_input = "fill"

    def __init__(self, base, **options):
        super().__init__(base, **options)  # refuses any other kind of model (refuse_control_model)
        self.fill_pipe = sibling_pipeline(self.pipe, _fill_pipeline())

    def __call__(self, prompt: str, **options):
        """``options`` as :class:`FlowFillRequest`'s fields; those left out take the Fill model's defaults."""
        given = set(options)
        req = flow_request(FlowRequest(prompt, **options), self.family, given)
        strength = options.get("denoising_strength", FILL_STRENGTH)
        return self.generate(FlowFillRequest(**{**vars(req), "denoising_strength": strength}))

    def request(self, req: Request) -> FlowFillRequest:
        """``req`` checked as :meth:`FlowGenerator.request` does, what the Fill pipeline cannot run refused, the
        distilled guidance the pipeline's 30 unless set; always a :class:`FlowFillRequest` (a plain request, as the
        server plans one, keeps its fields), whose step count the loops and the progress read."""
        check_fill_request(req, self.model_name)  # before the images are read
        checked = super().request(req)
        if not isinstance(checked, FlowFillRequest):
            checked = FlowFillRequest(**vars(checked))
        if checked.distilled_cfg is None:
            checked = replace(checked, distilled_cfg=FILL_GUIDANCE)
        return checked

    def denoise(self, req: FlowRequest, prompt: str, seeds: Sequence[int],
                on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``FluxFillPipeline``'s loop for the images of ``seeds``: each one's noise (strength below 1: ``init``,
        the init image's latents, noised with it) and generator (seeded with its seed: its masked image's VAE
        sample); the final latents (B, C, H/8, W/8). ``mask``, the latent mask the webui's blend would use, is not
        used: the pipeline takes the mask in pixels."""
        from adapterhub.sample import flow_passes, flow_prompt
        from adapterhub.sample.flow import _step_counter

        single = flow_prompt.single_prompt(prompt)
        prompt = prompt if single is None else flow_passes.pass_text(single, req)
        steps, first = flow_passes.prompt_steps(req)
        if (req.schedule != FLOW_SCHEDULES[0] or flow_sampler(req.sampler, self.family) != "Euler"
                or flow_prompt.on_own_loop(prompt, req.negative, steps, req.cfg, self.family, first)):
            return self.k_denoise(req, prompt, seeds, on_step, init, mask)  # the Fill input beside the noise
        pipe = self.fill_pipe
        image, pixel_mask = self._images(req)
        noise = self.noise(seeds, req.width, req.height, req.rng)
        batch, channels, rows, cols = noise.shape
        kwargs: dict[str, Any] = {
            "prompt": prompt, "image": image, "mask_image": pixel_mask, "height": req.height, "width": req.width,
            "strength": float(req.denoising_strength), "num_inference_steps": req.steps,
            "guidance_scale": float(req.distilled_cfg), "num_images_per_prompt": batch, "output_type": "latent",
            "latents": pipe._pack_latents(self._start(req, noise, init), batch, channels, rows, cols),
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]}
        if flow_prompt.needs_engines(prompt, req.negative, req.emphasis):  # emphasis, BREAK: Forge's engines
            kwargs.pop("prompt")
            kwargs.update(flow_prompt.pipeline_embeds(self.pipe, self.family, prompt, req.negative, req.emphasis,
                                                      batch, False), num_images_per_prompt=1)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_counter(on_step, "Euler", req.steps)
        scheduler = self._scheduler("FlowMatchEulerDiscreteScheduler")
        if self.step_hook is not None:
            self._watch(scheduler, req.width, req.height)
        own = pipe.scheduler
        pipe.scheduler = scheduler
        try:
            latents = pipe(**kwargs).images
        finally:
            pipe.scheduler = own
        return pipe._unpack_latents(latents, req.height, req.width, pipe.vae_scale_factor)

    def k_denoise(self, req: FlowRequest, prompt: str, seeds: Sequence[int],
                  on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`FlowGenerator.k_denoise` with the Fill input beside the noise at every call (:meth:`model_extra`).
        The model repaints inside its mask itself, so nothing is blended (as ``FluxFillPipeline``: ``mask`` is not
        used); strength 1 starts from pure noise, below 1 from ``init`` noised to the first of the pipeline's
        last ``steps x strength`` steps (:meth:`img2img_run`)."""
        start = init if float(req.denoising_strength) < 1.0 else None
        return super().k_denoise(req, prompt, seeds, on_step, start, None)

    def model_extra(self, req: FlowRequest, seeds: Sequence[int]) -> torch.Tensor:
        """The masked image's packed latents and the packed mask (B, tokens, 4 C + 64 on FLUX.1 Fill), as
        ``FluxFillPipeline`` makes them: :func:`fill_latents`, each image's generator seeded with its seed."""
        image, pixel_mask = self._images(req)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return fill_latents(self.fill_pipe, image, pixel_mask, req.width, req.height, generators)

    def img2img_run(self, req: FlowRequest) -> int:
        """The pipeline's count (:meth:`FlowFillRequest.denoised_steps`), as on its loop."""
        return req.denoised_steps()

    def _images(self, req: FlowRequest):
        """The init image and the mask at the request's size, the mask made as the webui makes it (binary,
        inverted if asked, blurred, "Just resize"); the pipeline takes it binary again (``do_binarize``)."""
        from adapterhub.sample.images import prepare_inpaint

        prepared = prepare_inpaint(req)
        return prepared.init, prepared.mask

    def _start(self, req: FlowRequest, noise: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        """The latents the loop starts from (B, C, H/8, W/8): the noise at strength 1; below, ``init`` noised
        with it to the first step the pipeline runs (its ``get_timesteps``: the last ``steps x strength``)."""
        strength = float(req.denoising_strength)
        if strength >= 1.0 or init is None:
            return noise
        scheduler = self._scheduler("FlowMatchEulerDiscreteScheduler")
        self._set_timesteps(scheduler, req.steps, req.width, req.height)
        skipped = req.steps - req.denoised_steps()  # the pipeline's t_start
        return scheduler.scale_noise(init, scheduler.timesteps[skipped:skipped + 1], noise)


def fill_latents(pipe, image, mask, width: int, height: int, generators) -> torch.Tensor:
    """``FluxFillPipeline``'s input beside the noise for ``len(generators)`` images, made as its ``__call__`` makes
    it: the init image and the mask preprocessed at ``width`` x ``height`` (the mask binarized), the image blanked
    where the mask is, ``prepare_mask_latents`` (:func:`_fill_pipeline`'s: row i's VAE sample drawn with
    generator i) and the packed masked latents and mask concatenated."""
    device = pipe._execution_device
    encoder = getattr(pipe, "text_encoder_2", None)
    dtype = encoder.dtype if encoder is not None else pipe.transformer.dtype  # the prompt embeddings' dtype
    init = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    pixel_mask = pipe.mask_processor.preprocess(mask, height=height, width=width)
    masked = (init * (1 - pixel_mask)).to(device=device, dtype=dtype)
    with torch.no_grad():
        packed_mask, latents = pipe.prepare_mask_latents(
            pixel_mask, masked, 1, int(pipe.vae.config.latent_channels), len(generators), *init.shape[-2:], dtype,
            device, generators)
    return torch.cat((latents, packed_mask), dim=-1)


def _fill_pipeline():
    """``FluxFillPipeline``'s class, its masked-image latents drawn per image, each with its own
    generator: given one image and a list of generators, the pipeline itself would encode the masked image once,
    with the first generator, and repeat that over the batch (an image's result would then depend on the batch it
    ran in); here the image and mask are repeated first, as the pipeline takes a list of images, so its own
    ``prepare_mask_latents`` draws row i with generator i."""
    from diffusers import FluxFillPipeline

    class PerImageFill(FluxFillPipeline):
        def prepare_mask_latents(self, mask, masked_image, batch_size, num_channels_latents, num_images_per_prompt,
                                 height, width, dtype, device, generator):
            if isinstance(generator, list) and masked_image.shape[0] < len(generator):
                # cat, not repeat: it keeps the preprocessed images' memory layout (channels last), which the
                # VAE's convolutions round by, as a list of images gives it to the pipeline
                repeats = len(generator) // masked_image.shape[0]
                masked_image, mask = torch.cat([masked_image] * repeats), torch.cat([mask] * repeats)
            return super().prepare_mask_latents(mask, masked_image, batch_size, num_channels_latents,
                                                num_images_per_prompt, height, width, dtype, device, generator)

    return PerImageFill
