"""Hypernetworks in the AUTOMATIC1111 format: per-context-width MLP pairs on the attention context.

Not a weight delta: ``attach`` installs an attention processor that feeds ``to_k`` / ``to_v`` with
``context + mlp(context) * multiplier`` (see ``processor``); ``merge`` refuses, with the reason.
"""
from __future__ import annotations

from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.types import Adapter, ModuleBackedType

from . import formats, processor


class HypernetworkType(ModuleBackedType):
    name = "hypernetwork"
    impl = formats
    description = "Hypernetwork (AUTOMATIC1111 .pt): MLPs on the cross-attention context; attached, never merged"
    formats = (formats.FORMAT,)
    capabilities = ("inspect", "attach", "save", "example", "train")
    example_suffix = ".pt"
    weight_space = False

    def make_trainable(self, model, config):
        """A1111 MLP pairs per context width (``config.hn_*``), attached for training; see ``train``."""
        from .train import make_trainable

        return make_trainable(model, config)

    def attach(self, adapter: Adapter, pipe, weight: float = 1.0) -> processor.HypernetworkHandle:
        return processor.attach(adapter, pipe, weight)

    def merge_into(self, adapter: Adapter, pipe, weight: float = 1.0) -> None:
        raise AdapterError(adapter.path, "a hypernetwork cannot be merged: it transforms the attention context "
                                         "(context + mlp(context) x multiplier before to_k/to_v), which no weight "
                                         "change reproduces; attach it instead")


@hookimpl
def adapterhub_adapter_types():
    return [HypernetworkType()]
