"""Attaching a ControlNet to a plain Stable Diffusion (XL) pipeline, step for step as diffusers'
``StableDiffusion[XL]ControlNetPipeline`` runs it.

On each UNet call the ControlNet gets the UNet's own ``sample``, ``timestep``,
``encoder_hidden_states`` and ``added_cond_kwargs`` and the conditioning image prepared like the
pipeline's ``prepare_image`` (``VaeImageProcessor`` without normalisation, resized to the generation
size, repeated over the batch and both guidance halves), with
``conditioning_scale = weight x keep(step)``. Its residuals go into the UNet call as
``down_block_additional_residuals`` / ``mid_block_additional_residual``.

Several ControlNets SUM their residuals, each with its own image, weight and start/end: exactly
``MultiControlNetModel`` with ``controlnet_conditioning_scale=[w1, w2, ...]``. ``guess_mode`` (default:
the model's ``global_pool_conditions``) runs the ControlNet on the conditional half only, as diffusers
does.
"""
from __future__ import annotations

import torch

from adapterhub.errors import AdapterError
from adapterhub.types import Adapter
from adapterhub.weights import architecture_of, component

from adapterhub.conditioning import IMAGE_HELP, ControlHandle, UNetControl, add_residuals, gate_from, on_device, \
    repeat_for_batch, weight_from
from .formats import load_model

OPTIONS = ("image", "start", "end", "guess_mode")
# what must agree between a ControlNet and the UNet it feeds, and how to say it
FIT = (("in_channels", "latent channels"), ("cross_attention_dim", "cross-attention width"),
       ("block_out_channels", "block widths"), ("layers_per_block", "layers per block"),
       ("addition_embed_type", "added conditioning"))


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_fits(adapter: Adapter, pipe, unet) -> None:
    """Raise (naming the file) unless the ControlNet's residuals have the UNet's shapes."""
    mine, theirs = adapter.extra["config"], unet.config
    fields = list(FIT)
    if mine.get("addition_embed_type") == "text_time":
        fields.append(("projection_class_embeddings_input_dim", "added-conditioning width"))
    for key, label in fields:
        a, b = _plain(mine.get(key)), _plain(getattr(theirs, key, None))
        if a != b:
            raise AdapterError(adapter.path, f"ControlNet for {adapter.base} does not fit this {architecture_of(pipe)} "
                                             f"model: {label} {a} here, {b} in the UNet")
    if len(mine["down_block_types"]) != len(theirs.down_block_types):
        raise AdapterError(adapter.path, f"ControlNet for {adapter.base} does not fit this {architecture_of(pipe)} "
                                         f"model: {len(mine['down_block_types'])} down blocks here, "
                                         f"{len(theirs.down_block_types)} in the UNet")


def image_processor(pipe):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=int(getattr(pipe, "vae_scale_factor", None) or 8),
                             do_convert_rgb=True, do_normalize=False)


def check_image(adapter: Adapter, processor, image) -> None:
    """The image must be one the pipeline takes, with the ControlNet's conditioning channels."""
    if image is None:
        raise AdapterError(adapter.path, f"a ControlNet needs a conditioning image: attach(..., image=...) "
                                         f"with {IMAGE_HELP}")
    try:
        probe = processor.preprocess(image, height=64, width=64)
    except Exception as exc:  # noqa: BLE001 - whatever the processor refuses is a bad image
        raise AdapterError(adapter.path, f"conditioning image not usable ({IMAGE_HELP}): "
                                         f"{str(exc).splitlines()[0][:200]}") from None
    channels = adapter.extra["config"]["conditioning_channels"]
    if probe.ndim != 4 or probe.shape[1] != channels:
        raise AdapterError(adapter.path, f"conditioning image has shape {list(probe.shape)} after preparation; "
                                         f"this ControlNet takes {channels} channels")


class ControlNetControl(UNetControl):
    """One attached ControlNet: model, image, weight, gate."""

    def __init__(self, pipe, unet, model, image, processor, weight: float, gate, guess_mode: bool):
        self.model, self.image, self.processor, self.guess_mode = model, image, processor, guess_mode
        self.prepared: dict[tuple[int, int], torch.Tensor] = {}
        super().__init__(pipe, unet, weight, gate)

    def condition(self, batch: int, size: tuple[int, int], cfg: bool, device, dtype) -> torch.Tensor:
        """The image as ``prepare_image`` makes it, prepared once per generation size."""
        if size not in self.prepared:
            self.prepared = {size: self.processor.preprocess(self.image, height=size[0], width=size[1])
                             .to(dtype=torch.float32)}
        return repeat_for_batch(self.prepared[size], batch, cfg).to(device=device, dtype=dtype)

    def residuals(self, call: dict, scale: float) -> None:
        sample, timestep = call["sample"], call["timestep"]
        context, added = call.get("encoder_hidden_states"), call.get("added_cond_kwargs")
        cfg = self.cfg()
        conditional_only = self.guess_mode and cfg
        if conditional_only:  # diffusers runs a guess-mode ControlNet on the conditional half only: the
            # latents as a tensor of their own, the text embeddings as a view (kernels can round differently
            # on a view that starts mid-buffer, so the memory layout is kept as the pipeline has it)
            sample, context = sample.chunk(2)[1].clone(), context.chunk(2)[1]
            if added:
                added = {k: v.chunk(2)[1] if isinstance(v, torch.Tensor) else v for k, v in added.items()}
        image = self.condition(sample.shape[0], self.image_size(sample), cfg and not conditional_only,
                               sample.device, self.model.dtype)
        down, mid = self.model(sample, timestep, encoder_hidden_states=context, controlnet_cond=image,
                               conditioning_scale=scale, guess_mode=self.guess_mode, added_cond_kwargs=added,
                               return_dict=False)
        if conditional_only:  # the unconditional half gets zeros, as in the pipeline
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        add_residuals(call, "down_block_additional_residuals", down)
        add_residuals(call, "mid_block_additional_residual", mid)


def attach(adapter: Adapter, pipe, weight: float = 1.0, image=None, start: float = 0.0, end: float = 1.0,
           guess_mode: bool | None = None, **unknown) -> ControlHandle:
    """Validate everything (options, image, fit, tensors), then add the one hook: all or nothing."""
    if unknown:
        raise AdapterError(adapter.path, f"unknown ControlNet option(s) {', '.join(sorted(unknown))} "
                                         f"(it takes {', '.join(OPTIONS)})")
    unet = component(pipe, "unet")
    if unet is None:
        raise AdapterError(adapter.path, "the model has no unet for a ControlNet to feed")
    weight, gate = weight_from(adapter.path, weight), gate_from(adapter.path, start, end)
    check_fits(adapter, pipe, unet)
    processor = image_processor(pipe)
    check_image(adapter, processor, image)
    model = on_device(load_model(adapter), unet)
    if guess_mode is None:
        guess_mode = bool(adapter.extra["config"].get("global_pool_conditions"))
    control = ControlNetControl(pipe, unet, model, image, processor, weight, gate, bool(guess_mode))
    return ControlHandle(control, "ControlNet")
