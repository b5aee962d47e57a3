"""The generator: a base loaded once, then one call per request.

    gen = Generator("tiny-sd1", backend="eager")
    result = gen("a castle <lora:style:0.8>, (masterpiece:1.2)", negative="blurry", seed=42,
                 steps=20, sampler="DPM++ 2M", cfg=7, batch=2)
    result.images[0].save("castle.png", pnginfo=result.pnginfo(0))

Per request: the adapter stack (``stack=`` plus the prompt's ``<lora:…>`` tags) is switched in (only
the parameters whose contributions change are rewritten), the prompts are encoded the webui's way
(:mod:`adapterhub.sample.conditioning`), and every image n of the request gets its own CPU
``torch.Generator`` seeded ``seed + n`` (the webui with ``RNG: CPU``; diffusers with a list of
generators), used for its initial noise and for its ancestral/SDE noise. ``Request.rng`` picks the webui's
other sources for the initial noise: ``GPU`` (a CUDA generator) or ``NV`` (its emulation of CUDA's noise on
any device), :mod:`adapterhub.sample.rng`. The denoising loop is
diffusers' own, step for step, so with the same scheduler, seeds and embeddings it gives the same
latents bit for bit.

The webui's other prompt features and passes (AUTOMATIC1111 ``prompt_parser``, ``sd_samplers_cfg_denoiser``,
``processing``):

* prompt editing ``[from:to:when]`` and alternation ``[a|b]`` (:func:`adapterhub.sample.prompt.prompt_schedule`):
  every text of a prompt's schedule is encoded once, before the loop, and sampler call ``i`` (counted from
  0, over ``steps x scheduler.order`` calls as the webui counts a second-order sampler's calls) uses the
  first entry that ends at ``i`` or later. The texts of one schedule are encoded as one batch, as the webui
  does: emphasis is re-normalised over the whole batch and shorter texts get empty chunks.
* ``AND`` (composable diffusion): every sub-prompt is its own conditioning with its weight, and the
  guidance is ``uncond + sum_i (cond_i - uncond) x weight_i x cfg`` (``combine_denoised``; computed on the
  noise prediction, which is the same affine combination). The negative prompt is one prompt.
* img2img (``init_image``): the image is resized to the request's size (Lanczos), encoded with the VAE
  (the posterior's mean: the webui draws a sample with an unseeded generator), noised with the image's
  seed to the schedule point of ``denoising_strength`` and denoised from there. The webui's convention
  (``setup_img2img_steps``): ``int(min(d, 0.999) x steps) + 1`` steps of a ``steps``-step schedule; diffusers'
  img2img pipeline runs ``int(steps x d)`` steps instead, one fewer.
* hires fix (``hr_scale``): the first pass, then the latents upscaled (``Latent …`` upscalers: interpolation
  of the latents) or decoded, resized as 8-bit images and encoded again, then an img2img pass of exactly
  ``hr_steps`` steps on a schedule of ``int(hr_steps / min(hr_denoise, 0.999))`` steps, with fresh noise
  from the same seeds and the prompt's hires schedule.
"""
from __future__ import annotations

import math
import random
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from adapterhub.conditioning import running
from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample import rng as noise_sources
from adapterhub.sample.conditioning import (
    Conditioning,
    PromptEncoder,
    _pad_after_end,
    add_time_ids,
    apply_emphasis,
)
from adapterhub.sample.prompt import prompt_schedule, schedule_index, split_and
from adapterhub.sample.samplers import (
    make_scheduler,
    resolve_sampler,
    schedule_label,
    set_timesteps,
)

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


def _load_image(value, what: str = "init image"):
    """A PIL image (RGB) from an image or a path; one line naming it if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    try:
        with Image.open(value) as opened:
            return opened.convert("RGB")
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


def _check_request(req: Request, default_size: int) -> Request:
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
                   hr_upscaler=upscaler, rng=source)


def img2img_steps(steps: int, strength: float, fixed: bool = False) -> tuple[int, int]:
    """``(schedule length, steps run)`` of an img2img pass: the webui's ``setup_img2img_steps``. Plain
    img2img runs ``int(min(d, 0.999) x steps) + 1`` steps of a ``steps``-step schedule; ``fixed`` (the hires
    pass) runs exactly ``steps`` steps of a schedule of ``int(steps / min(d, 0.999))``."""
    strength = min(float(strength), 0.999)
    if fixed:
        return int(steps / strength), steps
    return steps, int(strength * steps) + 1


def sampling_steps(req: Request) -> int:
    """The steps one image of ``req`` is denoised for (both passes of a hires fix)."""
    if req.init_image is not None:
        return img2img_steps(req.steps, req.denoising_strength)[1]
    if req.hr_scale is not None:
        return req.steps + (req.hr_steps or req.steps)
    return req.steps


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires target, ``int(size x scale)`` as the webui computes it, down to a multiple of 8 (the
    latent grid the webui's ``Latent`` upscalers also land on)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def resize_image(image, width: int, height: int, upscaler: str = "None"):
    """The webui's ``images.resize_image`` ("Just resize") with a built-in upscaler: ``None`` resizes with
    Lanczos; ``Lanczos``/``Nearest`` first scale by ``max(w/W, h/H)`` with their filter when that enlarges,
    to a size floored to a multiple of 8 (``Upscaler.upscale``), then Lanczos to the exact size."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if upscaler == "None":
        return image.resize((width, height), resample=lanczos)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        resample = lanczos if upscaler == "Lanczos" else Image.Resampling.NEAREST
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if image.size != dest:
            image = image.resize(dest, resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


@dataclass
class Scheduled:
    """One prompt's conditioning over the sampler calls: ``conds[i]`` up to call ``ends[i]`` (the webui's
    list of ``ScheduledPromptConditioning``; one entry for a prompt without editing or alternation)."""

    ends: list[int]
    conds: list[Conditioning]

    def index(self, step: int) -> int:
        return schedule_index(self.ends, step)


@dataclass
class Prompts:
    """What a denoising pass needs from the prompts: the ``AND`` sub-prompts with their weights, and the
    negative prompt."""

    conds: list[tuple[Scheduled, float]]
    uncond: Scheduled

    @classmethod
    def constant(cls, cond: Conditioning, uncond: Conditioning) -> Prompts:
        return cls([(Scheduled([sys.maxsize], [cond]), 1.0)], Scheduled([sys.maxsize], [uncond]))

    @property
    def plain(self) -> bool:
        """One prompt of weight 1: with CFG 1 the unconditional prediction is not needed."""
        return len(self.conds) == 1 and self.conds[0][1] == 1.0


def _stack_conds(embeds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sub-prompts of different lengths padded by repeating their last vector (``stack_conds``)."""
    longest = max(e.shape[1] for e in embeds)
    return [e if e.shape[1] == longest else torch.cat([e, e[:, -1:].repeat(1, longest - e.shape[1], 1)], dim=1)
            for e in embeds]


def check_request(req: Request, adapter_dirs: Sequence[str | Path] = ()) -> None:
    """Everything about a request that needs no model: size, counts, sampler and schedule, adapter
    names and tag weights (one-line :class:`AdapterhubError`), so a command can refuse bad input
    before it loads a base or writes anything."""
    from adapterhub.stack import Stack

    _check_request(req, 512)  # the init image too: an unreadable one fails here
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
        self._notes: list[str] = []  # warnings of the request being prepared (skipped embeddings)
        self.is_xl = self.encoder.is_xl
        self.arch = "sdxl" if self.is_xl else "sd1"  # what the schedules tell apart (Align Your Steps' tables)

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

        self._notes = []
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
        entries += self._named_embeddings(cleaned + "\n" + req.negative, entries)
        return Stack(entries), cleaned

    # -- embeddings named in the prompt (the webui's embeddings folder) ---------------------------
    def _named_embeddings(self, text: str, entries) -> list:
        """Entries (weight 1) for the textual inversions of ``adapter_dirs`` (then the catalog) whose name
        ``text`` spells, as the webui uses every embedding of its folder that a prompt names: a name is a file
        stem, matched as a token sequence of the prompt (:func:`embedding_names_in`), so any case and whole
        words only. Embeddings already in the stack are not added twice; one that does not fit the base is
        skipped with a warning (the webui lists those as skipped)."""
        from adapterhub.stack import Entry

        have = {str(e.path.resolve()) for e in entries if e.path is not None}
        tokens = {str(e.adapter.extra.get("token", "")).lower() for e in entries
                  if e.adapter is not None and e.adapter.plugin.prompt_tokens}
        candidates = {n: p for n, p in embedding_candidates(self.adapter_dirs).items() if n.lower() not in tokens}
        if not candidates:
            return []
        found = []
        for name in embedding_names_in(text, candidates, self.pipe.tokenizer):
            path = candidates[name]
            if str(path.resolve()) in have:
                continue
            entry = Entry(path, path=path)
            try:
                self._preload(entry)
            except AdapterhubError:
                continue  # a file of that name that is not readable is not an embedding the prompt meant
            adapter = entry.adapter
            if adapter is None or not adapter.plugin.prompt_tokens:
                continue
            problem = _embedding_misfit(adapter, self.pipe)
            if problem:
                self._notes.append(f"embedding {name!r} ({path}) does not fit this base ({problem}): skipped, its "
                                   "word is read as plain text")
                continue
            have.add(str(path.resolve()))
            found.append(entry)
        return found

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

    def prompts(self, prompt: str, negative: str, steps: int, hires_steps: int | None = None, clip_skip: int = 1,
                emphasis: str = "Original", cache: dict | None = None) -> Prompts:
        """The conditioning of one pass: ``prompt`` split at ``AND``, every sub-prompt and the negative prompt
        scheduled over ``steps`` sampler calls (with ``hires_steps``: the hires pass of that many calls,
        ``steps`` being the first pass's). ``cache`` shares encodings between passes."""
        cache = {} if cache is None else cache

        def scheduled(text: str, negative: bool = False) -> Scheduled:
            schedule = prompt_schedule(text, steps, hires_steps)
            texts = tuple(self.stack.rewrite_prompt(t) if self.stack is not None else t for _, t in schedule)
            key = (texts, negative, clip_skip, emphasis)
            if key not in cache:
                cache[key] = self._encode_texts(texts, clip_skip, emphasis)
                if negative and self.is_xl and all(t == "" for t in texts) and \
                        self.pipe.config.get("force_zeros_for_empty_prompt", False):
                    cache[key] = [c.zeros() for c in cache[key]]  # the webui and diffusers zero it
            return Scheduled([end for end, _ in schedule], cache[key])

        return Prompts([(scheduled(text), weight) for text, weight in split_and(prompt)], scheduled(negative, True))

    def _encode_texts(self, texts: Sequence[str], clip_skip: int, emphasis: str) -> list[Conditioning]:
        """The texts of one prompt's schedule, encoded as the webui encodes them: as one batch, in which a
        text with fewer chunks gets empty chunks (BOS, then EOS) and emphasis re-normalises each chunk by the
        mean over the whole batch (``sd_hijack_clip``, ``sd_emphasis``). One text: ``PromptEncoder.encode``."""
        if len(texts) == 1:
            return [self.encoder.encode(texts[0], clip_skip, emphasis)]
        unique = list(dict.fromkeys(texts))
        rows = [unique.index(t) for t in texts]  # the batch, duplicates included, as rows of ``unique``
        tokenized = [self.encoder.tokenize(t, emphasis) for t in unique]
        per_encoder, pooled = [], None
        for k, (tokenizer, encoder) in enumerate(self.encoder.pairs):
            empty = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76
            chunks = max(len(tok[k].chunks) for tok in tokenized)
            zs = []
            for c in range(chunks):
                picked = [tok[k].chunks[c] if c < len(tok[k].chunks) else None for tok in tokenized]
                ids = torch.tensor([p.tokens if p else empty for p in picked], device=encoder.device)
                mults = torch.tensor([p.multipliers if p else [1.0] * 77 for p in picked], device=encoder.device)
                with torch.no_grad():
                    z, pool = self.encoder._hidden(encoder, _pad_after_end(ids, tokenizer), clip_skip)
                    z = apply_emphasis(z[rows], mults[rows].to(z.dtype), emphasis)
                zs.append(z)
                if c == 0 and pool is not None:
                    pooled = pool[rows]  # each text's first chunk, as the webui
            per_encoder.append(torch.cat(zs, dim=1))
        embeds = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
        first = {t: texts.index(t) for t in unique}
        counts = {t: tokenized[i][0].token_count for i, t in enumerate(unique)}
        out = []
        for t in texts:
            i = first[t]
            out.append(Conditioning(embeds[i:i + 1], pooled[i:i + 1] if pooled is not None else None, counts[t]))
        return out

    # -- sampling ---------------------------------------------------------------------------------
    def __call__(self, prompt: str, **options) -> Result:
        return self.generate(Request(prompt, **options))

    def generate(self, req: Request, output: str = "pil",
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Run one request. ``output="latent"`` returns the final latents and no images."""
        req = _check_request(req, self.default_size)
        noise_sources.check_device(req.rng, self.device)
        sampler, schedule = resolve_sampler(req.sampler, req.schedule)
        # missing packages fail here; ``order``: UNet calls per step, as the webui counts a second-order sampler's
        order = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch).order
        stack, prompt = self.apply_stack(req)
        cache: dict = {}
        first = self.prompts(prompt, req.negative, req.steps * order, None, req.clip_skip, req.emphasis, cache)
        hires = None
        if req.hr_scale is not None:
            hr_steps = req.hr_steps or req.steps
            hires = self.prompts(prompt, req.negative, req.steps * order, hr_steps * order, req.clip_skip,
                                 req.emphasis, cache)
        init = self.encode_image(resize_image(req.init_image, req.width, req.height)) \
            if req.init_image is not None else None
        seeds = [req.seed + i for i in range(req.images)]
        total = sampling_steps(req) * req.images
        done = 0

        def counter(n: int) -> Callable[[int], None]:
            def step_done(_i: int) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total)
            return step_done

        images, latents_out = [], []
        for start in range(0, len(seeds), req.batch):
            batch_seeds = seeds[start:start + req.batch]
            step_done = counter(len(batch_seeds))
            scheduler = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch)
            init_batch = None if init is None else init.repeat(len(batch_seeds), 1, 1, 1)
            latents = self.denoise(first, scheduler, req.steps, req.cfg, batch_seeds, req.width, req.height,
                                   on_step=step_done, init=init_batch, strength=req.denoising_strength, rng=req.rng,
                                   ensd=req.ensd)
            if hires is not None:
                width, height = hires_size(req.width, req.height, req.hr_scale)
                upscaled = self.upscale(latents, width, height, req.hr_upscaler)
                scheduler = make_scheduler(sampler, schedule, self.pipe.scheduler.config, self.arch)
                latents = self.denoise(hires, scheduler, req.hr_steps or req.steps, req.cfg, batch_seeds, width,
                                       height, on_step=step_done, init=upscaled, strength=req.hr_denoise,
                                       fixed_steps=True, rng=req.rng, ensd=req.ensd)
            if output == "latent":
                latents_out.append(latents)
            else:
                images += self.decode(latents)
        params = self.parameters(req, sampler, schedule, stack)
        texts = [infotext.create(req.prompt, req.negative, {**params, "Seed": s}) for s in seeds]
        warnings = list(self._notes)
        if self.is_xl and req.clip_skip > 1:
            warnings.append("clip skip is recorded but, as in the webui, not applied to SDXL")
        if sampler.note:
            warnings.append(f"{sampler.name}: {sampler.note}")
        if noise_sources.later_draws_note(req.rng, sampler.name):
            warnings.append(noise_sources.later_draws_note(req.rng, sampler.name))
        if sampler.timestep_based and (req.init_image is not None or req.hr_scale is not None):
            warnings.append(f"{sampler.name}: img2img follows the k-diffusion samplers' convention here (noised to "
                            "the first step it runs); the webui's timestep samplers noise one step above it")
        latents = torch.cat(latents_out) if latents_out else None
        return Result(images, texts, seeds, latents, warnings, req)

    def noise(self, seeds: Sequence[int], width: int, height: int, rng: str = "CPU",
              ensd: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per image its initial noise (C, H/8, W/8), float32, from source ``rng`` seeded with its seed, and the
        torch generators for the sampler's later draws (:func:`adapterhub.sample.rng.initial_noise`; ``CPU``
        is ``diffusers.utils.torch_utils.randn_tensor`` with a list of CPU generators; ``ensd``: the webui's eta
        noise seed delta)."""
        from adapterhub.sample.rng import initial_noise

        channels = self.pipe.unet.config.in_channels
        scale = self.pipe.vae_scale_factor
        return initial_noise(rng, seeds, (channels, height // scale, width // scale), self.device, ensd)

    def sample(self, cond: Conditioning, uncond: Conditioning, scheduler, steps: int, cfg: float,
               seeds: Sequence[int], width: int, height: int,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The denoising loop for one fixed prompt and negative prompt; returns the final latents."""
        return self.denoise(Prompts.constant(cond, uncond), scheduler, steps, cfg, seeds, width, height, on_step)

    def denoise(self, prompts: Prompts, scheduler, steps: int, cfg: float, seeds: Sequence[int], width: int,
                height: int, on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0, fixed_steps: bool = False, rng: str = "CPU", ensd: int = 0) -> torch.Tensor:
        """The denoising loop (diffusers' own, step for step); returns the final latents.

        From noise, or with ``init`` latents (one per seed) from the point of the schedule that
        ``strength`` gives (:func:`img2img_steps`: ``fixed_steps`` for the hires pass), the latents noised
        there with each image's generator, as diffusers' img2img pipeline does (``add_noise``)."""
        batch = len(seeds)
        dtype, device = self.dtype, self.device
        noise, generators = self.noise(seeds, width, height, rng, ensd)
        noise = noise.to(device=device, dtype=dtype)
        if init is None:
            set_timesteps(scheduler, steps, device=device)
            timesteps = scheduler.timesteps
            latents = noise * scheduler.init_noise_sigma
        else:
            length, run = img2img_steps(steps, strength, fixed_steps)
            set_timesteps(scheduler, length, device=device)
            begin = (length - run) * scheduler.order
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
            timesteps = scheduler.timesteps[begin:]
            latents = scheduler.add_noise(init.to(device=device, dtype=dtype), noise, timesteps[:1].repeat(batch))
        # DDIM CFG++ (the webui's): the scale shrunk by the scheduler's multiplier, the unconditional prediction
        # handed to its step as well
        cfg = float(cfg) * getattr(scheduler, "cfg_scale_multiplier", 1.0)
        with_uncond = bool(getattr(scheduler, "wants_uncond", False))
        guided = cfg != 1.0 or not prompts.plain or with_uncond
        weights = [w for _, w in prompts.conds]
        extra = {"generator": generators} if "generator" in _step_params(scheduler) else {}
        built, inputs = None, None
        with torch.inference_mode(), running(scheduler):  # controls gate by this scheduler's steps
            for i, t in enumerate(timesteps):
                key = (tuple(s.index(i) for s, _ in prompts.conds), prompts.uncond.index(i) if guided else None)
                if key != built:  # the conditioning changes only where a schedule does
                    inputs, built = self._step_inputs(prompts, key, batch, width, height), key
                noise_pred = self._guided(latents, t, scheduler, inputs, weights, cfg, batch, with_uncond)
                if with_uncond:
                    noise_pred, uncond = noise_pred
                    extra["uncond_output"] = uncond
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                # the k-diffusion samplers (ksamplers) say how many steps a call finished: progress adds up to steps
                for _ in range(getattr(scheduler, "completed_steps", 1) if on_step is not None else 0):
                    on_step(i)
        return latents

    def _step_inputs(self, prompts: Prompts, key: tuple, batch: int, width: int, height: int) -> dict:
        """The UNet inputs for one choice of schedule entries: the sub-prompts (padded to one length, each
        repeated over the batch), the negative, and whether they go through the UNet as one batch."""
        chosen = [s.conds[k] for (s, _), k in zip(prompts.conds, key[0])]
        embeds = _stack_conds([c.embeds for c in chosen])
        parts = [self._unet_inputs(Conditioning(e, c.pooled, c.token_count), batch, width, height)
                 for e, c in zip(embeds, chosen)]
        conds = (torch.cat([p[0] for p in parts]),
                 {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]} if parts[0][1] else None)
        if key[1] is None:
            return {"conds": conds, "unconds": None, "together": None}
        unconds = self._unet_inputs(prompts.uncond.conds[key[1]], batch, width, height)
        together = None
        if unconds[0].shape[1] == conds[0].shape[1]:  # else two UNet calls, as the webui
            together = (torch.cat([unconds[0], conds[0]]),
                        {k: torch.cat([unconds[1][k], conds[1][k]]) for k in conds[1]} if conds[1] else None)
        return {"conds": conds, "unconds": unconds, "together": together}

    def _guided(self, latents, t, scheduler, inputs: dict, weights: list[float], cfg: float, batch: int,
                with_uncond: bool = False):
        """The noise prediction with classifier-free guidance over the ``AND`` sub-prompts: the webui's
        ``combine_denoised``, ``uncond + sum_i (cond_i - uncond) x (weight_i x cfg)`` (and the unconditional
        prediction beside it when ``with_uncond``)."""
        n = len(weights)
        if inputs["together"] is not None:
            x = scheduler.scale_model_input(torch.cat([latents] * (n + 1)), t)
            out = self.runner(x, t, *inputs["together"])
            uncond, cond = out[:batch], out[batch:]
        else:
            x = scheduler.scale_model_input(latents, t)
            cond = self.runner(torch.cat([x] * n) if n > 1 else x, t, *inputs["conds"])
            if inputs["unconds"] is None:
                return cond
            uncond = self.runner(x, t, *inputs["unconds"])
        pred = uncond
        for i, weight in enumerate(weights):
            pred = pred + (cond[i * batch:(i + 1) * batch] - uncond) * (weight * cfg)
        return (pred, uncond) if with_uncond else pred

    def _unet_inputs(self, c: Conditioning, batch: int, width: int, height: int):
        embeds = c.embeds.to(device=self.device, dtype=self.dtype).repeat(batch, 1, 1)
        if not self.is_xl:
            return embeds, None
        pooled = c.pooled.to(device=self.device, dtype=self.dtype).repeat(batch, 1)
        return embeds, {"text_embeds": pooled, "time_ids": add_time_ids(width, height, batch, self.dtype, self.device)}

    def _vae(self):
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        return vae

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W), as the VAE decodes them."""
        vae = self._vae()
        with torch.inference_mode():
            return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> list:
        return self.pipe.image_processor.postprocess(self.decode_tensor(latents), output_type="pil")

    def encode_image(self, image) -> torch.Tensor:
        """A PIL image as latents (1, C, H/8, W/8): pixels / 255 mapped to [-1, 1] (the webui's and diffusers'
        preprocessing), the VAE posterior's mean, times the scaling factor."""
        import numpy as np

        vae = self._vae()
        pixels = torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        with torch.inference_mode():
            z = vae.encode((pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        # contiguous: the VAE returns channels-last strides, and the UNet's kernels round by memory layout
        return (z * vae.config.scaling_factor).to(device=self.device, dtype=self.dtype).contiguous()

    def upscale(self, latents: torch.Tensor, width: int, height: int, upscaler: str = "Latent") -> torch.Tensor:
        """The hires fix's upscale to ``width`` x ``height`` (``sample_hr_pass``): a ``Latent …`` mode
        interpolates the latents; an image upscaler decodes them, makes 8-bit images as the webui does
        (``clamp((x + 1) / 2) x 255``, truncated), resizes them (:func:`resize_image`) and encodes them again."""
        import numpy as np
        from PIL import Image

        upscaler = hires_upscaler(upscaler)
        scale = self.pipe.vae_scale_factor
        if upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[upscaler]
            return torch.nn.functional.interpolate(latents, size=(height // scale, width // scale), mode=mode,
                                                   antialias=antialias)
        decoded = torch.clamp((self.decode_tensor(latents).float() + 1.0) / 2.0, min=0.0, max=1.0)
        out = []
        for x in decoded:
            pixels = (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
            out.append(self.encode_image(resize_image(Image.fromarray(pixels), width, height, upscaler)))
        return torch.cat(out)

    # -- infotext ---------------------------------------------------------------------------------
    def parameters(self, req: Request, sampler, schedule: str, stack) -> dict[str, Any]:
        fields = infotext.adapter_fields(stack, req.prompt + "\n" + req.negative, compute=self._hash)
        emphasis = req.emphasis if req.emphasis != "Original" and any(c in req.prompt + req.negative for c in "([") \
            else None
        from adapterhub import __version__

        denoise = infotext.number(req.denoising_strength) if req.init_image is not None else None
        hires = {}
        if req.hr_scale is not None:  # the webui's txt2img writes the hires denoising as "Denoising strength"
            denoise = infotext.number(req.hr_denoise)
            hires = {"Hires upscale": infotext.number(req.hr_scale), "Hires steps": req.hr_steps or None,
                     "Hires upscaler": req.hr_upscaler}
        return {
            "Steps": req.steps, "Sampler": sampler.name, "Schedule type": schedule_label(sampler, schedule),
            "CFG scale": infotext.number(req.cfg), "Seed": req.seed, "Size": f"{req.width}x{req.height}",
            "Model hash": self.model_hash, "Model": self.model_name, "Denoising strength": denoise,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None, **hires,
            "RNG": req.rng if req.rng != "GPU" else None,  # the webui leaves its default out
            # as the webui: only where the sampler draws noise again
            "ENSD": req.ensd if req.ensd and noise_sources.draws_more(sampler.name) else None,
            # the webui's order: the hash lists, Emphasis, then the extensions' fields (ControlNet units)
            "Lora hashes": fields.pop("Lora hashes", None), "TI hashes": fields.pop("TI hashes", None),
            "Emphasis": emphasis, **fields, "Version": f"adapterhub {__version__}",
        }

    def _hash(self, value) -> str:
        """``value()``; a file hash (``functools.partial(fn, path, ...)``) cached by the file's path, mtime and
        size and the hash function: an unchanged file is not read again for the next image."""
        if not getattr(value, "args", None) or not isinstance(value.args[0], (str, Path)):
            return value()  # not a file's hash: nothing to key a cache on
        path = Path(value.args[0])
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, value.func.__name__)
        if key not in self._hashes:
            self._hashes[key] = value()
        return self._hashes[key]

    def close(self) -> None:
        """Take the applied stack off the pipeline (every tensor restored) and undo the backend's changes to it
        (the compiled backend's fused projections and memory format; a later request sets them up again)."""
        if self.stack is not None:
            self.stack.remove()
        self.stack, self._stack_key = None, None
        self.runner.close()


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # the webui's embeddings folder takes these (and images)


def embedding_candidates(dirs: Sequence[str | Path]) -> dict[str, Path]:
    """Name (file stem) -> file of every file that may be an embedding: in ``dirs`` and their sub-folders (the
    webui walks its embeddings folder), then the catalog's textual inversions when a catalog is there. The
    first file of a name wins, as a name in ``--stack`` is looked up."""
    found: dict[str, Path] = {}
    for folder in dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    for name, path in _catalog_embeddings().items():
        found.setdefault(name, path)
    return found


def _catalog_embeddings() -> dict[str, Path]:
    """The textual inversions of the default catalog (``$ADAPTERHUB_CATALOG`` or ./catalog.db), when there is
    one; never creates it. A catalog that cannot be read adds nothing: the folders still count."""
    import importlib.util

    if importlib.util.find_spec("adapterhub.catalog") is None:
        return {}
    from adapterhub.catalog import catalog_url, list_entries, open_catalog, sqlite_path

    url = catalog_url(None)
    db_file = sqlite_path(url)
    if db_file is not None and not db_file.exists():
        return {}
    from adapterhub.plugins import adapter_types

    kinds = [name for name, t in adapter_types().items() if t.prompt_tokens]  # types a prompt names by a word
    try:
        with open_catalog(url) as catalog:
            rows = [row for kind in kinds for row in list_entries(catalog, type=kind)]
    except AdapterhubError:
        return {}
    return {Path(r["path"]).stem: Path(r["path"]) for r in rows if r.get("path")}


def _words(text: str, tokenizer) -> list[str]:
    """``text`` as the CLIP tokenizer's BPE pieces, without its added tokens (attached embeddings add some, and
    the pieces must not depend on what is attached): lower-cased, ``</w>`` ending each word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return tokenizer.tokenize(text)
    normal = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    return [t.value for word, _ in backend.pre_tokenizer.pre_tokenize_str(normal) for t in backend.model.tokenize(word)]


def embedding_names_in(text: str, names, tokenizer) -> list[str]:
    """The names among ``names`` that ``text`` spells, by the webui's rule (``EmbeddingDatabase``): each name is
    tokenized, and at every token of the text the longest name whose tokens follow there is used (then the scan
    goes on after it). The tokenizer lower-cases and marks word ends, so ``easynegative`` and ``(EasyNegative:1.2)``
    name ``EasyNegative``, while ``EasyNegativeV2`` and ``easy negative`` do not."""
    by_first: dict[str, list[tuple[list[str], str]]] = {}
    for name in names:
        pieces = _words(name, tokenizer)
        if pieces:
            by_first.setdefault(pieces[0], []).append((pieces, name))
    for group in by_first.values():
        group.sort(key=lambda item: -len(item[0]))
    tokens, used, i = _words(text, tokenizer), [], 0
    while i < len(tokens):
        for pieces, name in by_first.get(tokens[i], ()):
            if tokens[i:i + len(pieces)] == pieces:
                used.append(name)
                i += len(pieces) - 1
                break
        i += 1
    return list(dict.fromkeys(used))


def _embedding_misfit(adapter, pipe) -> str | None:
    """Why an embedding cannot be used on ``pipe`` (another base's vector widths or encoders), else None."""
    from adapterhub.weights import component

    encoders = {p.component for p in adapter.patches.values()}
    wanted = {name for name in ("text_encoder", "text_encoder_2") if component(pipe, name) is not None}
    if encoders != wanted:
        return f"vectors for {', '.join(sorted(encoders))}; the base has {', '.join(sorted(wanted))}"
    for patch in adapter.patches.values():
        width = component(pipe, patch.component).get_input_embeddings().weight.shape[1]
        if patch.width != width:
            return f"vectors {patch.width} wide; {patch.component} takes {width}"
    return None


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def _model_name(spec: str) -> str:
    path = Path(spec)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"):
        return path.stem
    return path.name or spec
