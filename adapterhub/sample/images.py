"""Images in and out of latent space: the VAE's decode and encode, the hires fix's upscale, the webui's resize.

The functions take the pipeline whose VAE they use (an fp16 VAE that asks for it runs in float32, as
diffusers does) and, where latents come out, the ``device`` and ``dtype`` the UNet takes them in.
"""
from __future__ import annotations

import torch

from adapterhub.sample.request import LATENT_UPSCALERS, hires_upscaler


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


def _vae(pipe):
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    return vae


def decode_tensor(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W), as the VAE decodes them."""
    vae = _vae(pipe)
    with torch.inference_mode():
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def decode(pipe, latents: torch.Tensor) -> list:
    """PIL images of ``latents``, as diffusers' pipeline post-processes them."""
    return pipe.image_processor.postprocess(decode_tensor(pipe, latents), output_type="pil")


def encode_image(pipe, image, device, dtype) -> torch.Tensor:
    """A PIL image as latents (1, C, H/8, W/8): pixels / 255 mapped to [-1, 1] (the webui's and diffusers'
    preprocessing), the VAE posterior's mean, times the scaling factor."""
    import numpy as np

    vae = _vae(pipe)
    pixels = torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
    with torch.inference_mode():
        z = vae.encode((pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    # contiguous: the VAE returns channels-last strides, and the UNet's kernels round by memory layout
    return (z * vae.config.scaling_factor).to(device=device, dtype=dtype).contiguous()


def upscale(pipe, latents: torch.Tensor, width: int, height: int, upscaler: str, device, dtype) -> torch.Tensor:
    """The hires fix's upscale to ``width`` x ``height`` (``sample_hr_pass``): a ``Latent …`` mode
    interpolates the latents; an image upscaler decodes them, makes 8-bit images as the webui does
    (``clamp((x + 1) / 2) x 255``, truncated), resizes them (:func:`resize_image`) and encodes them again (as
    ``device`` / ``dtype`` latents)."""
    import numpy as np
    from PIL import Image

    upscaler = hires_upscaler(upscaler)
    scale = pipe.vae_scale_factor
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        return torch.nn.functional.interpolate(latents, size=(height // scale, width // scale), mode=mode,
                                               antialias=antialias)
    decoded = torch.clamp((decode_tensor(pipe, latents).float() + 1.0) / 2.0, min=0.0, max=1.0)
    out = []
    for x in decoded:
        pixels = (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
        out.append(encode_image(pipe, resize_image(Image.fromarray(pixels), width, height, upscaler), device, dtype))
    return torch.cat(out)
