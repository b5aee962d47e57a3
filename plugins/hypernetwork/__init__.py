"""Hypernetworks in the AUTOMATIC1111 format: per-context-width MLP pairs on the attention context.

Not a weight delta: ``attach`` installs an attention processor that feeds ``to_k`` / ``to_v`` with
``context + mlp(context) * multiplier`` (see ``processor``); ``merge`` refuses, with the reason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.types import ATTENTION_CONTEXT, Adapter, ModuleBackedType, PromptTag, TrainOption

from . import formats

if TYPE_CHECKING:  # torch and the processor (diffusers) are imported where a hypernetwork runs
    import torch

    from . import processor


class HypernetworkType(ModuleBackedType):
    name = "hypernetwork"
    impl = formats
    description = "Hypernetwork (AUTOMATIC1111 .pt): MLPs on the cross-attention context; attached, never merged"
    formats = (formats.FORMAT,)
    capabilities = ("inspect", "attach", "save", "example", "train")
    example_suffix = ".pt"
    weight_space = False
    unet_runtime = ATTENTION_CONTEXT  # only the key / value contexts change: a compiled UNet takes them as inputs
    convert_targets = ("a1111",)
    extra_network = "hypernetwork"  # the webui's hypernetworks page, what ``<hypernet:NAME>`` tags load
    prompt_tags = (PromptTag("hypernet", "Hypernetwork", weights=False),)  # one multiplier, as the webui's
    train_options = (  # A1111's hypernetwork settings (see ``train``)
        TrainOption("hn_layer_structure", str, "1,2,1", "hypernetwork MLP widths as multiples of the context width"),
        TrainOption("hn_activation", str, "linear", "hypernetwork activation (A1111 names: linear, relu, swish ...)"),
        TrainOption("hn_layer_norm", bool, False, "hypernetwork: LayerNorm after each Linear"),
        TrainOption("hn_dropout", bool, False, "hypernetwork: A1111's dropout structure (0.3 on hidden layers)"),
        TrainOption("hn_widths", tuple[int, ...], (), "context widths that get an MLP pair (default: every "
                                                      "attention width of the UNet)"),
    )

    @property
    def attention_processor(self) -> type:
        """The processor class ``attach`` installs (imported on first use: listing the type needs no torch)."""
        from .processor import HypernetworkAttnProcessor

        return HypernetworkAttnProcessor

    def attention_chain(self, attached: processor.HypernetworkAttnProcessor) -> tuple:
        """The hypernetworks the layer runs, in attach order."""
        return tuple(attached.hypernetworks)

    def attention_graph_inputs(self, chain: tuple, width: int, device) -> list:
        """Each hypernetwork's (k MLP, v MLP, multiplier as a float32 tensor) for ``width``."""
        import torch

        return [(*h.layers[width], torch.tensor(h.multiplier, dtype=torch.float32, device=device))
                for h in chain if width in h.layers]

    def attention_graph_contexts(self, inputs: list, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Hypernetwork._run`` over the chain, the multiplier a tensor: a float32 product, the same as with
        the Python number."""
        import torch

        context_k = context_v = context
        for mlp_k, mlp_v, multiplier in inputs:
            context_k = mlp_k(context_k.to(torch.float32), multiplier).to(context_k.dtype)
            context_v = mlp_v(context_v.to(torch.float32), multiplier).to(context_v.dtype)
        return context_k, context_v

    def make_trainable(self, model, config):
        """A1111 MLP pairs per context width (``config.hn_*``), attached for training; see ``train``."""
        from .train import make_trainable

        return make_trainable(model, config)

    def attach(self, adapter: Adapter, pipe, weight: float = 1.0) -> processor.HypernetworkHandle:
        from . import processor

        return processor.attach(adapter, pipe, weight)

    def merge_into(self, adapter: Adapter, pipe, weight: float = 1.0) -> None:
        raise AdapterError(adapter.path, "a hypernetwork cannot be merged: it transforms the attention context "
                                         "(context + mlp(context) x multiplier before to_k/to_v), which no weight "
                                         "change reproduces; attach it instead")


@hookimpl
def adapterhub_adapter_types():
    return [HypernetworkType()]
