"""ControlNet: diffusers ``ControlNetModel`` folders and original (lllyasviel) single-file checkpoints.

Not a weight delta: ``attach(adapter, pipe, weight, image=..., start=0.0, end=1.0)`` hooks the UNet
call so the ControlNet adds its residuals at every step (see ``runtime``); several attached at once
SUM, each with its own image, weight and guidance window, exactly like diffusers'
``MultiControlNetModel``. ``detach`` removes the hook and leaves the UNet as it was, bit for bit.
"""
from __future__ import annotations

from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.types import UNET_RESIDUALS, Adapter, Handle, ModuleBackedType

from . import formats  # light at the top: torch and diffusers are imported where a model is built


class ControlNetType(ModuleBackedType):
    name = "controlnet"
    impl = formats
    description = "ControlNet (diffusers folder, original .safetensors/.pth): residuals from a conditioning image"
    formats = (formats.DIFFUSERS, formats.LDM)
    capabilities = ("inspect", "attach", "save", "example", "train")
    example_suffix = ""
    weight_space = False
    unet_runtime = UNET_RESIDUALS  # a forward pre-hook on the UNet adds its residuals (``runtime``)
    convert_targets = ("diffusers", "a1111")

    def infotext_fields(self, adapter: Adapter, entry, prompt: str) -> list:
        """A ``ControlNet N`` unit as sd-webui-controlnet writes it; a shuffle-like network (its config's
        ``global_pool_conditions``) runs in guess mode, the extension's "ControlNet is more important"."""
        from adapterhub.infotext_fields import CONTROL_FIELD, control_unit

        guess = entry.options.get("guess_mode")
        guess = (adapter.extra.get("config") or {}).get("global_pool_conditions") if guess is None else guess
        return [(CONTROL_FIELD, None, control_unit(entry, adapter, guess))]

    def make_trainable(self, model, config):
        """``ControlNetModel.from_unet`` of the frozen UNet, trained on conditioning images; see ``train``."""
        from .train import make_trainable

        return make_trainable(model, config)

    def attach(self, adapter: Adapter, pipe, weight: float = 1.0, **options) -> Handle:
        from . import runtime

        return runtime.attach(adapter, pipe, weight, **options)

    def example_options(self, model) -> dict:
        from adapterhub.conditioning import example_condition_image

        return {"image": example_condition_image(model)}

    def merge_into(self, adapter: Adapter, pipe, weight: float = 1.0) -> None:
        raise AdapterError(adapter.path, "a ControlNet cannot be merged: it is a second network fed with a "
                                         "conditioning image at every step; attach it instead")


@hookimpl
def adapterhub_adapter_types():
    return [ControlNetType()]
