"""Images in and out of latent space: the VAE's decode and encode, the hires fix's upscale, the webui's resize,
and inpainting's masks (:func:`prepare_mask`, :func:`latent_mask`, :func:`paste_back`: the webui's steps).

The functions take the pipeline whose VAE they use (an fp16 VAE that asks for it runs in float32, as
diffusers does) and, where latents come out, the ``device`` and ``dtype`` the UNet takes them in.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

    pixels = torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
    return encode_tensor(pipe, pixels * 2.0 - 1.0, device, dtype)


def encode_tensor(pipe, pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W), as latents (B, C, H/8, W/8): the VAE posterior's mean, times the scaling
    factor."""
    vae = _vae(pipe)
    with torch.inference_mode():
        z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    # contiguous: the VAE returns channels-last strides, and the UNet's kernels round by memory layout
    return (z * vae.config.scaling_factor).to(device=device, dtype=dtype).contiguous()


def inpainting_conditioning(pipe, width: int, height: int, device, dtype, image=None, mask=None,
                            weight: float = 1.0) -> torch.Tensor:
    """The extra input channels of an inpainting model (a UNet of 9 input channels), (1, 5, H/8, W/8): the mask on
    the latent grid, then the latents of the masked image.

    ``image`` (RGB, ``width`` x ``height``) and ``mask`` (L, white repaints): the mask rounded to 0 or 1 (the
    webui's default "mask_round"; diffusers binarises it the same way), the masked image ``image x (1 - weight x
    mask)`` (``weight``: the webui's inpainting conditioning mask strength; at 1 diffusers'
    ``image x (mask < 0.5)``), the mask downsampled nearest (diffusers' and the webui's ``interpolate``). No mask
    (img2img without one, the hires pass): all ones. No image (txt2img): a mid-grey one (all zeros in [-1, 1]),
    as the webui's ``txt2img_image_conditioning``; with ``weight`` 1 the img2img image is masked to the same."""
    import numpy as np

    if mask is None and weight == 1.0:  # the whole image hidden: exactly the mid-grey one
        image = None
    if image is None:
        pixels = torch.zeros(1, 3, height, width)
    else:
        pixels = torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32).transpose(2, 0, 1)[None])
        pixels = pixels / 255.0 * 2.0 - 1.0
    if mask is None:
        full = torch.ones(1, 1, height, width)
    else:
        full = torch.round(torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0))[None, None]
    masked = encode_tensor(pipe, pixels * (1.0 - weight * full) if image is not None else pixels, device, dtype)
    small = torch.nn.functional.interpolate(full, size=masked.shape[-2:])
    return torch.cat([small.to(device=device, dtype=dtype), masked], dim=1)


def upscale(pipe, latents: torch.Tensor, width: int, height: int, upscaler: str, device, dtype,
            decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
            encode: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The hires fix's upscale to ``width`` x ``height`` (``sample_hr_pass``): a ``Latent …`` mode
    interpolates the latents; an image upscaler decodes them, makes 8-bit images as the webui does
    (``clamp((x + 1) / 2) x 255``, truncated), resizes them (:func:`resize_image`) and encodes them again (as
    ``device`` / ``dtype`` latents). ``decode`` (latents -> images in [-1, 1]) and ``encode`` (a PIL image ->
    latents) default to :func:`decode_tensor` and :func:`encode_image`; the transformer families pass their
    own (their VAE's shift)."""
    import numpy as np
    from PIL import Image

    decode = decode or (lambda z: decode_tensor(pipe, z))
    encode = encode or (lambda image: encode_image(pipe, image, device, dtype))

    upscaler = hires_upscaler(upscaler)
    scale = pipe.vae_scale_factor
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        return torch.nn.functional.interpolate(latents, size=(height // scale, width // scale), mode=mode,
                                               antialias=antialias)
    decoded = torch.clamp((decode(latents).float() + 1.0) / 2.0, min=0.0, max=1.0)
    out = []
    for x in decoded:
        pixels = (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
        out.append(encode(resize_image(Image.fromarray(pixels), width, height, upscaler)))
    return torch.cat(out)


# -- inpainting: the mask, the masked area's start and the paste back ---------------------------------------------
@dataclass
class PreparedMask:
    """An inpainting request's images at the size it is sampled at: ``init`` (RGB, the masked area filled as asked)
    and ``mask`` (L, white repaints: drives the latent mask); ``original`` and ``overlay`` (L) make the final image
    (the webui's overlay: the original's pixels where the overlay is black); ``crop``: the region of the original
    sampled, for "only masked" (None: the whole image)."""

    init: Any
    mask: Any
    original: Any
    overlay: Any
    crop: tuple[int, int, int, int] | None = None


def binary_mask(image):
    """The webui's mask: a transparent image's alpha channel (else its grey levels), white above 128, else black."""
    if image.mode in ("RGBA", "LA", "PA") and image.getextrema()[-1] != (255, 255):
        grey = image.getchannel("A")
    else:
        grey = image.convert("L")
    return grey.point(lambda v: 255 if v > 128 else 0)


def _gaussian(sigma: float):
    """The webui's blur kernel (cv2's ``GaussianBlur`` with size 2 x int(2.5 sigma + 0.5) + 1), normalised."""
    import numpy as np

    half = int(2.5 * sigma + 0.5)
    x = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def blur_mask(mask, blur_x: float, blur_y: float):
    """``mask`` (L) blurred along x then y by Gaussians of sigma ``blur_x`` / ``blur_y`` (0: not along that axis),
    the edges mirrored without repeating the edge pixel (cv2's default border), rounded back to 8 bits."""
    import numpy as np
    from PIL import Image

    values = np.asarray(mask, dtype=np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma <= 0:
            continue
        kernel = _gaussian(sigma)
        half = len(kernel) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = np.pad(values, pad, mode="reflect")  # cv2's BORDER_REFLECT_101, repeated on short lines too
        values = sum(kernel[k] * np.take(padded, range(k, k + values.shape[axis]), axis=axis)
                     for k in range(len(kernel)))
        values = np.clip(np.floor(values + 0.5), 0, 255)  # 8 bits between the passes, as cv2 keeps the image
    return Image.fromarray(values.astype(np.uint8), "L")


def crop_region(mask, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box "only masked" samples (the webui's crop region): the masked pixels' bounding box grown by
    ``padding`` inside the image, then grown along one axis to the aspect ratio of ``width`` x ``height`` (kept
    inside the image, shifted inwards where it would leave it). An empty mask gives the whole image."""
    box = mask.getbbox()
    if box is None:
        return 0, 0, mask.width, mask.height
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, mask.width), min(box[3] + padding, mask.height)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, (x2 - x1) * height / width, mask.height)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * width / height, mask.width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, wanted: float, limit: int) -> tuple[int, int]:
    """``[lo, hi)`` grown evenly to about ``wanted`` long, shifted back inside ``[0, limit)``, clamped."""
    extra = int(wanted - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fill_masked(image, mask):
    """The webui's "fill" start: the masked area painted with the colours around it, from blurs of the unmasked
    pixels (premultiplied by their coverage) at shrinking radii laid over one another."""
    from PIL import Image, ImageFilter, ImageOps

    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def prepare_mask(mask, width: int, height: int, blur: int = 4, invert: bool = False, full_res: bool = False,
                 padding: int = 32, init=None, fill: int = 1, blur_y: int | None = None) -> PreparedMask:
    """An inpainting request's images (:class:`PreparedMask`), the webui's steps in its order: the mask made binary
    (:func:`binary_mask`), inverted if asked, blurred (:func:`blur_mask`); then either resized to ``width`` x
    ``height`` ("Just resize", the overlay being that mask doubled, so the blurred edge keeps some original), or
    ("only masked", ``full_res``) the region :func:`crop_region` finds cut from the init image and the mask, resized
    to the size, the overlay the blurred mask itself. ``init`` (default: black) is resized or cut the same way;
    ``fill`` 0 fills its masked area (:func:`fill_masked`). ``blur`` is the sigma along x, and along y unless
    ``blur_y`` is given."""
    import numpy as np
    from PIL import Image, ImageOps

    init = init if init is not None else Image.new("RGB", mask.size)
    mask = binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    blur_y = blur if blur_y is None else blur_y
    if blur > 0 or blur_y > 0:
        mask = blur_mask(mask, blur, blur_y)
    lanczos = Image.Resampling.LANCZOS
    crop = None
    if full_res:
        if mask.size != init.size:  # another size: the mask is taken as covering the whole init image
            mask = mask.resize(init.size, resample=lanczos)
        crop = crop_region(mask, padding, width, height)
        original, overlay = init, mask
        mask, init = mask.crop(crop).resize((width, height), lanczos), init.crop(crop).resize((width, height), lanczos)
    else:
        mask = mask.resize((width, height), resample=lanczos)
        original = init = resize_image(init, width, height)
        overlay = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8), "L")
    if fill == 0:
        init = fill_masked(init, mask)
    return PreparedMask(init, mask, original, overlay, crop)


def latent_mask(mask, width: int, height: int) -> torch.Tensor:
    """The mask on the latent grid, (1, 1, H, W) float32, 1 repaints: the webui's bicubic resize of the mask,
    rounded to 0 or 1."""
    import numpy as np
    from PIL import Image

    small = mask.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
    values = np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255.0)
    return torch.from_numpy(values)[None, None]


def paste_back(image, prepared: PreparedMask):
    """A generated image laid under the overlay: the original's pixels where the overlay is black, the generated
    ones where it is white, blended between; "only masked" first scales it to its region and places it there."""
    from PIL import ImageOps

    base = prepared.original.convert("RGB").copy()
    if prepared.crop is not None:
        x1, y1, x2, y2 = prepared.crop
        base.paste(image.resize((x2 - x1, y2 - y1), resample=_lanczos()), (x1, y1))
    else:
        base = image.convert("RGB")
    top = prepared.original.convert("RGBA")
    top.putalpha(ImageOps.invert(prepared.overlay))
    out = base.convert("RGBA")
    out.alpha_composite(top)
    return out.convert("RGB")


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS


def prepare_inpaint(req) -> PreparedMask | None:
    """A normalized request's :class:`PreparedMask` (None without a mask)."""
    if req.mask is None:
        return None
    return prepare_mask(req.mask, req.width, req.height, req.mask_blur, req.inpainting_mask_invert,
                        req.inpaint_full_res, req.inpaint_full_res_padding, req.init_image, req.inpainting_fill,
                        getattr(req, "mask_blur_y", None))


def with_img2img_fields(fields: dict, req, inpainting_model: bool = False) -> dict:
    """The infotext ``fields`` with what the webui records of an img2img pass's mask (``Mask blur``; "only
    masked": ``Inpaint area``, ``Masked area padding``) and noise multiplier (``Noise multiplier``, when not 1),
    placed before ``Version``; on an ``inpainting_model`` (any pass) ``Conditional mask weight`` too."""
    from adapterhub.sample.infotext import number

    if inpainting_model:  # the webui's float (1.0); the infotext's key order puts it after Denoising strength
        fields = {**fields, "Conditional mask weight": str(float(req.inpainting_mask_weight))}

    extra: dict = {}
    if req.mask is not None:
        blur_y = getattr(req, "mask_blur_y", None)
        if blur_y is None or int(blur_y) == int(req.mask_blur):  # the webui writes it only for one blur of both axes
            extra["Mask blur"] = req.mask_blur
        if req.inpaint_full_res:
            extra.update({"Inpaint area": "Only masked", "Masked area padding": req.inpaint_full_res_padding})
    if req.init_image is not None and float(req.initial_noise_multiplier) != 1.0:
        extra["Noise multiplier"] = number(req.initial_noise_multiplier)
    if not extra:
        return fields
    version = {"Version": fields.pop("Version")} if "Version" in fields else {}
    return {**fields, **extra, **version}
