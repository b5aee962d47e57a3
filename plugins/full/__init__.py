"""Full fine-tuning (DreamBooth style): every UNet weight trains; the output is a whole checkpoint.

Not an adapter file type: nothing is recognised (``sniff`` stays None), parsed or merged. The type
exists so that ``adapterhub train --type full`` goes through the one training loop like every other
type; it contributes the trainable parameters and the writer (see ``train``).
"""
from __future__ import annotations

from adapterhub.hookspecs import hookimpl
from adapterhub.types import AdapterType


class FullType(AdapterType):
    name = "full"
    description = ("Full fine-tune (DreamBooth): every UNet weight (and with --train-text-encoder the text "
                   "encoders) trains; writes a diffusers folder or a single-file .safetensors checkpoint")
    capabilities = ("train",)
    example_suffix = ""

    def make_trainable(self, model, config):
        """The whole UNet (and text encoders) as the param groups; ``save`` writes the pipeline."""
        from .train import make_trainable

        return make_trainable(model, config)


@hookimpl
def adapterhub_adapter_types():
    return [FullType()]
