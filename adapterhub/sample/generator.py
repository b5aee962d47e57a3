"""The generator: a base loaded once, then one call per request.

    gen = Generator("tiny-sd1", backend="eager")
    result = gen("a castle <lora:style:0.8>, (masterpiece:1.2)", negative="blurry", seed=42,
                 steps=20, sampler="DPM++ 2M", cfg=7, batch=2)
    result.images[0].save("castle.png", pnginfo=result.pnginfo(0))

Per request (:class:`Request`, checked by :func:`check_request` before a model is needed): the adapter stack
(``stack=`` plus the prompt's ``<lora:…>`` tags and the embeddings it names) is switched in
(:mod:`~adapterhub.sample.stacks`: only the parameters whose contributions change are rewritten), the prompts
are encoded the webui's way (:mod:`~adapterhub.sample.conditioning`: emphasis, ``AND``, prompt editing and
alternation), each batch is denoised (:mod:`~adapterhub.sample.denoise`: diffusers' loop step for step, one
noise source per image seeded ``seed + n``) and decoded (:mod:`~adapterhub.sample.images`), and every image
gets its infotext (:mod:`~adapterhub.sample.record`).

The webui's passes: img2img (``init_image``; ``int(min(d, 0.999) x steps) + 1`` steps of a ``steps``-step
schedule, :func:`img2img_steps`; with a ``mask``, inpainting: :func:`adapterhub.sample.images.prepare_mask`) and
the hires fix (``hr_scale``: the first pass, the latents upscaled, then an
img2img pass of exactly ``hr_steps`` steps with fresh noise from the same seeds and the prompt's hires
schedule).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import denoise as loop
from adapterhub.sample import images as pixels
from adapterhub.sample import infotext, record
from adapterhub.sample import rng as noise_sources
from adapterhub.sample.conditioning import Conditioning, PromptEncoder, encode_pair, pass_prompts
from adapterhub.sample.conditioning import Prompts, Scheduled  # noqa: F401 - importable from here
from adapterhub.sample.conditioning import stack_conds as _stack_conds  # noqa: F401 - importable from here
from adapterhub.sample.images import resize_image  # noqa: F401 - importable from here
from adapterhub.sample.request import (  # noqa: F401 - the request's names, importable from here
    DTYPES,
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    MAX_SEED,
    Request,
    Result,
    check_request,
    hires_size,
    hires_upscaler,
    img2img_steps,
    normalized,
    sampling_steps,
)
from adapterhub.sample.samplers import make_scheduler, resolve_sampler
from adapterhub.sample.stacks import (  # noqa: F401 - importable from here
    EMBEDDING_SUFFIXES,
    StackSwitcher,
    embedding_candidates,
    embedding_names_in,
)


def _flow_generator(base) -> type:
    """The generator class a Flux / SD3 base needs: FLUX.1 Fill and control models take their images beside the
    prompt (told from the files, or the pipeline, without building anything more)."""
    from adapterhub.sample.flow import FlowGenerator
    from adapterhub.sample.flow_control import FlowControlGenerator, model_input
    from adapterhub.sample.flow_fill import FlowFillGenerator
    from adapterhub.transformer_bases import transformer_input

    kind = transformer_input(str(base)) if isinstance(base, (str, Path)) else model_input(base)
    return {"fill": FlowFillGenerator, "control": FlowControlGenerator}.get(kind, FlowGenerator)


class Generator:
    """A base pipeline and a sampling backend, built once; call it per request (see module doc). A Flux or SD3
    base gives a :class:`adapterhub.sample.flow.FlowGenerator` (the same calls, flow-matching sampling); a FLUX.1
    Fill or control model its :class:`~adapterhub.sample.flow_fill.FlowFillGenerator` /
    :class:`~adapterhub.sample.flow_control.FlowControlGenerator`."""

    def __new__(cls, base="tiny-sd1", *args, **kwargs):
        if cls is Generator:
            from adapterhub.sample.flow import FlowGenerator, flow_family

            if flow_family(base) is not None:
                return _flow_generator(base)(base, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, base="tiny-sd1", backend: str = "eager", dtype: str | torch.dtype | None = None,
                 device: str | None = None, adapter_dirs: Sequence[str | Path] = (), model_name: str | None = None,
                 model_hash: str | None = None, hash_model: bool = True):
        from adapterhub.base import load_base
        from adapterhub.sample.backend import backend as find_backend

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise AdapterhubError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        self.backend = find_backend(backend)  # an unknown backend fails before the model loads
        if isinstance(base, (str, Path)):
            self.pipe = load_base(str(base), dtype=dtype, device=device)
            self.base_path = self._base_path(str(base))
            self.model_name = model_name or _model_name(str(base))
        else:
            self.pipe, self.base_path = base, None
            self.model_name = model_name or Path(str(getattr(base.config, "_name_or_path", "") or "model")).name
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        self.device = self.pipe.unet.device
        self.dtype = self.pipe.unet.dtype
        self.stacks = StackSwitcher(self.pipe, adapter_dirs)
        self.hashes = record.HashCache()  # the file hashes infotexts name, kept between requests
        self._model_hash = model_hash
        self._hash_model = hash_model
        self.encoder = PromptEncoder(self.pipe)
        self.runner = self.backend.prepare(self.pipe)
        self.is_xl = self.encoder.is_xl
        self.arch = "sdxl" if self.is_xl else "sd1"  # what the schedules tell apart (Align Your Steps' tables)
        # called after every denoising step with (index, latents, denoised estimate): see adapterhub.sample.denoise
        self.step_hook: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    # -- facts ------------------------------------------------------------------------------------
    @staticmethod
    def _base_path(spec: str) -> Path | None:
        from adapterhub.base import TINY_BASES, tiny_base_folder

        if spec in TINY_BASES:
            return tiny_base_folder(spec)
        path = Path(spec).expanduser()
        return path if path.exists() else None

    @property
    def model_hash(self) -> str | None:
        if self._model_hash is None and self._hash_model and self.base_path is not None:
            self._model_hash = infotext.model_hash(self.base_path)
        return self._model_hash

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    # -- the stack (adapterhub.sample.stacks) -------------------------------------------------------
    @property
    def stack(self):
        """The applied Stack (None when nothing is applied)."""
        return self.stacks.stack

    @property
    def adapter_dirs(self) -> list:
        """Where stack names, prompt tags and embeddings are looked up (then the catalog)."""
        return self.stacks.adapter_dirs

    @adapter_dirs.setter
    def adapter_dirs(self, dirs: Sequence[str | Path]) -> None:
        self.stacks.adapter_dirs = list(dirs)

    def apply_stack(self, req: Request):
        """Switch to the request's stack (``stack=`` plus prompt tags); returns it and the prompt without
        tags. ``generate`` calls it; calling it first surfaces adapter errors before any sampling."""
        stack, prompt = self.stacks.request_stack(req.stack, req.prompt, req.negative)
        self.use_stack(stack)
        return self.stacks.applied(stack), prompt

    def use_stack(self, stack) -> None:
        """Switch the pipeline to ``stack`` (nothing changes when it equals the applied one)."""
        self.stacks.use(stack, self.runner)

    # -- prompts (adapterhub.sample.conditioning) ---------------------------------------------------
    def encode(self, prompt: str, negative: str, clip_skip: int = 1,
               emphasis: str = "Original") -> tuple[Conditioning, Conditioning]:
        """A prompt and its negative prompt as one conditioning each, with the applied stack's words."""
        return encode_pair(self.encoder, self.pipe, self.stack, prompt, negative, clip_skip, emphasis)

    def prompts(self, prompt: str, negative: str, steps: int, hires_steps: int | None = None, clip_skip: int = 1,
                emphasis: str = "Original", cache: dict | None = None) -> Prompts:
        """The conditioning of one pass (:func:`adapterhub.sample.conditioning.pass_prompts`)."""
        return pass_prompts(self.encoder, self.pipe, self.stack, prompt, negative, steps, hires_steps, clip_skip,
                            emphasis, cache)

    # -- sampling ---------------------------------------------------------------------------------
    def __call__(self, prompt: str, **options) -> Result:
        return self.generate(Request(prompt, **options))

    def generate(self, req: Request, output: str = "pil",
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Run one request. ``output="latent"`` returns the final latents and no images; ``progress(done,
        total)`` after every step of every image (:func:`sampling_steps` per image)."""
        req = normalized(req, self.default_size)
        noise_sources.check_device(req.rng, self.device)
        sampler, schedule = resolve_sampler(req.sampler, req.schedule)
        # missing packages fail here; ``order``: UNet calls per step, as the webui counts a second-order sampler's
        order = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch).order
        stack, prompt = self.apply_stack(req)
        cache: dict = {}
        first = self.prompts(prompt, req.negative, req.steps * order, None, req.clip_skip, req.emphasis, cache)
        hires = None
        if req.hr_scale is not None:
            hires = self.prompts(prompt, req.negative, req.steps * order, (req.hr_steps or req.steps) * order,
                                 req.clip_skip, req.emphasis, cache)
        inpaint = pixels.prepare_inpaint(req)  # None without a mask
        init = self.encode_image(inpaint.init if inpaint else resize_image(req.init_image, req.width, req.height)) \
            if req.init_image is not None else None
        mask = pixels.latent_mask(inpaint.mask, *init.shape[:1:-1]) if inpaint else None
        image_cond = None  # an inpainting model's extra inputs for img2img: the mask and the masked image
        if req.init_image is not None and loop.is_inpainting_model(self):
            image_cond = pixels.inpainting_conditioning(
                self.pipe, req.width, req.height, self.device, self.dtype,
                inpaint.init if inpaint else resize_image(req.init_image, req.width, req.height),
                inpaint.mask if inpaint else None, req.inpainting_mask_weight)
        seeds = [req.seed + i for i in range(req.images)]
        counter = _progress(progress, sampling_steps(req) * req.images)
        images, latents_out = [], []
        for start in range(0, len(seeds), req.batch):
            batch_seeds = seeds[start:start + req.batch]
            latents = self._batch(req, sampler, schedule, first, hires, init, batch_seeds, counter(len(batch_seeds)),
                                  mask, image_cond)
            if output == "latent":
                latents_out.append(latents)
            else:
                images += [pixels.paste_back(i, inpaint) for i in self.decode(latents)] if inpaint else \
                    self.decode(latents)
        texts = record.infotexts(req, seeds, self.parameters(req, sampler, schedule, stack))
        warnings = [*self.stacks.notes, *record.request_warnings(req, sampler, self.is_xl)]
        latents = torch.cat(latents_out) if latents_out else None
        return Result(images, texts, seeds, latents, warnings, req)

    def _batch(self, req: Request, sampler, schedule: str, first: Prompts, hires: Prompts | None, init,
               seeds: list[int], step_done: Callable[[int], None], mask: torch.Tensor | None = None,
               image_cond: torch.Tensor | None = None) -> torch.Tensor:
        """One batch's final latents: the first pass (from noise, or from ``init`` for img2img, inpainting inside
        ``mask``), then the hires pass when the request asks for one. Each pass gets a fresh scheduler."""
        scheduler = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch)
        init_batch = None if init is None else init.repeat(len(seeds), 1, 1, 1)
        latents = self.denoise(first, scheduler, req.steps, req.cfg, seeds, req.width, req.height, on_step=step_done,
                               init=init_batch, strength=req.denoising_strength, rng=req.rng, ensd=req.ensd,
                               mask=mask, fill=req.inpainting_fill, noise_scale=req.initial_noise_multiplier,
                               image_cond=image_cond)
        if hires is None:
            return latents
        width, height = hires_size(req.width, req.height, req.hr_scale)
        upscaled = self.upscale(latents, width, height, req.hr_upscaler)
        scheduler = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch)
        return self.denoise(hires, scheduler, req.hr_steps or req.steps, req.cfg, seeds, width, height,
                            on_step=step_done, init=upscaled, strength=req.hr_denoise, fixed_steps=True, rng=req.rng,
                            ensd=req.ensd)

    def noise(self, seeds: Sequence[int], width: int, height: int, rng: str = "CPU",
              ensd: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per image its initial noise and the generators of its later draws (:func:`denoise.draw_noise`)."""
        return loop.draw_noise(self, seeds, width, height, rng, ensd)

    def sample(self, cond: Conditioning, uncond: Conditioning, scheduler, steps: int, cfg: float,
               seeds: Sequence[int], width: int, height: int,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The denoising loop for one fixed prompt and negative prompt; returns the final latents."""
        return self.denoise(Prompts.constant(cond, uncond), scheduler, steps, cfg, seeds, width, height, on_step)

    def denoise(self, prompts: Prompts, scheduler, steps: int, cfg: float, seeds: Sequence[int], width: int,
                height: int, on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0, fixed_steps: bool = False, rng: str = "CPU", ensd: int = 0,
                mask: torch.Tensor | None = None, fill: int = 1, noise_scale: float = 1.0,
                image_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The denoising loop on this model (:func:`adapterhub.sample.denoise.denoise`); the final latents."""
        return loop.denoise(self, prompts, scheduler, steps, cfg, seeds, width, height, on_step, init, strength,
                            fixed_steps, rng, ensd, mask, fill, noise_scale, image_cond)

    # -- latents and images (adapterhub.sample.images) ----------------------------------------------
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W), as the VAE decodes them."""
        return pixels.decode_tensor(self.pipe, latents)

    def decode(self, latents: torch.Tensor) -> list:
        return pixels.decode(self.pipe, latents)

    def encode_image(self, image) -> torch.Tensor:
        """A PIL image as latents (1, C, H/8, W/8) in the UNet's device and dtype."""
        return pixels.encode_image(self.pipe, image, self.device, self.dtype)

    def upscale(self, latents: torch.Tensor, width: int, height: int, upscaler: str = "Latent") -> torch.Tensor:
        """The hires fix's upscale to ``width`` x ``height`` (:func:`adapterhub.sample.images.upscale`)."""
        return pixels.upscale(self.pipe, latents, width, height, upscaler, self.device, self.dtype)

    # -- infotext (adapterhub.sample.record) ----------------------------------------------------------
    def parameters(self, req: Request, sampler, schedule: str, stack) -> dict[str, Any]:
        """The infotext fields of a normalized request run on this model with ``stack``."""
        fields = record.request_fields(req, sampler, schedule, stack, self.model_name, self.model_hash,
                                       compute=self.hashes)
        return pixels.with_img2img_fields(fields, req, loop.is_inpainting_model(self))

    def close(self) -> None:
        """Take the applied stack off the pipeline (every tensor restored) and undo the backend's changes to it
        (the compiled backend's fused projections and memory format; a later request sets them up again)."""
        self.stacks.remove()
        self.runner.close()


def _progress(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], Callable[[int], None]]:
    """``counter(n)``: a per-step callback adding ``n`` (the batch's images) to the steps done, reported to
    ``progress(done, total)``."""
    done = 0

    def counter(n: int) -> Callable[[int], None]:
        def step_done(_i: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)
        return step_done

    return counter


def _model_name(spec: str) -> str:
    path = Path(spec)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"):
        return path.stem
    return path.name or spec
