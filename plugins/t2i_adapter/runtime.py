"""Attaching a T2I-Adapter to a plain Stable Diffusion (XL) pipeline, as diffusers'
``StableDiffusion[XL]AdapterPipeline`` runs it.

The adapter runs once per generation size on the conditioning image (prepared like the pipeline's
``_preprocess_adapter_image``: resized with Lanczos, scaled to [0, 1], not normalised); each UNet call
then gets ``features x weight``, repeated over the batch and both guidance halves, as
``down_intrablock_additional_residuals``.

Several adapters SUM: ``sum_i w_i x F_i``, each with its own image. That is diffusers' ``MultiAdapter``
with ``adapter_conditioning_scale=[w_1, w_2, ...]`` (the pipeline passes that list as the
``MultiAdapter`` weights). ``MultiAdapter``'s own default weights average (``1/N`` each): to reproduce
that, attach each with ``weight = 1/N``. A single adapter at weight ``w`` is the pipeline's
``adapter_conditioning_scale=w``, so weights mean the same with one adapter or many, and the same as
ControlNet weights. ``start``/``end`` gate by step with the ControlNet rule; ``end=f`` is exactly the
SDXL pipeline's ``adapter_conditioning_factor=f`` (``i < int(T x f)``).
"""
from __future__ import annotations

import numpy as np
import torch

from adapterhub.errors import AdapterError
from adapterhub.types import Adapter
from adapterhub.weights import architecture_of, component
from adapterhub.conditioning import IMAGE_HELP, ControlHandle, UNetControl, add_residuals, \
    gate_from, on_device, repeat_for_batch, weight_from

from .formats import fit_problem, load_model

OPTIONS = ("image", "start", "end")


def adapter_image(image, height: int, width: int) -> torch.Tensor:
    """diffusers' ``_preprocess_adapter_image``: PIL images resized (Lanczos) to the generation size,
    [0, 1], NCHW; tensors as given (a 3-D tensor gets a batch dimension; one of another size is
    resized bilinearly, where diffusers would fail); HWC numpy arrays (uint8, or floats in [0, 1])."""
    import PIL.Image

    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        image = [image]
    if not isinstance(image, (list, tuple)) or not image:
        raise TypeError(f"expected {IMAGE_HELP}, got {type(image).__name__}")
    if isinstance(image[0], PIL.Image.Image):
        arrays = [np.array(i.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)) for i in image]
        arrays = [a[None, ..., None] if a.ndim == 2 else a[None, ...] for a in arrays]
        batch = np.concatenate(arrays, axis=0).astype(np.float32) / 255.0
        return torch.from_numpy(batch.transpose(0, 3, 1, 2))
    if isinstance(image[0], np.ndarray):
        arrays = [a[None, ..., None] if a.ndim == 2 else (a[None, ...] if a.ndim == 3 else a) for a in image]
        batch = np.concatenate(arrays, axis=0)
        batch = batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch.astype(np.float32)
        return adapter_image(torch.from_numpy(batch.transpose(0, 3, 1, 2)), height, width)
    if isinstance(image[0], torch.Tensor):
        batch = torch.cat([t[None] if t.ndim == 3 else t for t in image], dim=0)
        if batch.ndim != 4:
            raise TypeError(f"image tensors must have 3 or 4 dimensions, got {image[0].ndim}")
        if tuple(batch.shape[-2:]) != (height, width):
            batch = torch.nn.functional.interpolate(batch.float(), size=(height, width), mode="bilinear",
                                                    align_corners=False)
        return batch
    raise TypeError(f"expected {IMAGE_HELP}, got a list of {type(image[0]).__name__}")


def check_image(adapter: Adapter, image) -> None:
    if image is None:
        raise AdapterError(adapter.path, f"a T2I-Adapter needs a conditioning image: attach(..., image=...) "
                                         f"with {IMAGE_HELP}")
    try:
        probe = adapter_image(image, 64, 64)
    except (TypeError, ValueError) as exc:
        raise AdapterError(adapter.path, f"conditioning image not usable: {exc}") from None
    channels = adapter.extra["config"]["in_channels"]
    if probe.shape[1] != channels:
        raise AdapterError(adapter.path, f"conditioning image has {probe.shape[1]} channels; this T2I-Adapter takes "
                                         f"{channels}" + (" (give a grayscale image)" if channels == 1 else ""))


class AdapterControl(UNetControl):
    """One attached T2I-Adapter: model, image, weight, gate, and its features per generation size."""

    def __init__(self, pipe, unet, model, image, weight: float, gate):
        self.model, self.image = model, image
        self.cached: dict[tuple[int, int], list[torch.Tensor]] = {}
        super().__init__(pipe, unet, weight, gate)

    def features(self, size: tuple[int, int], device) -> list[torch.Tensor]:
        if size not in self.cached:
            image = adapter_image(self.image, *size).to(device=device, dtype=self.model.dtype)
            self.cached = {size: self.model(image)}
        return self.cached[size]

    def residuals(self, call: dict, scale: float) -> None:
        sample = call["sample"]
        cfg = self.cfg()
        state = [repeat_for_batch(f * scale, sample.shape[0], cfg)
                 for f in self.features(self.image_size(sample), sample.device)]
        add_residuals(call, "down_intrablock_additional_residuals", state)


def attach(adapter: Adapter, pipe, weight: float = 1.0, image=None, start: float = 0.0, end: float = 1.0,
           **unknown) -> ControlHandle:
    """Validate everything (options, image, fit, tensors), then add the one hook: all or nothing."""
    if unknown:
        raise AdapterError(adapter.path, f"unknown T2I-Adapter option(s) {', '.join(sorted(unknown))} "
                                         f"(it takes {', '.join(OPTIONS)})")
    unet = component(pipe, "unet")
    if unet is None:
        raise AdapterError(adapter.path, "the model has no unet for a T2I-Adapter to feed")
    weight, gate = weight_from(adapter.path, weight), gate_from(adapter.path, start, end)
    problem = fit_problem(adapter.extra["config"], unet.config, int(getattr(pipe, "vae_scale_factor", None) or 8))
    if problem:
        raise AdapterError(adapter.path, f"T2I-Adapter for {adapter.base} does not fit this {architecture_of(pipe)} "
                                         f"model: {problem}")
    check_image(adapter, image)
    model = on_device(load_model(adapter), unet)
    return ControlHandle(AdapterControl(pipe, unet, model, image, weight, gate), "T2I-Adapter")
