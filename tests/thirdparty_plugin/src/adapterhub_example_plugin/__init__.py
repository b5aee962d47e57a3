"""A third-party adapter type, written exactly as a built-in one: ``scale-diff``.

Files are safetensors with keys ``<module path>.scale_diff`` (a full weight difference) and the
metadata ``format = scale-diff``; merging adds ``weight x diff``.
"""
from pathlib import Path

import torch

from adapterhub.hookspecs import hookimpl
from adapterhub.io import save_safetensors
from adapterhub.keymaps import canonical
from adapterhub.types import Adapter, AdapterType, Patch, Sniff

SUFFIX = ".scale_diff"


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
        from adapterhub.weights import component
        layer = component(model, "unet").conv_in
        tensors = {f"unet.conv_in{SUFFIX}": torch.randn(layer.weight.shape, generator=gen) * 0.01}
        return save_safetensors(tensors, Path(path), {"format": "scale-diff"})


@hookimpl
def adapterhub_adapter_types():
    return [ScaleDiffType()]
