"""Third-party adapter types, written exactly as a built-in one, against the public contract only.

``scale-diff``: a weight delta. Files are safetensors with keys ``<module path>.scale_diff`` (a full weight
difference) and the metadata ``format = scale-diff``; merging adds ``weight x diff``.

``residual-shift``: not a weight delta. A per-channel shift added to every UNet skip residual and to the mid
block's output, times the weight, through a forward pre-hook on the UNet (``adapterhub.conditioning``); it
declares ``unet_runtime = UNET_RESIDUALS``, so the compiled backend feeds its residuals to the graph. Files are
safetensors with keys ``residual_shift.down.<i>`` (one per skip residual) and ``residual_shift.mid``, metadata
``format = residual-shift``.
"""
from pathlib import Path

import torch

from adapterhub.conditioning import ControlHandle, Gate, UNetControl, add_residuals
from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.io import save_safetensors
from adapterhub.keymaps import canonical
from adapterhub.types import UNET_RESIDUALS, Adapter, AdapterType, Patch, Sniff, TrainOption
from adapterhub.weights import component

SUFFIX = ".scale_diff"
SHIFT = "residual_shift"


class DiffPatch(Patch):
    def expected_shape(self):
        return tuple(self.tensors["diff"].shape)

    def delta(self, weight):
        return self.tensors["diff"].to(device=weight.device, dtype=torch.float32).clone()


class ScaleDiffType(AdapterType):
    name = "scale-diff"
    description = "Example third-party type: full weight differences"
    formats = ("scale-diff",)
    capabilities = ("inspect", "merge", "attach", "example")
    weight_space = True

    def sniff(self, file):
        if file.metadata.get("format") == "scale-diff" and all(k.endswith(SUFFIX) for k in file.keys):
            return Sniff(1.0, "scale-diff")
        return None

    def parse(self, file, sniff):
        patches = {}
        for key, tensor in file.tensors().items():
            module = key[: -len(SUFFIX)]
            target = canonical(module)
            patches[target] = DiffPatch(target, module, {"diff": tensor})
        return Adapter(type=self.name, format="scale-diff", patches=patches, metadata=file.metadata, path=file.path)

    def example(self, model, path, seed=0, **options):
        gen = torch.Generator().manual_seed(seed)
        layer = component(model, "unet").conv_in
        tensors = {f"unet.conv_in{SUFFIX}": torch.randn(layer.weight.shape, generator=gen) * 0.01}
        return save_safetensors(tensors, Path(path), {"format": "scale-diff"})


# --------------------------------------------------------------------------------------------
# residual-shift: a UNet-residual type
# --------------------------------------------------------------------------------------------
def residual_channels(unet) -> tuple[list[int], int]:
    """The channels of the UNet's skip residuals (diffusers' ``down_block_res_samples``, in order) and of its
    mid block's output."""
    down = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        down += [resnet.out_channels for resnet in block.resnets]
        down += [sampler.out_channels for sampler in block.downsamplers or []]
    return down, unet.mid_block.resnets[-1].out_channels


class ShiftControl(UNetControl):
    """Adds ``scale x shift`` (broadcast over batch and pixels) to each skip residual and the mid block."""

    def __init__(self, pipe, unet, weight, down, mid):
        param = next(unet.parameters())
        self.down = [t.to(device=param.device, dtype=param.dtype).reshape(1, -1, 1, 1) for t in down]
        self.mid = mid.to(device=param.device, dtype=param.dtype).reshape(1, -1, 1, 1)
        super().__init__(pipe, unet, weight, Gate())

    def residuals(self, call, scale):
        add_residuals(call, "down_block_additional_residuals", [t * scale for t in self.down])
        add_residuals(call, "mid_block_additional_residual", self.mid * scale)


class ResidualShiftType(AdapterType):
    name = "residual-shift"
    description = "Example third-party type: per-channel shifts of the UNet's skip residuals (attached)"
    formats = ("residual-shift",)
    capabilities = ("inspect", "attach", "save", "example")
    unet_runtime = UNET_RESIDUALS
    # its own training option: ``adapterhub train --shift-init``, ``shift_init`` under ``[residual-shift]`` in a
    # config file, ``config.shift_init`` in ``make_trainable``
    train_options = (TrainOption("shift_init", float, 0.0, "residual-shift: standard deviation of the starting "
                                                           "shifts (0: start from none)", minimum=0.0),)

    def sniff(self, file):
        if file.metadata.get("format") == "residual-shift" and file.keys and \
                all(k.startswith(SHIFT + ".") for k in file.keys):
            return Sniff(1.0, "residual-shift")
        return None

    def parse(self, file, sniff):
        tensors = file.tensors()
        count = sum(k.startswith(f"{SHIFT}.down.") for k in tensors)
        try:
            down = [tensors[f"{SHIFT}.down.{i}"] for i in range(count)]
            mid = tensors[f"{SHIFT}.mid"]
        except KeyError as missing:
            raise AdapterError(file.path, f"residual-shift: missing tensor {missing.args[0]}") from None
        if any(t.dim() != 1 for t in [*down, mid]):
            raise AdapterError(file.path, "residual-shift: every shift must be a vector of channels")
        return Adapter(type=self.name, format="residual-shift", patches={}, metadata=dict(file.metadata),
                       path=file.path, file=file, extra={"down": down, "mid": mid})

    def info(self, adapter):
        return {"residuals": len(adapter.extra["down"]) + 1, "mid_channels": int(adapter.extra["mid"].shape[0])}

    def save(self, adapter, path, format):
        if format not in (None, "residual-shift"):
            raise AdapterError(path, f"residual-shift: no {format} layout")
        tensors = {f"{SHIFT}.down.{i}": t for i, t in enumerate(adapter.extra["down"])}
        tensors[f"{SHIFT}.mid"] = adapter.extra["mid"]
        return save_safetensors(tensors, Path(path), {**adapter.metadata, "format": "residual-shift"})

    def example(self, model, path, seed=0, **options):
        gen = torch.Generator().manual_seed(seed)
        down, mid = residual_channels(component(model, "unet"))
        tensors = {f"{SHIFT}.down.{i}": torch.randn(c, generator=gen) * 0.05 for i, c in enumerate(down)}
        tensors[f"{SHIFT}.mid"] = torch.randn(mid, generator=gen) * 0.05
        return save_safetensors(tensors, Path(path), {"format": "residual-shift"})

    def attach(self, adapter, pipe, weight=1.0, **options):
        if options:
            raise AdapterError(adapter.path, f"residual-shift: attach takes no options ({', '.join(options)})")
        unet = component(pipe, "unet")
        if unet is None:
            raise AdapterError(adapter.path, "residual-shift: the model has no unet")
        down, mid = residual_channels(unet)
        have = [int(t.shape[0]) for t in adapter.extra["down"]], int(adapter.extra["mid"].shape[0])
        if have != (down, mid):
            raise AdapterError(adapter.path, f"residual-shift: shifts for channels {have}, the UNet has {(down, mid)}")
        return ControlHandle(ShiftControl(pipe, unet, weight, adapter.extra["down"], adapter.extra["mid"]),
                             "residual-shift")


@hookimpl
def adapterhub_adapter_types():
    return [ScaleDiffType(), ResidualShiftType()]
