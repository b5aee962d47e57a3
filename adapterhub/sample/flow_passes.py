"""The webui's second passes on Flux and SD3 / SD3.5: the hires fix and inpainting, in each family's latent layout.

Hires fix (``hr_scale``; :func:`hires_pass`): the first pass is the txt2img pass at ``width`` x ``height``; its
latents (B, C, H/8, W/8; Flux's unpacked, C the VAE's 16 channels) are upscaled to the hires size
(:func:`hires_size`: ``int(size x scale)``, down to the base's size multiple: 16 px for Flux's 2 x 2 tokens) with a
``Latent …`` mode (interpolated as the webui's) or, for an image upscaler (None, Lanczos, Nearest), decoded (the
VAE's scale and shift undone), made 8-bit as the webui does, resized (:func:`adapterhub.sample.images.resize_image`)
and encoded again (the posterior's mean, shifted and scaled). Then an img2img pass of exactly ``hr_steps`` steps
(0: ``steps``) at the end of an ``int(hr_steps / min(hr_denoise, 0.999))``-step schedule (the webui's fixed step
count, :func:`adapterhub.sample.request.img2img_steps`), with fresh noise from the same seeds: on the pipeline's
own loop the second pass equals diffusers' ``FluxImg2ImgPipeline`` / ``StableDiffusion3Img2ImgPipeline`` given the
upscaled latents; on a k-diffusion sampler, the schedule's last ``hr_steps`` sigmas. Prompt editing and alternation
follow the webui's hires schedule (:func:`prompt_steps`: counted on from the first pass's steps, over ``hr_steps``).

Inpainting (``mask``; :func:`prepare_inpaint`, :class:`LatentBlend`): the Stable Diffusion path's mask preparation
(:func:`adapterhub.sample.images.prepare_mask`: binary, inverted, blurred, "only masked" cropping, the masked area's
start) and paste back, with the flow-matching blend of diffusers' ``FluxInpaintPipeline`` /
``StableDiffusion3InpaintPipeline``: after every scheduler step the latents outside the mask are the init latents
noised to the step's next sigma with the image's own noise (``scale_noise``; after the last step the init latents
themselves); on the pipelines' own loop (Euler, and Heun on SD3, on the "Automatic" schedule) that is a step
callback (:func:`blend_callback`), equal to those pipelines bit for bit. The k-diffusion samplers run their own loop:
there the denoised latents outside the mask are the init latents (:func:`masked_denoiser`, the webui's and Forge's
blend, which keeps a deterministic sampler's unmasked latents on that same noised line) and so are the final ones.
A sampler the Stable Diffusion path refuses a mask (DPM++ 2S a) is refused here too (:func:`mask_problem`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from adapterhub.sample.request import img2img_steps


# -- the hires fix ------------------------------------------------------------------------------------------------
def hires_size(gen, req) -> tuple[int, int]:
    """The hires pass's size: the webui's ``int(size x scale)``, down to a multiple of the base's size multiple
    (the VAE's 8 px times the transformer's patch: a Flux latent grid must pack into 2 x 2 tokens)."""
    step = gen.size_multiple
    return int(req.width * req.hr_scale) // step * step, int(req.height * req.hr_scale) // step * step


def decode_tensor(gen, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W): the VAE's decode of flow latents (its scale and shift undone)."""
    vae = gen.pipe.vae
    with torch.no_grad():
        scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(scaled.to(vae.dtype), return_dict=False)[0]


def upscale(gen, latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """The hires fix's upscale of unpacked latents to ``width`` x ``height``: the SD path's
    (:func:`adapterhub.sample.images.upscale`: the webui's latent modes, or decode, 8-bit, resize, encode) with this
    family's VAE decode (:func:`decode_tensor`) and ``gen.encode_image`` (the posterior's mean, shifted and
    scaled)."""
    from adapterhub.sample.images import upscale as upscale_images

    return upscale_images(gen.pipe, latents, width, height, upscaler, gen.device, gen.dtype,
                          decode=lambda z: decode_tensor(gen, z), encode=gen.encode_image)


def hires_request(req, width: int, height: int):
    """The request of the hires pass: ``width`` x ``height``, its schedule the webui's fixed step count
    (``int(hr_steps / min(d, 0.999))`` steps, the last ``hr_steps`` run), told to the img2img loops as a schedule
    length and a strength that runs exactly that many steps there (``int(d' x length) + 1 = run``);
    ``first_pass_steps`` the first pass's steps, from which its prompt schedule counts on (:func:`prompt_steps`)."""
    length, run = img2img_steps(req.hr_steps or req.steps, req.hr_denoise, fixed=True)
    # (run - 0.5) / length: int() of it times length is run - 1 whatever the float rounding, and it is below 1
    return replace(req, width=width, height=height, steps=length, denoising_strength=(run - 0.5) / length,
                   hr_scale=None, mask=None, initial_noise_multiplier=1.0, first_pass_steps=int(req.steps))


def prompt_steps(req) -> tuple[int, int | None]:
    """The model-call steps a pass's prompt schedule spans and, in the hires pass (``req.first_pass_steps`` set),
    the first pass's (else None): the webui's ``total_steps``, twice the steps for a second-order sampler
    (:func:`~adapterhub.sample.flow_prompt.schedule_steps`), as the Stable Diffusion path counts both. The hires
    pass's are the steps it runs (``hr_steps``), not its fixed schedule's length."""
    from adapterhub.sample.flow_prompt import schedule_steps

    first = getattr(req, "first_pass_steps", None)
    if first is None:
        return schedule_steps(req.sampler, req.steps), None
    run = img2img_steps(req.steps, req.denoising_strength)[1]
    return schedule_steps(req.sampler, run), schedule_steps(req.sampler, first)


def pass_text(text: str, req) -> str:
    """``text`` for a pass of ``req``: the one text of its schedule when it does not change during the pass (the
    webui encodes that text: ``[a:b:0.5]`` in the hires pass is b, ``[a:b:9]`` over 3 steps is a), so that it runs
    as any unscheduled prompt (the pipeline's loop for Euler); else as written, scheduled by the k-diffusion loop
    (:func:`~adapterhub.sample.flow_prompt.pass_schedule`)."""
    from adapterhub.sample.flow_prompt import pass_schedule

    schedule = pass_schedule(text, *prompt_steps(req))
    return schedule[0][1] if len(schedule) == 1 else text


def hires_pass(gen, req, prompt: str, seeds: Sequence[int], first: torch.Tensor,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The hires fix's second pass on the first pass's latents ``first`` (B, C, H/8, W/8): upscaled
    (:func:`upscale`), then denoised from there by the request's sampler (``gen.denoise``, the img2img loops) with
    fresh noise from the same ``seeds``, the prompts on the webui's hires schedule (:func:`prompt_steps`); the final
    latents at the hires size."""
    width, height = hires_size(gen, req)
    upscaled = upscale(gen, first, width, height, req.hr_upscaler)
    return gen.denoise(hires_request(req, width, height), prompt, seeds, on_step,
                       upscaled.to(device=gen.device, dtype=gen.dtype))


def hires_fields(req) -> dict:
    """The hires fix's infotext fields as Forge writes them (txt2img's ``Denoising strength`` is the hires pass's);
    none without the hires fix."""
    from adapterhub.sample import infotext

    if req.hr_scale is None:
        return {}
    return {"Denoising strength": infotext.number(req.hr_denoise), "Hires upscale": infotext.number(req.hr_scale),
            "Hires steps": req.hr_steps or None, "Hires upscaler": req.hr_upscaler}


def check_sizes(gen, req) -> None:
    """The sizes a normalized request samples at, against what the model can place (one line, before sampling):
    SD3's transformer embeds positions up to ``pos_embed_max_size`` patches a side (SD3.5 Large: 192, so 3072 px),
    and the hires pass must fit too."""
    from adapterhub.errors import AdapterhubError

    most = getattr(gen.pipe.transformer.config, "pos_embed_max_size", None)
    if most is None:
        return
    sides = [("size", req.width, req.height)]
    if req.hr_scale is not None:
        sides.append(("hires size", *hires_size(gen, req)))
    limit = int(most) * gen.size_multiple
    for what, width, height in sides:
        if max(width, height) > limit:
            raise AdapterhubError(f"{what} {width}x{height}: this SD3 model places images up to {limit} px a side "
                                  f"(its {most} position embeddings)" + ("; choose a smaller hires scale"
                                                                         if what == "hires size" else ""))


# -- inpainting -------------------------------------------------------------------------------------------------
def prepare_inpaint(gen, req):
    """A normalized request's mask made as the Stable Diffusion path makes it: the
    :class:`~adapterhub.sample.images.PreparedMask` (init image and overlay at the request's size) and the latent mask
    (1, 1, H/8, W/8) on the model's device and dtype, 1 repaints; ``(None, None)`` without a mask."""
    from adapterhub.sample.images import latent_mask
    from adapterhub.sample.images import prepare_inpaint as prepare

    prepared = prepare(req)
    if prepared is None:
        return None, None
    scale = gen.pipe.vae_scale_factor
    mask = latent_mask(prepared.mask, req.width // scale, req.height // scale)
    return prepared, mask.to(device=gen.device, dtype=gen.dtype)


def fill(init: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, how: int) -> torch.Tensor:
    """The masked area's start in latents (the webui's "Masked content"): 2 latent noise (each image's own noise),
    3 latent nothing (zeros); 0 (fill) and 1 (original) were made in pixels (:func:`prepare_inpaint`)."""
    if how in (2, 3):
        return init * (1 - mask) + (noise * mask if how == 2 else 0)
    return init


def _layout(gen, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """Unpacked latents (1 or ``batch`` images) in the pipeline's layout over the batch (Flux: packed tokens)."""
    latents = latents.expand(batch, *latents.shape[1:])
    if gen.family != "flux":
        return latents
    _, channels, rows, cols = latents.shape
    return gen.pipe._pack_latents(latents, batch, channels, rows, cols)


def blend_callback(gen, init: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                   then: Callable | None = None) -> Callable:
    """The pipeline's step callback that inpaints as ``FluxInpaintPipeline`` / ``StableDiffusion3InpaintPipeline``
    do after each scheduler step: outside ``mask`` the latents become ``init`` noised with ``noise`` to the next
    step's sigma (``scale_noise``; after the last step ``init`` itself). ``init``, ``mask`` and ``noise``: unpacked
    (B or 1, C or 1, H/8, W/8); ``then``: a further callback, called with the blended latents."""
    batch, channels = noise.shape[:2]
    init, noise = _layout(gen, init, batch), _layout(gen, noise, batch)
    mask = _layout(gen, mask.expand(batch, channels, *mask.shape[2:]), batch)

    def callback(pipe, i: int, t, tensors: dict) -> dict:
        timesteps = pipe.scheduler.timesteps
        proper = init
        if i < len(timesteps) - 1:
            proper = pipe.scheduler.scale_noise(init, torch.tensor([timesteps[i + 1]]), noise)
        latents = (1 - mask) * proper + mask * tensors["latents"]
        out = then(pipe, i, t, {**tensors, "latents": latents}) if then is not None else {}
        return {**out, "latents": latents}

    return callback


def masked_denoiser(denoiser: Callable, init: torch.Tensor, mask: torch.Tensor) -> Callable:
    """A k-diffusion denoiser whose clean estimate outside ``mask`` is ``init`` (the webui's and Forge's inpainting
    with k-diffusion samplers, which run their own loop: the blend is on the denoised latents). On a flow model
    this keeps the unmasked latents on the line ``sigma noise + (1 - sigma) init`` a deterministic step moves
    along, where the pipeline's blend puts them after each step."""
    init, mask = init.float(), mask.float()

    def blended(x: torch.Tensor, sigma) -> torch.Tensor:
        return init * (1 - mask) + mask * denoiser(x, sigma)

    return blended


def paste(images: list, prepared) -> list:
    """The decoded images laid under the request's overlay (:func:`adapterhub.sample.images.paste_back`)."""
    from adapterhub.sample.images import paste_back

    return images if prepared is None else [paste_back(image, prepared) for image in images]


def mask_problem(req, sampler: str) -> str | None:
    """Why flow sampler ``sampler`` (canonical) cannot inpaint, as the Stable Diffusion path says of the same webui
    sampler (:func:`adapterhub.sample.request.mask_problem`: the ones whose whole loop is k-diffusion's own there),
    so a request is refused alike on every family and by every entry point; None when it can or there is no mask."""
    from adapterhub.sample.request import mask_problem as sd_problem
    from adapterhub.sample.samplers import resolve_sampler

    if req.mask is None:
        return None
    return sd_problem(req, resolve_sampler(sampler, "Automatic")[0])
