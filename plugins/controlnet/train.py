"""Training a ControlNet: diffusers' ``train_controlnet.py`` / ``train_controlnet_sdxl.py`` recipe on the one loop.

The ControlNet is ``ControlNetModel.from_unet`` of the frozen UNet: its encoder and mid block start as
copies of the UNet's, its conditioning embedding is new and its zero convolutions are zero, so before
the first step the UNet's prediction is exactly the base's. Per batch the loop hands over the
conditioning images (pixels in [0, 1] at the bucket size, ``adapterhub.train.control``); the ControlNet
runs on the UNet's own noisy latents, timesteps, text embeddings and (SDXL) added conditioning, and its
residuals go into the UNet call as ``down_block_additional_residuals`` / ``mid_block_additional_residual``,
as in the diffusers examples. Only the ControlNet trains.

Written as a diffusers ``ControlNetModel`` folder, or (OUT ending in ``.safetensors``) as one file with
the same diffusers-named tensors, the layout ``formats`` reads back (its configuration derived from the
shapes and the ``adapterhub.base`` metadata; ComfyUI and the webui's ControlNet extension convert it on
load). ``sampling(pipe, image)`` attaches the ControlNet being trained exactly as a loaded one is
attached (``runtime.attach``), for the loop's validation images.
"""
from __future__ import annotations

from adapterhub.errors import AdapterhubError
from adapterhub.control import ControlTrainable, check_out, control_metadata
from adapterhub.weights import architecture_of, component

from . import runtime


class ControlNetTrainable(ControlTrainable):
    """A ``ControlNetModel`` trained beside the frozen UNet."""

    type_name, architecture = "controlnet", "controlnet"
    attach = staticmethod(runtime.attach)

    @property
    def controlnet(self):
        return self.model

    def model_config(self) -> dict:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    def unet_kwargs(self, noisy, timesteps, hidden, added_cond_kwargs, cond) -> dict:
        if cond is None:
            raise AdapterhubError("controlnet: the loop gave no conditioning images")
        down, mid = self.model(noisy, timesteps, encoder_hidden_states=hidden,
                               controlnet_cond=cond.to(dtype=self.model.dtype),
                               added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


def make_trainable(model, config) -> ControlNetTrainable:
    from diffusers import ControlNetModel

    check_out(config, "a ControlNet")
    unet = component(model, "unet")
    if unet is None:
        raise AdapterhubError("controlnet: the model has no UNet to build a ControlNet from")
    param = next(unet.parameters())
    controlnet = ControlNetModel.from_unet(unet).to(param.device)  # float32: built, then loaded from the UNet
    controlnet.requires_grad_(True).train()
    if getattr(config, "gradient_checkpointing", False):
        controlnet.enable_gradient_checkpointing()
    base = architecture_of(model)
    return ControlNetTrainable(controlnet, base, control_metadata(config, base))
