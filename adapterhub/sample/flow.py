"""Sampling the transformer families (FLUX.1, SD3 / SD3.5): flow matching on diffusers' own pipelines.

    gen = Generator("tiny-flux")          # a FlowGenerator: Generator picks it for a Flux or SD3 base
    result = gen("a castle <lora:style:0.8>", seed=42, steps=20, distilled_cfg=3.5)

The denoising loop is the base's diffusers pipeline (``FluxPipeline`` / ``StableDiffusion3Pipeline``) with its
``FlowMatchEulerDiscreteScheduler`` (the base's ``shift``, and for Flux the dynamic shift by image size, as
diffusers computes them): with the same seeds, prompts and weights the latents and images equal the pipeline's
bit for bit. What this module adds is the webui's (Forge's) side: each image n of a request gets its own noise
source seeded ``seed + n`` (:mod:`adapterhub.sample.rng`; the noise is drawn in the pipeline's unpacked latent
shape, (C, H/8, W/8), and handed to the pipeline), the adapter stack and ``<lora:…>`` tags are switched in
through the one weight engine (:class:`~adapterhub.sample.stacks.StackSwitcher`: bitwise restore between
requests), and every image gets Forge's infotext (``Distilled CFG Scale`` after ``CFG scale``).

img2img (``init_image``, ``denoising_strength`` d): the webui's step count, ``int(min(d, 0.999) x steps) + 1``
steps at the end of the ``steps``-step schedule (:func:`~adapterhub.sample.request.img2img_steps`), started from
the init image's latents (the VAE posterior's mean, resized as the webui's "Just resize") noised to the first of
them with each image's own noise (times the initial noise multiplier) as the img2img pipelines do
(``scale_noise``); equal to diffusers' ``FluxImg2ImgPipeline`` / ``StableDiffusion3Img2ImgPipeline`` given those
latents and the strength that runs as many steps. The infotext records ``Denoising strength`` where Forge does.

``step_hook`` (when set, as by ``adapterhub serve``): called after each scheduler step with the latents and the
clean estimate ``sample - sigma x v``; without it the pipeline's loop runs untouched.

Guidance: Flux-dev's distilled guidance is the model's guidance embedding (``distilled_cfg``, Forge's
``Distilled CFG Scale``, default 3.5); real CFG with the negative prompt runs only above ``cfg`` 1 (Forge's
default for Flux is 1: one transformer call per step). SD3 / SD3.5 use CFG with the negative prompt.

The prompt's emphasis, ``BREAK``, prompt editing, alternation and ``AND`` are applied as Forge applies them
(:mod:`adapterhub.sample.flow_prompt`): the weighted embeddings are handed to the pipeline; a prompt that changes by
step or has ``AND`` sub-prompts runs the k-diffusion loop below.

Samplers and schedules (:data:`FLOW_SAMPLERS`, :data:`FLOW_SCHEDULES`): Euler on the schedule "Automatic" (and
Heun on SD3) is the pipeline's own loop above. Every other sampler of the webui's that Forge offers these families
(Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2M, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE, and Euler on
another schedule) runs as Forge runs it: k-diffusion's sampler over the flow model as a denoiser
(``x0 = x - sigma v``), on the schedule's sigmas over the model's shifted sigma table (Simple, Beta, Karras,
Exponential, Polyexponential, KL Optimal; "Automatic": the pipeline's own sigmas), from ``sigma_0 x noise``
(img2img: the schedule's last steps from ``sigma noise + (1 - sigma) init``), each image's later noise its own
(:meth:`FlowGenerator.k_denoise`, :mod:`adapterhub.sample.flow_samplers`); a FLUX.1 control or Fill model's input
beside the noise goes to every transformer call there as its pipeline passes it (:meth:`FlowGenerator.model_extra`;
:mod:`adapterhub.sample.flow_control`, :mod:`adapterhub.sample.flow_fill`). ``--backend compiled`` compiles the
transformer in place (:class:`CompiledTransformer`), which both loops call. Not here yet (refused in one line,
before a model loads): DDIM, PLMS, UniPC, LCM, DPM fast / adaptive, Restart and the other schedule types,
clip skip, other backends.

The hires fix (``hr_scale``): the txt2img pass, then :func:`adapterhub.sample.flow_passes.hires_pass` (the latents
upscaled in the family's layout, an img2img pass of the webui's fixed step count through :meth:`denoise`).
Inpainting (``mask``): the Stable Diffusion path's mask, init image and paste back
(:func:`adapterhub.sample.flow_passes.prepare_inpaint`); on the pipeline's loop the inpainting pipelines' blend after
each step, on the k-diffusion loop the denoised latents blended (:mod:`adapterhub.sample.flow_passes`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from adapterhub.backends import Runner
from adapterhub.errors import AdapterhubError
from adapterhub.sample import flow_passes, flow_prompt, flow_samplers
from adapterhub.sample.request import DTYPES, Request, Result, normalized

# FluxFillPipeline: a FLUX.1 Fill model, which only adapterhub.sample.flow_fill samples (the others refuse it)
FLOW_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "FluxFillPipeline": "flux"}
# per family, the samplers the pipeline itself runs on its own schedule ("Automatic") -> diffusers' scheduler class.
# Euler is the pipelines' own; Heun (second order, the last step Euler as k-diffusion's) only where the pipeline can
# drive it: FluxPipeline hands the scheduler its dynamically shifted sigmas, which FlowMatchHeunDiscreteScheduler
# does not take. Every other (sampler, schedule) runs k-diffusion's sampler (adapterhub.sample.flow_samplers)
PIPELINE_SAMPLERS = {"flux": {"Euler": "FlowMatchEulerDiscreteScheduler"},
                     "sd3": {"Euler": "FlowMatchEulerDiscreteScheduler", "Heun": "FlowMatchHeunDiscreteScheduler"}}
KDIFFUSION = "k-diffusion"
# per family, the webui names of its samplers -> what runs them on the "Automatic" schedule
FLOW_SAMPLERS = {family: {**own, **{name: KDIFFUSION for name in flow_samplers.SAMPLERS if name not in own}}
                 for family, own in PIPELINE_SAMPLERS.items()}
FLOW_SCHEDULES = tuple(flow_samplers.SCHEDULES)  # "Automatic" first: the pipeline's shifted sigmas
DISTILLED_CFG = 3.5  # Forge's default Distilled CFG Scale (and diffusers' FluxPipeline guidance_scale)
FLOW_BACKENDS = ("eager", "compiled")
FAMILY_DEFAULTS = {"flux": {"sampler": "Euler", "cfg": 1.0}, "sd3": {"sampler": "Euler", "cfg": 7.0}}


@dataclass
class FlowRequest(Request):
    """A :class:`Request` for a Flux or SD3 base. ``cfg`` None: the family's (1 for Flux, 7 for SD3).
    ``distilled_cfg``: Flux-dev's guidance embedding (None: 3.5 on a model that has one); not for SD3 or
    Flux-schnell, which have no guidance embedding."""

    sampler: str = "Euler"
    cfg: float | None = None
    distilled_cfg: float | None = None
    first_pass_steps: int | None = None  # set on the hires pass's request: its prompt schedule counts on from them


def flow_family(base) -> str | None:
    """``"flux"`` or ``"sd3"`` when ``base`` (a name, a path or a pipeline) is of a transformer family, else None.
    Names and paths are told from their files (:func:`adapterhub.transformer_bases.transformer_base_facts`)
    without building anything."""
    if isinstance(base, (str, Path)):
        from adapterhub.transformer_bases import transformer_base_facts

        facts = transformer_base_facts(str(base))
        return facts[0] if facts else None
    return FLOW_PIPELINES.get(type(base).__name__)


def flow_request(req: Request, family: str, given: Sequence[str] | None = None) -> FlowRequest:
    """``req`` as a :class:`FlowRequest`. ``given``: the fields the user set (the command line's); the others take
    the family's defaults (Euler; CFG 1 for Flux, as Forge). ``None``: every field is taken as given."""
    values = {f.name: getattr(req, f.name) for f in fields(req)}
    if given is not None:
        values.update({k: v for k, v in FAMILY_DEFAULTS[family].items() if k not in given})
    return FlowRequest(**values)


def flow_sampler(name: str, family: str) -> str | None:
    """The canonical name of sampler ``name`` (any case) among the family's, else None."""
    return next((k for k in FLOW_SAMPLERS[family] if k.lower() == str(name).strip().lower()), None)


def check_flow_request(req: FlowRequest, family: str, guidance_embeds: bool | None = None) -> None:
    """What the family cannot do, in one line (:class:`AdapterhubError`), before a model loads.
    ``guidance_embeds``: whether the model has Flux-dev's guidance embedding (None: not known yet)."""
    name = "Flux" if family == "flux" else "SD3"
    if flow_sampler(req.sampler, family) is None:
        raise AdapterhubError(f"sampler {req.sampler!r}: {name} is a flow-matching model; choose "
                              f"{', '.join(FLOW_SAMPLERS[family])}")
    if flow_samplers.schedule_name(req.schedule) is None:
        why = flow_samplers.why_not_on_flow(req.schedule)
        raise AdapterhubError(f"schedule {req.schedule!r}: {name} samples on its shifted flow-matching sigmas"
                              f"{f' ({why})' if why else ''}; choose {', '.join(FLOW_SCHEDULES)}")
    problem = flow_passes.mask_problem(req, flow_sampler(req.sampler, family))
    if problem:
        raise AdapterhubError(problem)
    cfg = FAMILY_DEFAULTS[family]["cfg"] if req.cfg is None else req.cfg
    problem = flow_prompt.composition_problem(_untagged(req.prompt), cfg)
    if problem:
        raise AdapterhubError(problem)
    if int(req.clip_skip) != 1:
        raise AdapterhubError(f"clip skip {req.clip_skip}: not available for {name} models (their text "
                              "encoders' last layers are used as trained)")
    if req.distilled_cfg is not None:
        if family != "flux" or guidance_embeds is False:
            model = "SD3" if family != "flux" else "this Flux model (schnell: no guidance embedding)"
            raise AdapterhubError(f"distilled CFG {req.distilled_cfg}: {model} has no distilled guidance; "
                                  "use the CFG scale")
        if not float(req.distilled_cfg) >= 0 or float(req.distilled_cfg) == float("inf"):
            raise AdapterhubError(f"distilled CFG {req.distilled_cfg}: must be a finite number, 0 or more")


def _untagged(prompt: str) -> str:
    """``prompt`` without its extra-network tags (``<lora:…>``), as the sampler reads it."""
    from adapterhub.stack import TAG

    return TAG.sub("", prompt)


class CompiledTransformer(Runner):
    """``--backend compiled`` for a Flux or SD3 pipeline: the transformer's forward compiled in place
    (``torch.compile``, ``fullgraph``, static shapes; ``ADAPTERHUB_COMPILE_BACKEND`` / ``ADAPTERHUB_COMPILE_MODE``
    as for the UNet), so the pipeline's own loop calls the graph. The parameters are graph inputs: the weight
    engine's in-place writes (a stack switch, a new weight) change their values, never the graph, so switching
    compiles nothing again. Only weight deltas reach the transformer; other kinds are refused by
    :meth:`check_stack`. :meth:`close` puts the eager forward back."""

    def __init__(self, pipe):
        import os

        from torch._dynamo.utils import counters

        super().__init__(pipe)
        self._graphs_before = int(counters["stats"]["unique_graphs"])  # a process-wide count, never reset
        backend = os.environ.get("ADAPTERHUB_COMPILE_BACKEND", "inductor")
        pipe.transformer.compile(backend=backend, mode=os.environ.get("ADAPTERHUB_COMPILE_MODE") or None,
                                 fullgraph=True, dynamic=False)

    def check_stack(self, stack) -> None:
        from adapterhub.types import UNET_UNTOUCHED, UNET_WEIGHTS

        for entry in stack.entries:
            kind = entry.adapter.plugin.runtime_kind if entry.adapter is not None else None
            if kind not in (UNET_WEIGHTS, UNET_UNTOUCHED):
                raise AdapterhubError(f"{entry.label}: the compiled backend runs weight deltas on Flux / SD3 (this "
                                      f"adapter is {kind or 'code'} at run time); use --backend eager")

    def stats(self) -> dict[str, Any]:
        """``graphs``: the graphs dynamo has built since this runner was made (a switch of stack or weight adds
        none; the count is the process's, so a graph another model compiles meanwhile counts too)."""
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"]["unique_graphs"]) - self._graphs_before}

    def close(self) -> None:
        self.pipe.transformer._compiled_call_impl = None  # nn.Module.compile's slot: eager forward again


class FlowGenerator:
    """A Flux or SD3 pipeline built once; call it per request (see module doc). The same constructor and
    ``generate`` as :class:`adapterhub.sample.generator.Generator`."""

    model_input: str | None = None  # what the model takes beside the noise: "control", "fill" (flow_fill)

    def __init__(self, base="tiny-flux", backend: str = "eager", dtype: str | torch.dtype | None = None,
                 device: str | None = None, adapter_dirs: Sequence[str | Path] = (), model_name: str | None = None,
                 model_hash: str | None = None, hash_model: bool = True):
        from adapterhub.base import load_base
        from adapterhub.sample import record
        from adapterhub.sample.backend import backend as find_backend
        from adapterhub.sample.stacks import StackSwitcher

        self.family = flow_family(base)
        if self.family is None:
            raise AdapterhubError(f"{base}: not a Flux or SD3 base")
        found = find_backend(backend)  # an unknown backend fails before the model loads
        if found.name not in FLOW_BACKENDS:
            # a registered backend prepares a UNet; the transformers have their own compiled runner here
            raise AdapterhubError(f"backend {backend!r}: Flux and SD3 sample with the "
                                  f"{' or '.join(FLOW_BACKENDS)} backend")
        self.backend = found
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise AdapterhubError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if isinstance(base, (str, Path)):
            self.pipe = load_base(str(base), dtype=dtype, device=device)
            path = Path(str(base)).expanduser()
            self.base_path = path if path.exists() else None
            self.model_name = model_name or (path.stem if path.exists() else str(base))
        else:
            self.pipe, self.base_path = base, None
            self.model_name = model_name or Path(str(getattr(base.config, "_name_or_path", "") or "model")).name
        if type(self.pipe).__name__ not in FLOW_PIPELINES:  # Kontext, ControlNet ... want more than a prompt
            raise AdapterhubError(f"{base}: a {type(self.pipe).__name__}; sampling takes a "
                                  f"{' or '.join(FLOW_PIPELINES)} base")
        from adapterhub.sample.flow_control import refuse_control_model

        refuse_control_model(self.pipe, base, self.model_input)  # a control / Fill model: its own generator only
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        self.guidance_embeds = bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))
        self.stacks = StackSwitcher(self.pipe, adapter_dirs)
        self.runner = CompiledTransformer(self.pipe) if found.name == "compiled" else found.prepare(self.pipe)
        self.hashes = record.HashCache()
        self._model_hash, self._hash_model = model_hash, hash_model
        self.is_xl, self.arch = False, self.family
        # called after every scheduler step with (index, latents, denoised estimate), both (B, C, H/8, W/8), as
        # Generator.step_hook (the server's previews and an interrupted request's image so far)
        self.step_hook: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    # -- facts ------------------------------------------------------------------------------------
    @property
    def model_hash(self) -> str | None:
        if self._model_hash is None and self._hash_model and self.base_path is not None:
            from adapterhub.sample import infotext

            self._model_hash = infotext.model_hash(self.base_path)
        return self._model_hash

    @property
    def default_size(self) -> int:
        """The pipeline's own default (``default_sample_size`` latents x the VAE's scale)."""
        return int(self.pipe.default_sample_size) * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's scale times the transformer's patch (Flux packs
        2 x 2 latents into one token)."""
        patch = 2 if self.family == "flux" else int(self.pipe.transformer.config.patch_size)
        return self.pipe.vae_scale_factor * patch

    @property
    def stack(self):
        return self.stacks.stack

    @property
    def adapter_dirs(self) -> list:
        return self.stacks.adapter_dirs

    @adapter_dirs.setter
    def adapter_dirs(self, dirs: Sequence[str | Path]) -> None:
        self.stacks.adapter_dirs = list(dirs)

    def apply_stack(self, req: Request):
        """Switch to the request's stack (``stack=`` plus prompt tags); returns it and the prompt without tags."""
        stack, prompt = self.stacks.request_stack(req.stack, req.prompt, req.negative)
        self.use_stack(stack)
        return self.stacks.applied(stack), prompt

    def use_stack(self, stack) -> None:
        self.stacks.use(stack, self.runner)

    # -- sampling ---------------------------------------------------------------------------------
    def __call__(self, prompt: str, **options) -> Result:
        """``options`` as :class:`FlowRequest`'s fields; those left out take the family's defaults."""
        given = set(options)
        return self.generate(flow_request(FlowRequest(prompt, **options), self.family, given))

    def request(self, req: Request) -> FlowRequest:
        """``req`` checked (one line) and completed: size, seed, image count, a :class:`FlowRequest`'s CFG left
        unset (the family's); a plain :class:`Request` is taken as written."""
        if not isinstance(req, FlowRequest):
            req = flow_request(req, self.family)
        if req.cfg is None:
            req = replace(req, cfg=FAMILY_DEFAULTS[self.family]["cfg"])
        check_flow_request(req, self.family, self.guidance_embeds)
        req = normalized(req, self.default_size)
        step = self.size_multiple
        if req.width % step or req.height % step:
            raise AdapterhubError(f"size {req.width}x{req.height}: this {self.family} base needs width and height "
                                  f"in multiples of {step}")
        flow_passes.check_sizes(self, req)  # SD3's position embeddings: the largest size it can place
        from adapterhub.sample import rng as noise_sources

        noise_sources.check_device(req.rng, self.device)
        return replace(req, sampler=flow_sampler(req.sampler, self.family),
                       schedule=flow_samplers.schedule_name(req.schedule))

    def generate(self, req: Request, output: str = "pil",
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Run one request. ``output="latent"``: the final latents (B, C, H/8, W/8; Flux's unpacked) and no
        images; ``progress(done, total)`` after every step of every image."""
        from adapterhub.sample.generator import _progress
        from adapterhub.sample.images import resize_image
        from adapterhub.sample.request import sampling_steps

        req = self.request(req)
        stack, prompt = self.apply_stack(req)
        inpaint, mask = flow_passes.prepare_inpaint(self, req)  # (None, None) without a mask
        init = self.encode_image(inpaint.init if inpaint else resize_image(req.init_image, req.width, req.height)) \
            if req.init_image is not None else None
        seeds = [req.seed + i for i in range(req.images)]
        counter = _progress(progress, sampling_steps(req) * req.images)
        images, latents_out = [], []
        for start in range(0, len(seeds), req.batch):
            batch_seeds = seeds[start:start + req.batch]
            step_done = counter(len(batch_seeds))
            latents = self.denoise(req, prompt, batch_seeds, step_done, init, mask)
            if req.hr_scale is not None:  # the hires fix's second pass (adapterhub.sample.flow_passes)
                latents = flow_passes.hires_pass(self, req, prompt, batch_seeds, latents, step_done)
            if output == "latent":
                latents_out.append(latents)
            else:
                images += flow_passes.paste(self.decode(latents), inpaint)
        texts = flow_infotexts(req, seeds, self.parameters(req, stack))
        from adapterhub.sample.rng import later_draws_note

        warnings = list(self.stacks.notes)
        if later_draws_note(req.rng, req.sampler) is not None:
            warnings.append(later_draws_note(req.rng, req.sampler))
        return Result(images, texts, seeds, torch.cat(latents_out) if latents_out else None, warnings, req)

    def noise(self, seeds: Sequence[int], width: int, height: int, rng: str = "CPU") -> torch.Tensor:
        """Per image its initial noise (C, H/8, W/8) from source ``rng`` seeded with its seed (the webui's
        ``ImageRNG``; C the VAE's latent channels), in the transformer's device and dtype."""
        from adapterhub.sample.rng import initial_noise

        scale = self.pipe.vae_scale_factor
        channels = int(self.pipe.vae.config.latent_channels)
        noise, _ = initial_noise(rng, seeds, (channels, height // scale, width // scale), self.device)
        return noise.to(device=self.device, dtype=self.dtype)

    def encode_image(self, image) -> torch.Tensor:
        """A PIL image (at the request's size) as the img2img pipelines' latents (1, C, H/8, W/8): diffusers'
        preprocessing, the VAE posterior's mean (deterministic, as the webui's), shifted and scaled."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(image, height=image.height, width=image.width)
        with torch.no_grad():
            z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(device=self.device, dtype=self.dtype)

    def denoise(self, req: FlowRequest, prompt: str, seeds: Sequence[int],
                on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pipeline's denoising loop from each image's own noise (img2img: from ``init``, the init image's
        latents, noised with it; inpainting inside ``mask``, (1, 1, H/8, W/8), 1 repaints: the inpainting pipelines'
        blend after each step, :func:`~adapterhub.sample.flow_passes.blend_callback`); the final latents
        (B, C, H/8, W/8). A sampler or schedule the pipeline does not run: :meth:`k_denoise`."""
        from adapterhub.sample.request import img2img_steps

        # a text whose schedule has one entry over this pass is that entry's text; the others change by model call.
        # AND sub-prompts (or one weighted) are composed by model call, each on its own schedule: left as written
        single = flow_prompt.single_prompt(prompt)
        prompt = prompt if single is None else flow_passes.pass_text(single, req)
        req = replace(req, negative=flow_passes.pass_text(req.negative, req))
        steps, first = flow_passes.prompt_steps(req)  # model calls: a second-order sampler's steps count twice
        if (req.schedule != FLOW_SCHEDULES[0] or req.sampler not in PIPELINE_SAMPLERS[self.family]
                or flow_prompt.on_own_loop(prompt, req.negative, steps, req.cfg, self.family, first)):
            return self.k_denoise(req, prompt, seeds, on_step, init, mask)  # prompt editing: the conditioning by step
        embeds = None
        if flow_prompt.needs_engines(prompt, req.negative, req.emphasis):  # emphasis, BREAK: Forge's engines
            negatives = self.family == "sd3" or req.cfg > 1
            embeds = flow_prompt.pipeline_embeds(self.pipe, self.family, prompt, req.negative, req.emphasis,
                                                 len(seeds), negatives)
            if not flow_prompt.fits_pipeline(embeds):  # SD3's negative of another length: two calls a step
                return self.k_denoise(req, prompt, seeds, on_step, init, mask)
        noise = self.noise(seeds, req.width, req.height, req.rng)
        batch, channels, rows, cols = noise.shape
        start, run = 0, req.steps
        if init is not None:
            length, run = img2img_steps(req.steps, req.denoising_strength)
            start = length - run
        scheduler = self._scheduler(FLOW_SAMPLERS[self.family][req.sampler], start)
        if self.step_hook is not None:
            self._watch(scheduler, req.width, req.height)
        if init is not None:
            if float(req.initial_noise_multiplier) != 1.0:
                noise = noise * float(req.initial_noise_multiplier)
            self._set_timesteps(scheduler, req.steps, req.width, req.height)
            if mask is not None:  # the masked area's start; the blend noises the init latents with this noise
                init, unit = flow_passes.fill(init, mask, noise, req.inpainting_fill), noise
            noise = scheduler.scale_noise(init, scheduler.timesteps[:1], noise)
        kwargs: dict[str, Any] = {"prompt": prompt, "height": req.height, "width": req.width,
                                  "num_inference_steps": req.steps, "num_images_per_prompt": batch,
                                  "output_type": "latent"}
        if self.family == "flux":
            kwargs["latents"] = self.pipe._pack_latents(noise, batch, channels, rows, cols)
            kwargs["guidance_scale"] = DISTILLED_CFG if req.distilled_cfg is None else float(req.distilled_cfg)
            if req.cfg > 1:  # Forge's Flux: real CFG (two transformer calls a step) only above 1
                kwargs.update(negative_prompt=req.negative, true_cfg_scale=float(req.cfg))
        else:
            kwargs.update(latents=noise, negative_prompt=req.negative, guidance_scale=float(req.cfg))
        if embeds is not None:  # the texts' embeddings (already over the batch) in place of the texts
            kwargs = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
            kwargs.update(embeds, num_images_per_prompt=1)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_counter(on_step, req.sampler, run)
        if mask is not None:  # the blend first, as the inpainting pipelines run it before their callback
            kwargs["callback_on_step_end"] = flow_passes.blend_callback(self, init, mask, unit,
                                                                        kwargs.get("callback_on_step_end"))
        latents = self._run(kwargs, scheduler)
        if self.family == "flux":
            latents = self.pipe._unpack_latents(latents, req.height, req.width, self.pipe.vae_scale_factor)
        return latents

    def k_denoise(self, req: FlowRequest, prompt: str, seeds: Sequence[int],
                  on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """The webui's k-diffusion sampler ``req.sampler`` on schedule ``req.schedule`` (Forge's way,
        :mod:`adapterhub.sample.flow_samplers`) from each image's own noise: txt2img from ``sigma_0 x noise``;
        img2img the last ``int(min(d, 0.999) x steps) + 1`` steps of the schedule from
        ``sigma noise + (1 - sigma) init`` (the flow model's noise scaling); with a ``mask`` the denoised latents
        outside it are ``init`` (:func:`~adapterhub.sample.flow_passes.masked_denoiser`), and so are the final ones.
        A control or Fill model's input beside the noise (:meth:`model_extra`) goes to every transformer call.
        The final latents (B, C, H/8, W/8)."""
        from adapterhub.sample.rng import initial_noise

        sampler = flow_samplers.SAMPLERS[req.sampler]
        scale, channels = self.pipe.vae_scale_factor, int(self.pipe.vae.config.latent_channels)
        noise, generators = initial_noise(req.rng, seeds, (channels, req.height // scale, req.width // scale),
                                          self.device)
        noise = noise.to(self.device)
        patch = 2 if self.family == "flux" else int(self.pipe.transformer.config.patch_size)
        table = flow_samplers.flow_table(self.pipe.scheduler.config, self.family, req.width, req.height, scale, patch)
        sigmas = flow_samplers.flow_sigmas(req.schedule, req.steps, table,
                                           lambda n: self._pipeline_sigmas(n, req.width, req.height),
                                           sampler.discard_penultimate, self.family,
                                           float(self.pipe.scheduler.config.get("shift", 1.0)))
        full = sigmas
        if init is None:
            x = noise * sigmas[0]
        else:
            run = self.img2img_run(req)
            sigmas = sigmas[len(sigmas) - 1 - run:]  # the webui's sigma_sched: the schedule's last ``run`` steps
            if float(req.initial_noise_multiplier) != 1.0:
                noise = noise * float(req.initial_noise_multiplier)
            if mask is not None:
                init = flow_passes.fill(init.float(), mask.float(), noise, req.inpainting_fill)
            x = sigmas[0] * noise + (1 - sigmas[0]) * init.float()
        if sampler.noise == "brownian":  # over the whole schedule's range, as the webui's create_noise_sampler
            draw = flow_samplers.BrownianNoise(x, full, seeds)
        else:
            draw = flow_samplers.ancestral_noise(generators, noise.shape[1:], self.device)
        guidance = None
        if self.guidance_embeds:
            guidance = DISTILLED_CFG if req.distilled_cfg is None else float(req.distilled_cfg)
        steps, first = flow_passes.prompt_steps(req)  # the hires pass's schedule counts on from the first pass
        denoiser = flow_prompt.k_denoiser(self.pipe, self.family, prompt, req.negative, steps, req.emphasis,
                                          len(seeds), req.cfg, guidance, req.width, req.height, first,
                                          self.model_extra(req, seeds))

        def stepped(i: int, latents: torch.Tensor, denoised: torch.Tensor) -> None:
            if self.step_hook is not None:
                self.step_hook(i, latents, denoised)
            if on_step is not None:
                on_step(i)

        if mask is not None:  # inpainting: the k-diffusion samplers run their own loop, so the blend is the denoiser's
            denoiser = flow_passes.masked_denoiser(denoiser, init, mask)
        latents = flow_samplers.run(sampler, denoiser, x, sigmas, draw, stepped)
        if mask is not None:  # and the webui's last blend, for a sampler whose last step is not the denoised latents
            latents = init.float() * (1 - mask.float()) + mask.float() * latents
        return latents.to(self.dtype)

    def model_extra(self, req: FlowRequest, seeds: Sequence[int]) -> torch.Tensor | None:
        """What the transformer takes beside the packed noise latents for the images of ``seeds``, packed as the
        model's pipeline packs it (B, tokens, channels): None for a text-to-image model; a control or Fill model's
        generator gives its control image's or masked image's latents (:mod:`adapterhub.sample.flow_control`,
        :mod:`adapterhub.sample.flow_fill`)."""
        return None

    def img2img_run(self, req: FlowRequest) -> int:
        """The steps an img2img pass of the k-diffusion loop runs at the end of its schedule: the webui's
        ``int(min(d, 0.999) x steps) + 1`` (:func:`~adapterhub.sample.request.img2img_steps`)."""
        from adapterhub.sample.request import img2img_steps

        return img2img_steps(req.steps, req.denoising_strength)[1]

    def _pipeline_sigmas(self, steps: int, width: int, height: int) -> torch.Tensor:
        """The pipeline's own ``steps``-step sigmas for this size (its scheduler's, the final 0 included), CPU."""
        import diffusers

        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self._set_timesteps(scheduler, steps, width, height)
        return scheduler.sigmas.detach().float().cpu()

    def _scheduler(self, name: str, start: int = 0):
        """A fresh scheduler ``name`` of the base's config (a second-order one keeps state between calls) whose
        schedule, each time it is set, starts at step ``start`` as the img2img pipelines' ``get_timesteps`` does:
        the pipeline's own loop then runs the last steps of the full schedule."""
        import functools

        import diffusers

        base = getattr(diffusers, name)
        if not start:
            return base.from_config(self.pipe.scheduler.config)

        class FromStep(base):
            @functools.wraps(base.set_timesteps)  # the pipelines read its signature (custom sigmas taken or not)
            def set_timesteps(self, *args, **kwargs):
                super().set_timesteps(*args, **kwargs)
                self.timesteps = self.timesteps[start * self.order:]
                self.set_begin_index(0)

            def set_begin_index(self, begin_index: int = 0):
                # the loop's first step is the schedule's ``start`` (FluxPipeline sets 0 after the timesteps)
                super().set_begin_index(start * self.order + begin_index)

        return FromStep.from_config(self.pipe.scheduler.config)

    def _watch(self, scheduler, width: int, height: int) -> None:
        """Call :attr:`step_hook` after each of ``scheduler``'s steps with the latents it gave and the clean latents
        the step's (guided) velocity points at, ``sample - sigma x v`` (diffusers' own estimate in the flow
        schedulers' stochastic step); Flux's packed tokens unpacked."""
        step = scheduler.step
        calls = 0

        def unpacked(latents: torch.Tensor) -> torch.Tensor:
            if self.family != "flux":
                return latents
            return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

        def watched(model_output, timestep, sample, *args, **kwargs):
            nonlocal calls
            if scheduler.step_index is None:
                scheduler._init_step_index(timestep)
            sigma = scheduler.sigmas[scheduler.step_index]
            out = step(model_output, timestep, sample, *args, **kwargs)
            if self.step_hook is not None:
                denoised = sample.float() - sigma * model_output.float()
                latents = out[0] if isinstance(out, tuple) else out.prev_sample
                self.step_hook(calls, unpacked(latents), unpacked(denoised))
            calls += 1
            return out

        scheduler.step = watched

    def _set_timesteps(self, scheduler, steps: int, width: int, height: int) -> None:
        """``scheduler``'s schedule set as the pipeline's ``__call__`` sets it for this size (Flux: its sigmas and
        the shift by image size), so the init latents are noised to the sigma the loop starts at."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config, scale = scheduler.config, self.pipe.vae_scale_factor
        patch = 2 if self.family == "flux" else int(self.pipe.transformer.config.patch_size)
        kwargs: dict[str, Any] = {}
        if self.family == "flux" or config.get("use_dynamic_shifting"):
            tokens = (height // scale // patch) * (width // scale // patch)
            kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.15))
        if self.family == "flux" and not config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(scheduler, steps, self.device, **kwargs)

    def _run(self, kwargs: dict[str, Any], scheduler):
        """The pipeline called with ``kwargs`` on ``scheduler`` (the base's own is put back after)."""
        own = self.pipe.scheduler
        self.pipe.scheduler = scheduler
        try:
            return self.pipe(**kwargs).images
        finally:
            self.pipe.scheduler = own

    def decode(self, latents: torch.Tensor) -> list:
        """PIL images, as the pipeline decodes its final latents (the VAE's scale and shift undone)."""
        vae = self.pipe.vae
        with torch.no_grad():
            scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
            image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")

    # -- infotext ---------------------------------------------------------------------------------
    def parameters(self, req: FlowRequest, stack) -> dict[str, Any]:
        """The infotext fields, in Forge's order (``Distilled CFG Scale`` right after ``CFG scale``; img2img's
        ``Denoising strength`` after ``Model``, ``Noise multiplier`` before ``Version``)."""
        from adapterhub import __version__
        from adapterhub.sample import infotext
        from adapterhub.sample.images import with_img2img_fields

        fields_ = infotext.adapter_fields(stack, req.prompt + "\n" + req.negative, compute=self.hashes)
        distilled = None
        if self.guidance_embeds:
            distilled = infotext.number(DISTILLED_CFG if req.distilled_cfg is None else req.distilled_cfg)
        return with_img2img_fields({"Steps": req.steps, "Sampler": req.sampler, "Schedule type": req.schedule,
                "CFG scale": infotext.number(req.cfg), "Distilled CFG Scale": distilled, "Seed": req.seed,
                "Size": f"{req.width}x{req.height}", "Model hash": self.model_hash, "Model": self.model_name,
                "Denoising strength": infotext.number(req.denoising_strength) if req.init_image is not None else None,
                **flow_passes.hires_fields(req),
                "RNG": req.rng if req.rng != "GPU" else None,
                "Lora hashes": fields_.pop("Lora hashes", None), "TI hashes": fields_.pop("TI hashes", None),
                "Emphasis": flow_prompt.emphasis_field(req.prompt, req.negative, req.emphasis),
                **fields_, **beta_fields(req.schedule), "Version": f"adapterhub {__version__}"}, req)

    def close(self) -> None:
        """Take the applied stack off the pipeline (every tensor restored)."""
        self.stacks.remove()
        self.runner.close()


def beta_fields(schedule: str) -> dict[str, str]:
    """Forge's ``Beta schedule alpha`` / ``Beta schedule beta`` (its defaults, which we use) on the Beta schedule."""
    from adapterhub.sample import infotext

    if schedule != "Beta":
        return {}
    return {"Beta schedule alpha": infotext.number(flow_samplers.BETA_ALPHA),
            "Beta schedule beta": infotext.number(flow_samplers.BETA_BETA)}


def _step_counter(on_step: Callable[[int], None], sampler: str, steps: int):
    """The pipeline's step callback reporting each finished sampling step once: Heun's schedule has two entries per
    step (its first-order estimate, then the correction) but one for the last (an Euler step to sigma 0)."""
    def callback(_pipe, i: int, _t, _tensors) -> dict:
        if sampler != "Heun" or i % 2 == 1 or i == 2 * steps - 2:
            on_step(i)
        return {}
    return callback


def flow_infotexts(req: Request, seeds: list[int], params: dict[str, Any]) -> list[str]:
    """One infotext per image, the fields in the order given (Forge's for these families), ``None`` left out."""
    from adapterhub.sample.infotext import quote

    texts = []
    for seed in seeds:
        line = ", ".join(f"{k}: {quote(v)}" for k, v in {**params, "Seed": seed}.items() if v is not None)
        negative = f"\nNegative prompt: {req.negative}" if req.negative else ""
        texts.append(f"{req.prompt}{negative}\n{line}".strip())
    return texts

