"""The denoising loop: diffusers' own, step for step, with the webui's guidance over ``AND`` sub-prompts.

Every image n of a batch gets its own noise source seeded ``seed + n`` (:mod:`adapterhub.sample.rng`: the
webui's ``RNG: CPU`` is diffusers with a list of CPU generators), used for its initial noise and for its
ancestral/SDE noise, so with the same scheduler, seeds and embeddings the latents equal diffusers' bit for
bit. The conditioning of a call changes only where a prompt's schedule does (:class:`Prompts`).

The functions take the ``model`` they run on, the generator: ``pipe``, ``runner`` (the sampler backend's
noise prediction, read at every call: a server may swap it between requests), ``device``, ``dtype``,
``is_xl``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from adapterhub.conditioning import running
from adapterhub.errors import AdapterhubError
from adapterhub.sample.conditioning import Conditioning, Prompts, add_time_ids, stack_conds
from adapterhub.sample.request import img2img_steps
from adapterhub.sample.samplers import KDIFFUSION, set_timesteps


def draw_noise(model, seeds: Sequence[int], width: int, height: int, rng: str = "CPU",
               ensd: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per image its initial noise (C, H/8, W/8), float32, from source ``rng`` seeded with its seed, and the
    torch generators for the sampler's later draws (:func:`adapterhub.sample.rng.initial_noise`; ``CPU``
    is ``diffusers.utils.torch_utils.randn_tensor`` with a list of CPU generators; ``ensd``: the webui's eta
    noise seed delta)."""
    from adapterhub.sample.rng import initial_noise

    channels = latent_channels(model)
    scale = model.pipe.vae_scale_factor
    return initial_noise(rng, seeds, (channels, height // scale, width // scale), model.device, ensd)


def is_inpainting_model(model) -> bool:
    """Whether the UNet is an inpainting model's: it takes, besides its latents, the mask and the masked image's
    latents (sd-v1-5-inpainting's 9 input channels for 4 out; the webui's ``conditioning_key == "hybrid"``)."""
    config = model.pipe.unet.config
    return config.in_channels == 2 * config.out_channels + 1


def latent_channels(model) -> int:
    """The channels of the latents the UNet denoises (an inpainting model's extra inputs left out)."""
    config = model.pipe.unet.config
    return config.out_channels if is_inpainting_model(model) else config.in_channels


def image_conditioning(model, width: int, height: int, batch: int,
                       given: torch.Tensor | None = None) -> torch.Tensor | None:
    """An inpainting model's extra input channels for a batch, (batch, 5, H/8, W/8) (None for any other model):
    ``given`` (a masked img2img's, :func:`adapterhub.sample.images.inpainting_conditioning`), else the webui's
    conditioning for a pass without a mask (txt2img, img2img, the hires pass): all-ones mask, mid-grey image."""
    if not is_inpainting_model(model):
        return None
    if given is None:
        from adapterhub.sample.images import inpainting_conditioning

        given = inpainting_conditioning(model.pipe, width, height, model.device, model.dtype)
    given = given.to(device=model.device, dtype=model.dtype)
    return given if given.shape[0] == batch else given.expand(batch, -1, -1, -1)


def denoise(model, prompts: Prompts, scheduler, steps: int, cfg: float, seeds: Sequence[int], width: int,
            height: int, on_step: Callable[[int], None] | None = None, init: torch.Tensor | None = None,
            strength: float = 1.0, fixed_steps: bool = False, rng: str = "CPU", ensd: int = 0,
            mask: torch.Tensor | None = None, fill: int = 1, noise_scale: float = 1.0,
            image_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loop (diffusers' own, step for step); returns the final latents.

    From noise, or with ``init`` latents (one per seed) from the point of the schedule that
    ``strength`` gives (:func:`img2img_steps`: ``fixed_steps`` for the hires pass), the latents noised
    there with each image's generator, as diffusers' img2img pipeline does (``add_noise``).

    With a ``mask`` (inpainting: (1, 1, H/8, W/8), 1 repaints) the masked area starts from ``init`` as ``fill``
    says (1 the image, 2 the image's own noise, 3 zeros; 0 was filled in pixels) and after every step the latents
    outside it are the init latents noised to the next step (at the last step: the init latents), as diffusers'
    inpainting pipeline does with a 4-channel UNet.

    On an inpainting model (:func:`is_inpainting_model`) every UNet call also takes ``image_cond`` (the mask and the
    masked image's latents, :func:`image_conditioning`; None: the conditioning of a pass without a mask), and the
    latents outside the mask are not blended back: diffusers' inpainting pipeline with a 9-channel UNet (the final
    image still keeps the original pixels outside the mask: the overlay).

    ``noise_scale`` (the webui's img2img ``initial_noise_multiplier``) multiplies the noise ``init`` is noised with
    (not the sampler's later draws).

    ``model.step_hook`` (when set): called after every step with its index (of the loop's calls: a second-order
    sampler's steps count twice), the latents and the denoised estimate of that step (the clean latents the
    guided prediction points at, :func:`clean_estimate`)."""
    batch = len(seeds)
    dtype, device = model.dtype, model.device
    extra_channels = image_conditioning(model, width, height, batch, image_cond)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE's Brownian tree, seeded per image as the webui does (create_noise_sampler); unseeded, diffusers
        # draws a random seed and the image could not be made again
        scheduler.noise_sampler_seed = list(seeds)
    noise, generators = draw_noise(model, seeds, width, height, rng, ensd)
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
        init = init.to(device=device, dtype=dtype)
        if noise_scale != 1.0:
            noise = noise * noise_scale
        if mask is not None:
            if type(scheduler).__name__ == KDIFFUSION:  # the k-diffusion algorithms: no step to blend at
                raise AdapterhubError("this sampler runs its own loop: no masks (inpainting) with it here")
            mask = mask.to(device=device, dtype=dtype)
            if fill in (2, 3):  # the webui's latent noise / latent nothing
                init = init * (1 - mask) + (noise * mask if fill == 2 else 0)
            if extra_channels is not None:  # the model itself keeps the unmasked region: no blend (diffusers')
                mask = None
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
    # DDIM CFG++ (the webui's): the scale shrunk by the scheduler's multiplier, the unconditional prediction
    # handed to its step as well
    cfg = float(cfg) * getattr(scheduler, "cfg_scale_multiplier", 1.0)
    with_uncond = bool(getattr(scheduler, "wants_uncond", False))
    guided = cfg != 1.0 or not prompts.plain or with_uncond
    weights = [w for _, w in prompts.conds]
    extra = {"generator": generators} if "generator" in _step_params(scheduler) else {}
    built, inputs = None, None
    hook = getattr(model, "step_hook", None)
    with torch.inference_mode(), running(scheduler):  # controls gate by this scheduler's steps
        for i, t in enumerate(timesteps):
            key = (tuple(s.index(i) for s, _ in prompts.conds), prompts.uncond.index(i) if guided else None)
            if key != built:  # the conditioning changes only where a schedule does
                inputs, built = _step_inputs(model, prompts, key, batch, width, height), key
            noise_pred = _guided(model, latents, t, scheduler, inputs, weights, cfg, batch, with_uncond, extra_channels)
            if with_uncond:
                noise_pred, uncond = noise_pred
                extra["uncond_output"] = uncond
            denoised = denoised_estimate(model, scheduler, latents, t, noise_pred) if hook is not None else None
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if mask is not None:  # diffusers' blend, in its order: outside the mask the init latents, noised on
                proper = init if i == len(timesteps) - 1 else scheduler.add_noise(init, noise, timesteps[i + 1:i + 2])
                latents = (1 - mask) * proper + mask * latents
            if hook is not None:
                hook(i, latents, denoised)
            # the k-diffusion samplers (ksamplers) say how many steps a call finished: progress adds up to steps
            for _ in range(getattr(scheduler, "completed_steps", 1) if on_step is not None else 0):
                on_step(i)
    return latents


def _step_inputs(model, prompts: Prompts, key: tuple, batch: int, width: int, height: int) -> dict:
    """The UNet inputs for one choice of schedule entries: the sub-prompts (padded to one length, each
    repeated over the batch), the negative, and whether they go through the UNet as one batch."""
    chosen = [s.conds[k] for (s, _), k in zip(prompts.conds, key[0])]
    embeds = stack_conds([c.embeds for c in chosen])
    parts = [_unet_inputs(model, Conditioning(e, c.pooled, c.token_count), batch, width, height)
             for e, c in zip(embeds, chosen)]
    conds = (torch.cat([p[0] for p in parts]),
             {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]} if parts[0][1] else None)
    if key[1] is None:
        return {"conds": conds, "unconds": None, "together": None}
    unconds = _unet_inputs(model, prompts.uncond.conds[key[1]], batch, width, height)
    together = None
    if unconds[0].shape[1] == conds[0].shape[1]:  # else two UNet calls, as the webui
        together = (torch.cat([unconds[0], conds[0]]),
                    {k: torch.cat([unconds[1][k], conds[1][k]]) for k in conds[1]} if conds[1] else None)
    return {"conds": conds, "unconds": unconds, "together": together}


def _guided(model, latents, t, scheduler, inputs: dict, weights: list[float], cfg: float, batch: int,
            with_uncond: bool = False, extra: torch.Tensor | None = None):
    """The noise prediction with classifier-free guidance over the ``AND`` sub-prompts: the webui's
    ``combine_denoised``, ``uncond + sum_i (cond_i - uncond) x (weight_i x cfg)`` (and the unconditional
    prediction beside it when ``with_uncond``). ``extra``: an inpainting model's extra channels (batch, 5, h, w),
    joined to the scaled latents of every call (after the scaling: diffusers' order)."""
    n = len(weights)
    if inputs["together"] is not None:
        x = scheduler.scale_model_input(torch.cat([latents] * (n + 1)), t)
        out = model.runner(_with_extra(x, extra, batch), t, *inputs["together"])
        uncond, cond = out[:batch], out[batch:]
    else:
        x = scheduler.scale_model_input(latents, t)
        cond = model.runner(_with_extra(torch.cat([x] * n) if n > 1 else x, extra, batch), t, *inputs["conds"])
        if inputs["unconds"] is None:
            return cond
        uncond = model.runner(_with_extra(x, extra, batch), t, *inputs["unconds"])
    pred = uncond
    for i, weight in enumerate(weights):
        pred = pred + (cond[i * batch:(i + 1) * batch] - uncond) * (weight * cfg)
    return (pred, uncond) if with_uncond else pred


def _with_extra(x: torch.Tensor, extra: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``x`` (a multiple of ``batch`` images) with ``extra``'s channels after its own, repeated to its length."""
    if extra is None:
        return x
    return torch.cat([x, extra.repeat(x.shape[0] // batch, 1, 1, 1)], dim=1)


def _unet_inputs(model, c: Conditioning, batch: int, width: int, height: int):
    embeds = c.embeds.to(device=model.device, dtype=model.dtype).repeat(batch, 1, 1)
    if not model.is_xl:
        return embeds, None
    pooled = c.pooled.to(device=model.device, dtype=model.dtype).repeat(batch, 1)
    return embeds, {"text_embeds": pooled, "time_ids": add_time_ids(width, height, batch, model.dtype, model.device)}


def _step_params(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


# -- the denoised estimate of a step (the step hook's, the image so far of an interrupted request) ----------------
def alpha_at(alphas_cumprod: torch.Tensor, t) -> float:
    """``alphas_cumprod`` at timestep ``t`` (a fractional one interpolated in log sigma, as the k-diffusion samplers
    map sigmas to timesteps)."""
    t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    a = alphas_cumprod.double().cpu()
    last = len(a) - 1
    t = min(max(t, 0.0), float(last))
    lo, hi = int(math.floor(t)), int(math.ceil(t))
    log_sigma = torch.log(((1 - a) / a) ** 0.5)
    value = log_sigma[lo] + (log_sigma[hi] - log_sigma[lo]) * (t - lo)
    return float(1.0 / (1.0 + math.exp(2.0 * float(value))))


def clean_estimate(x_t: torch.Tensor, prediction: torch.Tensor, alpha: float, kind: str = "epsilon") -> torch.Tensor:
    """x0 from the UNet's input ``x_t`` (DDPM space, ``sqrt(a) x0 + sqrt(1 - a) eps``) and its prediction
    (``epsilon``, ``v_prediction`` or ``sample``), in float32: diffusers' ``pred_original_sample``."""
    x_t, prediction = x_t.float(), prediction.float()
    if kind == "v_prediction":
        return alpha ** 0.5 * x_t - (1 - alpha) ** 0.5 * prediction
    if kind == "sample":
        return prediction
    return (x_t - (1 - alpha) ** 0.5 * prediction) / alpha ** 0.5


def denoised_estimate(model, scheduler, latents: torch.Tensor, t, prediction: torch.Tensor) -> torch.Tensor:
    """The clean latents a step's guided ``prediction`` points at (float32): the UNet's input at ``t`` (a
    k-diffusion sampler's scaled input is that very DDPM ``x_t``) through :func:`clean_estimate`."""
    x_t = scheduler.scale_model_input(latents, t)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        alphas = model.pipe.scheduler.alphas_cumprod
    config = scheduler.config if hasattr(scheduler, "config") else model.pipe.scheduler.config
    kind = getattr(config, "prediction_type", None) or config.get("prediction_type", "epsilon")
    return clean_estimate(x_t, prediction, alpha_at(alphas, t), kind)
