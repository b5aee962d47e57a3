"""T2I-Adapter: diffusers ``T2IAdapter`` folders / safetensors and TencentARC's original ``.pth`` files.

Not a weight delta: ``attach(adapter, pipe, weight, image=..., start=0.0, end=1.0)`` hooks the UNet call
so the adapter's features (computed once per generation size) are added inside the down blocks at every
step (see ``runtime``). Several attached at once SUM, ``sum_i w_i x F_i``: diffusers' ``MultiAdapter``
with ``adapter_conditioning_scale=[w_1, ...]``; its default weights average, i.e. ``w_i = 1/N`` here.
"""
from __future__ import annotations

from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.types import UNET_RESIDUALS, Adapter, Handle, ModuleBackedType, TrainOption

from . import formats  # light at the top: torch and diffusers are imported where a model is built


class T2IAdapterType(ModuleBackedType):
    name = "t2i_adapter"
    impl = formats
    description = "T2I-Adapter (diffusers folder, TencentARC .pth): image features added inside the UNet"
    formats = (formats.DIFFUSERS, formats.TENCENTARC)
    capabilities = ("inspect", "attach", "save", "example", "train")
    example_suffix = ""
    weight_space = False
    unet_runtime = UNET_RESIDUALS  # a forward pre-hook on the UNet adds its residuals (``runtime``)
    convert_targets = ("diffusers", "a1111")
    train_options = (  # the diffusers ``T2IAdapter`` trained (see ``train``)
        TrainOption("t2i_channels", tuple[int, ...], (), "T2I-Adapter channels (default: the UNet's block widths)"),
        TrainOption("t2i_adapter_type", str, "full_adapter", "T2I-Adapter architecture",
                    choices=("full_adapter", "light_adapter", "full_adapter_xl")),
    )

    def infotext_fields(self, adapter: Adapter, entry, prompt: str) -> list:
        """A ``ControlNet N`` unit as sd-webui-controlnet writes its T2I-Adapter units."""
        from adapterhub.infotext_fields import CONTROL_FIELD, control_unit

        return [(CONTROL_FIELD, None, control_unit(entry, adapter))]

    def make_trainable(self, model, config):
        """a new ``T2IAdapter`` shaped for the UNet (``config.t2i_*``), trained on conditioning images; see ``train``."""
        from .train import make_trainable

        return make_trainable(model, config)

    def attach(self, adapter: Adapter, pipe, weight: float = 1.0, **options) -> Handle:
        from . import runtime

        return runtime.attach(adapter, pipe, weight, **options)

    def example_options(self, model) -> dict:
        from adapterhub.conditioning import example_condition_image

        return {"image": example_condition_image(model)}

    def merge_into(self, adapter: Adapter, pipe, weight: float = 1.0) -> None:
        raise AdapterError(adapter.path, "a T2I-Adapter cannot be merged: its features come from a conditioning "
                                         "image at run time; attach it instead")


@hookimpl
def adapterhub_adapter_types():
    return [T2IAdapterType()]
