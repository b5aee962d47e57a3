"""The generator: a base loaded once, then one call per request.

    gen = Generator("tiny-sd1", backend="eager")
    result = gen("a castle <lora:style:0.8>, (masterpiece:1.2)", negative="blurry", seed=42,
                 steps=20, sampler="DPM++ 2M", cfg=7, batch=2)
    result.images[0].save("castle.png", pnginfo=result.pnginfo(0))

Per request: the adapter stack (``stack=`` plus the prompt's ``<lora:…>`` tags) is switched in (only
the parameters whose contributions change are rewritten), the prompts are encoded the webui's way
(:mod:`adapterhub.sample.conditioning`), and every image n of the request gets its own CPU
``torch.Generator`` seeded ``seed + n`` (the webui with ``RNG: CPU``; diffusers with a list of
generators), used for its initial noise and for its ancestral/SDE noise. The denoising loop is
diffusers' own, step for step, so with the same scheduler, seeds and embeddings it gives the same
latents bit for bit.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample.conditioning import Conditioning, PromptEncoder, add_time_ids
from adapterhub.sample.samplers import make_scheduler, resolve_sampler, schedule_label, set_timesteps

MAX_SEED = 4294967294  # the webui draws random seeds below this
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def _check_request(req: Request, default_size: int) -> Request:
    width, height = req.width or default_size, req.height or default_size
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
    if problems:
        raise AdapterhubError(problems[0])
    seed = int(req.seed) if req.seed is not None and int(req.seed) >= 0 else random.randrange(MAX_SEED)
    return replace(req, width=width, height=height, seed=seed, images=int(req.images or req.batch))


def check_request(req: Request, adapter_dirs: Sequence[str | Path] = ()) -> None:
    """Everything about a request that needs no model: size, counts, sampler and schedule, adapter
    names and tag weights (one-line :class:`AdapterhubError`), so a command can refuse bad input
    before it loads a base or writes anything."""
    from adapterhub.stack import Stack

    _check_request(req, 512)
    resolve_sampler(req.sampler, req.schedule)
    Stack.from_prompt(req.prompt, dirs=adapter_dirs)
    if isinstance(req.stack, str) and req.stack.strip():
        Stack.parse(req.stack, dirs=adapter_dirs)


class Generator:
    """A base pipeline and a sampling backend, built once; call it per request (see module doc)."""

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
        self.adapter_dirs = list(adapter_dirs)
        self._model_hash = model_hash
        self._hash_model = hash_model
        self.encoder = PromptEncoder(self.pipe)
        self.runner = self.backend.prepare(self.pipe)
        self.stack = None  # the applied Stack
        self._stack_key: tuple | None = None
        self._adapters: OrderedDict = OrderedDict()  # (path, mtime, size) -> Adapter, most recent last
        self._hashes: dict = {}
        self.is_xl = self.encoder.is_xl

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

    # -- the stack --------------------------------------------------------------------------------
    def _request_stack(self, req: Request):
        """The explicit stack plus the prompt's tags, and the prompt without them."""
        from adapterhub.stack import Stack

        tagged, cleaned = Stack.from_prompt(req.prompt, dirs=self.adapter_dirs)
        given = req.stack
        if given is None:
            explicit = Stack()
        elif isinstance(given, Stack):
            explicit = given
        elif isinstance(given, str):
            explicit = Stack.parse(given, dirs=self.adapter_dirs) if given.strip() else Stack()
        else:
            explicit = Stack(given)
        entries = [*explicit.entries, *tagged.entries]
        for entry in entries:
            self._preload(entry)
        return Stack(entries), cleaned

    def _preload(self, entry) -> None:
        """Reuse adapters read for earlier requests (same file, unchanged): the weight engine then
        sees the same patches and leaves the parameters they give equal contributions alone."""
        if entry.adapter is not None:
            return
        path = entry.resolve(self.adapter_dirs)
        try:
            st = path.stat()
        except OSError:
            return
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in self._adapters:
            self._adapters.move_to_end(key)
        else:
            from adapterhub.api import load

            self._adapters[key] = load(path)
            while len(self._adapters) > 32:
                self._adapters.popitem(last=False)
        entry.adapter = self._adapters[key]

    def apply_stack(self, req: Request):
        """Switch to the request's stack (``stack=`` plus prompt tags); returns it and the prompt without
        tags. ``generate`` calls it; calling it first surfaces adapter errors before any sampling."""
        stack, prompt = self._request_stack(req)
        self.use_stack(stack)
        return self.stack if self._key(stack) == self._stack_key and self.stack is not None else stack, prompt

    @staticmethod
    def _key(stack) -> tuple:
        # attach options (a control image) count by identity: a new image re-attaches, the same one does not
        return tuple((id(e.adapter), e.te, e.unet, e.lbw, tuple(sorted((k, id(v)) for k, v in e.options.items())))
                     for e in stack.entries)

    def use_stack(self, stack) -> None:
        """Switch the pipeline to ``stack`` (nothing changes when it equals the applied one)."""
        key = self._key(stack)
        if key == self._stack_key:
            return
        self.runner.check_stack(stack)
        if len(stack):
            stack.apply(self.pipe, mode="attach", replace=self.stack is not None)
            self.stack = stack
        elif self.stack is not None:
            self.stack.remove()
            self.stack = None
        self._stack_key = key

    # -- prompts ----------------------------------------------------------------------------------
    def encode(self, prompt: str, negative: str, clip_skip: int = 1,
               emphasis: str = "Original") -> tuple[Conditioning, Conditioning]:
        if self.stack is not None:
            prompt, negative = self.stack.rewrite_prompt(prompt), self.stack.rewrite_prompt(negative)
        cond = self.encoder.encode(prompt, clip_skip, emphasis)
        if self.is_xl and negative == "" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            uncond = cond.zeros()  # the webui and diffusers both zero SDXL's empty negative prompt
        else:
            uncond = self.encoder.encode(negative, clip_skip, emphasis)
        return cond, uncond

    # -- sampling ---------------------------------------------------------------------------------
    def __call__(self, prompt: str, **options) -> Result:
        return self.generate(Request(prompt, **options))

    def generate(self, req: Request, output: str = "pil",
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Run one request. ``output="latent"`` returns the final latents and no images."""
        req = _check_request(req, self.default_size)
        sampler, schedule = resolve_sampler(req.sampler, req.schedule)
        make_scheduler(sampler, schedule, self.pipe.scheduler.config)  # missing packages fail here
        stack, prompt = self.apply_stack(req)
        cond, uncond = self.encode(prompt, req.negative, req.clip_skip, req.emphasis)
        seeds = [req.seed + i for i in range(req.images)]
        total = req.steps * req.images
        done = 0
        images, latents_out = [], []
        for start in range(0, len(seeds), req.batch):
            batch_seeds = seeds[start:start + req.batch]
            scheduler = make_scheduler(sampler, schedule, self.pipe.scheduler.config)

            def step_done(_i, n=len(batch_seeds)):
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total)

            latents = self.sample(cond, uncond, scheduler, req.steps, req.cfg, batch_seeds, req.width, req.height,
                                  on_step=step_done)
            if output == "latent":
                latents_out.append(latents)
            else:
                images += self.decode(latents)
        params = self.parameters(req, sampler, schedule, stack)
        texts = [infotext.create(req.prompt, req.negative, {**params, "Seed": s}) for s in seeds]
        warnings = []
        if self.is_xl and req.clip_skip > 1:
            warnings.append("clip skip is recorded but, as in the webui, not applied to SDXL")
        if sampler.note:
            warnings.append(f"{sampler.name}: {sampler.note}")
        latents = torch.cat(latents_out) if latents_out else None
        return Result(images, texts, seeds, latents, warnings, req)

    def noise(self, seeds: Sequence[int], width: int, height: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per image a CPU generator seeded with its seed, and the initial noise drawn from it
        (shape (1, C, H/8, W/8) each, float32, as ``diffusers.utils.torch_utils.randn_tensor``)."""
        channels = self.pipe.unet.config.in_channels
        scale = self.pipe.vae_scale_factor
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, channels, height // scale, width // scale)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return noise, generators

    def sample(self, cond: Conditioning, uncond: Conditioning, scheduler, steps: int, cfg: float,
               seeds: Sequence[int], width: int, height: int,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The denoising loop (diffusers' own, step for step); returns the final latents."""
        batch = len(seeds)
        dtype, device = self.dtype, self.device
        noise, generators = self.noise(seeds, width, height)
        set_timesteps(scheduler, steps, device=device)
        latents = noise.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
        guided = float(cfg) != 1.0
        together = guided and cond.embeds.shape == uncond.embeds.shape  # else two UNet calls, as the webui
        conds = self._unet_inputs(cond, batch, width, height)
        unconds = self._unet_inputs(uncond, batch, width, height) if guided else None
        if together:
            embeds = torch.cat([unconds[0], conds[0]])
            added = {k: torch.cat([unconds[1][k], conds[1][k]]) for k in conds[1]} if conds[1] else None
        extra = {"generator": generators} if "generator" in _step_params(scheduler) else {}
        with torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps):
                if together:
                    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    noise_pred = self.runner(x, t, embeds, added)
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + cfg * (noise_text - noise_uncond)
                else:
                    x = scheduler.scale_model_input(latents, t)
                    noise_pred = self.runner(x, t, *conds)
                    if guided:
                        noise_uncond = self.runner(x, t, *unconds)
                        noise_pred = noise_uncond + cfg * (noise_pred - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                if on_step is not None:
                    on_step(i)
        return latents

    def _unet_inputs(self, c: Conditioning, batch: int, width: int, height: int):
        embeds = c.embeds.to(device=self.device, dtype=self.dtype).repeat(batch, 1, 1)
        if not self.is_xl:
            return embeds, None
        pooled = c.pooled.to(device=self.device, dtype=self.dtype).repeat(batch, 1)
        return embeds, {"text_embeds": pooled, "time_ids": add_time_ids(width, height, batch, self.dtype, self.device)}

    def decode(self, latents: torch.Tensor) -> list:
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        with torch.inference_mode():
            z = latents.to(vae.dtype) / vae.config.scaling_factor
            image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")

    # -- infotext ---------------------------------------------------------------------------------
    def parameters(self, req: Request, sampler, schedule: str, stack) -> dict[str, Any]:
        lora, ti = self._adapter_hashes(stack, req.prompt + "\n" + req.negative)
        emphasis = req.emphasis if req.emphasis != "Original" and any(c in req.prompt + req.negative for c in "([") \
            else None
        from adapterhub import __version__

        return {
            "Steps": req.steps, "Sampler": sampler.name, "Schedule type": schedule_label(sampler, schedule),
            "CFG scale": infotext.number(req.cfg), "Seed": req.seed, "Size": f"{req.width}x{req.height}",
            "Model hash": self.model_hash, "Model": self.model_name,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None, "RNG": "CPU",
            "Lora hashes": infotext.hashes_text(lora), "TI hashes": infotext.hashes_text(ti),
            "Emphasis": emphasis, "Version": f"adapterhub {__version__}",
        }

    def _adapter_hashes(self, stack, text: str) -> tuple[dict[str, str], dict[str, str]]:
        lora, ti = {}, {}
        for entry in stack.entries:
            adapter = entry.adapter
            path = entry.path or (adapter.path if adapter is not None else None)
            if adapter is None or path is None:
                continue
            if adapter.plugin.weight_space:
                lora.setdefault(entry.label, self._hash(path, infotext.lora_hash, adapter.metadata))
            elif adapter.type == "textual_inversion":
                token = str(adapter.extra.get("token") or entry.label)
                if token.lower() in text.lower():
                    ti.setdefault(token, self._hash(path, infotext.embedding_hash))
        return lora, ti

    def _hash(self, path: Path, fn, *args) -> str:
        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, fn.__name__)
        if key not in self._hashes:
            self._hashes[key] = fn(path, *args)
        return self._hashes[key]

    def close(self) -> None:
        """Take the applied stack off the pipeline (every tensor restored)."""
        if self.stack is not None:
            self.stack.remove()
        self.stack, self._stack_key = None, None


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def _model_name(spec: str) -> str:
    path = Path(spec)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"):
        return path.stem
    return path.name or spec
