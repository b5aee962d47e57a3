"""Training a T2I-Adapter: diffusers' ``train_t2i_adapter_sdxl.py`` model on the one loop, SD and SDXL.

The adapter is a new ``T2IAdapter(in_channels=3, channels, num_res_blocks=2, downscale_factor,
adapter_type)``: ``--t2i-adapter-type`` (``full_adapter``, ``light_adapter``, ``full_adapter_xl``) and
``--t2i-channels`` (default: the UNet's block widths, laid out so that every feature map lands where the
UNet takes one, :func:`formats.fit_problem`). On an SDXL-shaped UNet (no cross-attention in the first
down block) a plain full adapter cannot fit, so the default ``full_adapter`` becomes ``full_adapter_xl``
there (pixel unshuffle 16, one more map for the mid block), as diffusers' SDXL script builds it. Per
batch the adapter runs on the conditioning images (pixels in [0, 1] at the bucket size) and its
features go into the UNet call as ``down_intrablock_additional_residuals``, at weight 1, like the
pipelines' default ``adapter_conditioning_scale``. The loss is the loop's (uniform timesteps, epsilon or
v MSE), not the example's cubic timesteps and x0 loss. Only the adapter trains.

Written as a diffusers ``T2IAdapter`` folder, or (OUT ending in ``.safetensors``) one file with the same
``adapter.*`` tensors, which ``formats`` reads back with the configuration derived from the shapes.
``sampling(pipe, image)`` attaches the adapter being trained as a loaded one is (``runtime.attach``).
"""
from __future__ import annotations

from adapterhub.errors import AdapterhubError
from adapterhub.control import ControlTrainable, check_out, control_metadata
from adapterhub.weights import architecture_of, component

from . import runtime
from .formats import CONFIG_KEYS, FULL, FULL_XL, LIGHT, fit_problem

RES_BLOCKS = 2  # diffusers' and TencentARC's full adapters


def default_channels(kind: str, widths: list[int]) -> list[int]:
    """Channels whose feature maps match a UNet with block widths ``widths`` (see ``formats.feature_maps``):
    one map per down block (full); one more for the SDXL mid block (full XL); the light adapter adds its
    own last map, so it takes one width fewer."""
    if kind == FULL_XL:
        return widths + widths[-1:]
    if kind == LIGHT:
        return widths[:-1]
    return widths


def adapter_config(unet_config, config, vae_scale: int) -> dict:
    """The ``T2IAdapter`` config for ``config``'s type and channels on this UNet, checked to fit it."""
    kind = config.t2i_adapter_type
    widths = list(unet_config.block_out_channels)
    chosen = list(config.t2i_channels)

    def build(kind: str) -> dict:
        return {"in_channels": 3, "channels": chosen or default_channels(kind, widths), "num_res_blocks": RES_BLOCKS,
                "downscale_factor": 2 * vae_scale if kind == FULL_XL else vae_scale, "adapter_type": kind}

    adapter = build(kind)
    problem = fit_problem(adapter, unet_config, vae_scale)
    if problem and kind == FULL and fit_problem(build(FULL_XL), unet_config, vae_scale) is None:
        adapter, problem = build(FULL_XL), None  # an SDXL-shaped UNet: the default means its XL layout
    if problem:
        raise AdapterhubError(f"--t2i-adapter-type {kind} with channels {adapter['channels']} does not fit this UNet "
                              f"(block widths {widths}): {problem}")
    return adapter


class T2IAdapterTrainable(ControlTrainable):
    """A ``T2IAdapter`` trained beside the frozen UNet (TencentARC's and the diffusers SDXL README's rate)."""

    type_name, architecture = "t2i_adapter", "t2i-adapter"
    attach = staticmethod(runtime.attach)

    @property
    def adapter(self):
        return self.model

    def model_config(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.model.config).items()
                if k in CONFIG_KEYS}

    def unet_kwargs(self, noisy, timesteps, hidden, added_cond_kwargs, cond) -> dict:
        if cond is None:
            raise AdapterhubError("t2i_adapter: the loop gave no conditioning images")
        features = self.model(cond.to(dtype=self.model.dtype))
        return {"down_intrablock_additional_residuals": list(features)}  # a new list: the UNet pops from it


def make_trainable(model, config) -> T2IAdapterTrainable:
    from diffusers import T2IAdapter

    check_out(config, "a T2I-Adapter")
    unet = component(model, "unet")
    if unet is None:
        raise AdapterhubError("t2i_adapter: the model has no UNet to build a T2I-Adapter for")
    vae_scale = int(getattr(model, "vae_scale_factor", None) or 8)
    adapter_cfg = adapter_config(unet.config, config, vae_scale)
    step = int(getattr(config, "bucket_step", 64))
    if step % adapter_cfg["downscale_factor"]:
        raise AdapterhubError(f"--bucket-step {step}: a {adapter_cfg['adapter_type']} unshuffles the image by "
                              f"{adapter_cfg['downscale_factor']}, so image sides must be multiples of it; use "
                              f"--bucket-step {max(64, adapter_cfg['downscale_factor'])}")
    param = next(unet.parameters())
    adapter = T2IAdapter(**adapter_cfg).to(param.device)  # float32, whatever the base
    adapter.requires_grad_(True).train()
    base = architecture_of(model)
    return T2IAdapterTrainable(adapter, base, control_metadata(config, base))
