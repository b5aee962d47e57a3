"""Third-party adapter types, written exactly as a built-in one, against the public contract only.

``scale-diff``: a weight delta. Files are safetensors with keys ``<module path>.scale_diff`` (a full weight
difference) and the metadata ``format = scale-diff``; merging adds ``weight x diff``. Its ``kohya`` layout names
the modules as sd-scripts does (``lora_unet_conv_in.scale_diff``): ``adapterhub convert --to kohya``. It trains
the difference of two UNet modules (``TRAIN_TARGETS``) through a parametrization, is sampled by the compiled
backend as every weight delta is, and lists itself in the infotext as ``Scale-diff hashes: name: sha256[:12]``.

``residual-shift``: not a weight delta. A per-channel shift added to every UNet skip residual and to the mid
block's output, times the weight, through a forward pre-hook on the UNet (``adapterhub.conditioning``); it
declares ``unet_runtime = UNET_RESIDUALS``, so the compiled backend feeds its residuals to the graph. Files are
safetensors with keys ``residual_shift.down.<i>`` (one per skip residual) and ``residual_shift.mid``, metadata
``format = residual-shift``. It trains its shifts as extra UNet inputs (``Trainable.unet_kwargs``), starting from
``--shift-init`` (its own training option), writes an infotext unit per entry (``Residual shift 0: name w``), and
a prompt loads it with its own tag, ``<shift:NAME:w>``.
"""
import hashlib
from functools import partial
from pathlib import Path

import torch

from adapterhub.conditioning import ControlHandle, Gate, UNetControl, add_residuals
from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.io import save_safetensors
from adapterhub.keymaps import canonical, kohya_arch, kohya_name
from adapterhub.types import UNET_RESIDUALS, Adapter, AdapterType, Patch, PromptTag, Sniff, Trainable, TrainOption
from adapterhub.weights import component

SUFFIX = ".scale_diff"
SHIFT = "residual_shift"
KOHYA_PREFIX = "lora_"  # kohya module names: lora_unet_…, lora_te_…
TRAIN_TARGETS = ("unet.conv_in", "unet.time_embedding.linear_1")  # what scale-diff trains: a 3x3 conv, a Linear


def file_hash(path) -> str:
    """The first 12 hex digits of the file's sha256: what ``Scale-diff hashes`` lists."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


class DiffPatch(Patch):
    def expected_shape(self):
        return tuple(self.tensors["diff"].shape)

    def delta(self, weight):
        return self.tensors["diff"].to(device=weight.device, dtype=torch.float32).clone()


class AddDiff(torch.nn.Module):
    """A parametrization of a frozen weight: the weight plus a trained difference, zero at the start (the model
    is the base's until the first step)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros(weight.shape, device=weight.device))

    def forward(self, weight):
        return weight + self.diff.to(weight.dtype)


class DiffTrainable(Trainable):
    """The weight differences of ``TRAIN_TARGETS`` (canonical path -> :class:`AddDiff`), written as a
    ``scale-diff`` file."""

    def __init__(self, diffs: dict[str, AddDiff]):
        super().__init__([{"name": "unet", "params": [d.diff for d in diffs.values()]}])
        self.diffs = diffs

    def save(self, path, metadata):
        tensors = {f"{target}{SUFFIX}": d.diff.detach().to(self.save_dtype).cpu().contiguous()
                   for target, d in self.diffs.items()}
        return save_safetensors(tensors, Path(path), {**metadata, "format": "scale-diff"})


class ScaleDiffType(AdapterType):
    name = "scale-diff"
    description = "Example third-party type: full weight differences"
    formats = ("scale-diff", "kohya")
    capabilities = ("inspect", "merge", "attach", "save", "example", "train")
    weight_space = True  # so merged, attached and run by the compiled backend by the weight engine
    convert_targets = ("kohya",)

    def sniff(self, file):
        if file.metadata.get("format") == "scale-diff" and file.keys and all(k.endswith(SUFFIX) for k in file.keys):
            return Sniff(1.0, "kohya" if all(k.startswith(KOHYA_PREFIX) for k in file.keys) else "scale-diff")
        return None

    def parse(self, file, sniff):
        patches = {}
        for key, tensor in file.tensors().items():
            module = key[: -len(SUFFIX)]
            target = canonical(module)
            patches[target] = DiffPatch(target, module, {"diff": tensor})
        return Adapter(type=self.name, format=sniff.format, patches=patches, metadata=file.metadata, path=file.path)

    def save(self, adapter, path, format):
        """``scale-diff`` keys by module path, ``kohya`` by kohya module name (``format`` None: the adapter's)."""
        layout = format or adapter.format
        if layout not in self.formats:
            raise AdapterError(path, f"scale-diff: no {layout} layout ({', '.join(self.formats)})")
        arch = kohya_arch(adapter.base, adapter.patches)
        tensors = {f"{kohya_name(t, arch) if layout == 'kohya' else t}{SUFFIX}": p.tensors["diff"]
                   for t, p in adapter.patches.items()}
        return save_safetensors(tensors, Path(path), {**adapter.metadata, "format": "scale-diff"})

    def make_trainable(self, model, config):
        """A zero difference on each of ``TRAIN_TARGETS``, added to the frozen weight by a parametrization."""
        from torch.nn.utils import parametrize

        unet = component(model, "unet")
        if unet is None:
            raise AdapterError(None, "scale-diff: the model has no unet to train")
        diffs = {}
        for target in TRAIN_TARGETS:
            module = unet.get_submodule(target.split(".", 1)[1])
            diffs[target] = AddDiff(module.weight)
            parametrize.register_parametrization(module, "weight", diffs[target])
        return DiffTrainable(diffs)

    def infotext_fields(self, adapter, entry, prompt):
        """``Scale-diff hashes``: the entry's name and its file's hash (not the webui's ``Lora hashes``: the
        webui cannot load this type)."""
        path = entry.path or adapter.path
        return [] if path is None else [("Scale-diff hashes", entry.label, partial(file_hash, path))]

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
    capabilities = ("inspect", "attach", "save", "example", "train")
    unet_runtime = UNET_RESIDUALS
    # its own prompt tag: ``<shift:NAME:0.5>`` in a prompt attaches NAME at 0.5 (one multiplier)
    prompt_tags = (PromptTag("shift", "Residual shift", weights=False),)
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

    def make_trainable(self, model, config):
        """Shifts for every residual of ``model``'s UNet, drawn with standard deviation ``config.shift_init``."""
        unet = component(model, "unet")
        if unet is None:
            raise AdapterError(None, "residual-shift: the model has no unet to train")
        down, mid = residual_channels(unet)
        device, std = next(unet.parameters()).device, float(getattr(config, "shift_init", 0.0) or 0.0)
        shifts = [torch.nn.Parameter(torch.randn(c, device=device) * std) for c in [*down, mid]]
        return ShiftTrainable(shifts[:-1], shifts[-1])

    def infotext_fields(self, adapter, entry, prompt):
        """A numbered ``Residual shift`` unit per entry: its name and weight."""
        return [("Residual shift", None, f"{entry.label} {entry.weight:g}")]


class ShiftTrainable(Trainable):
    """The shifts as trained tensors, fed to the UNet call as its residual inputs (as ``ShiftControl`` does at
    weight 1), written as a ``residual-shift`` file."""

    def __init__(self, down: list[torch.nn.Parameter], mid: torch.nn.Parameter):
        super().__init__([{"name": "residual-shift", "params": [*down, mid]}])
        self.down, self.mid = down, mid

    def unet_kwargs(self, noisy, timesteps, hidden, added_cond_kwargs, cond):
        def shaped(t):
            return t.to(noisy.dtype).reshape(1, -1, 1, 1)

        return {"down_block_additional_residuals": [shaped(t) for t in self.down],
                "mid_block_additional_residual": shaped(self.mid)}

    def save(self, path, metadata):
        tensors = {f"{SHIFT}.down.{i}": t.detach().to(self.save_dtype).cpu() for i, t in enumerate(self.down)}
        tensors[f"{SHIFT}.mid"] = self.mid.detach().to(self.save_dtype).cpu()
        return save_safetensors(tensors, Path(path), {**metadata, "format": "residual-shift"})


@hookimpl
def adapterhub_adapter_types():
    return [ScaleDiffType(), ResidualShiftType()]
