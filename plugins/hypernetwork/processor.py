"""Attaching a hypernetwork the way AUTOMATIC1111 applies it, through a diffusers attention processor.

In every UNet attention layer whose context width has an MLP pair, the context that feeds ``to_k``
becomes ``context + mlp_k(context) * m`` and the one that feeds ``to_v`` ``context + mlp_v(context) * m``
(``to_q`` is untouched). That covers cross-attention (the text context) and self-attention (where the
context is the hidden state), exactly as A1111's ``apply_hypernetworks`` does; several hypernetworks
chain in attach order. The MLPs run in float32 (A1111 keeps them in float32) and the result is cast
back to the context's dtype.

The processor mirrors diffusers ``AttnProcessor2_0`` line for line apart from the two contexts. It is a
plain object, not an ``nn.Module``, so the UNet's state dict does not change. Detach puts the original
processor object back.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adapterhub.errors import AdapterError
from adapterhub.types import Adapter, Handle
from adapterhub.weights import architecture_of, component

from .formats import HypernetworkPatch, _is_attention


class Hypernetwork:
    """One attached hypernetwork: width -> (k MLP, v MLP), and its multiplier."""

    def __init__(self, layers: dict[int, tuple[torch.nn.Module, torch.nn.Module]], multiplier: float):
        self.layers, self.multiplier = layers, float(multiplier)

    def __call__(self, context_k: torch.Tensor, context_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.layers.get(context_k.shape[-1])
        if pair is None:
            return context_k, context_v
        return self._run(pair[0], context_k), self._run(pair[1], context_v)

    def _run(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp(x.to(torch.float32), self.multiplier).to(x.dtype)


class HypernetworkAttnProcessor:
    """``AttnProcessor2_0`` with the key and value contexts passed through the attached hypernetworks."""

    def __init__(self, original):
        self.original = original
        self.hypernetworks: list[Hypernetwork] = []

    def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        for hypernetwork in self.hypernetworks:
            context_k, context_v = hypernetwork(context_k, context_v)
        return context_k, context_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self.contexts(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _replaceable():
    """Processors a hypernetwork may stand in for: the standard ones, and diffusers' fused-projection one (the
    compiled backend's fused QKV keeps ``to_q``/``to_k``/``to_v`` as views of the fused weight, so the
    hypernetwork's separate projections read the same, current weights; detaching puts the fused one back)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0, HypernetworkAttnProcessor)


def _on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The MLP on ``device``: the adapter's own where it already is, else a moved copy."""
    if next(module.parameters()).device == device:
        return module
    return copy.deepcopy(module).to(device)


def attach(adapter: Adapter, pipe, weight: float = 1.0) -> "HypernetworkHandle":
    """Validate every layer first (all or nothing), then install the processors."""
    unet = component(pipe, "unet")
    if unet is None:
        raise AdapterError(adapter.path, "the model has no unet for a hypernetwork to attach to")
    pairs = {p.width: (p.k, p.v) for p in adapter.patches.values() if isinstance(p, HypernetworkPatch)}
    layers = [(name, m) for name, m in unet.named_modules() if _is_attention(m) and m.to_k.in_features in pairs]
    if not layers:
        raise AdapterError(adapter.path, f"no attention layer of the UNet takes a context of width "
                                         f"{', '.join(map(str, sorted(pairs)))} (hypernetwork for {adapter.base}, "
                                         f"model {architecture_of(pipe)})")
    allowed = _replaceable()
    for name, module in layers:
        if type(module.processor) not in allowed:  # exact: a subclass may compute attention its own way
            raise AdapterError(adapter.path, f"attention layer unet.{name} runs {type(module.processor).__name__}; "
                                             "a hypernetwork attaches over the standard attention processor only")
    device = next(unet.parameters()).device
    used = {m.to_k.in_features for _, m in layers}
    hypernetwork = Hypernetwork({w: (_on(k, device), _on(v, device)) for w, (k, v) in pairs.items() if w in used},
                                weight)
    for _, module in layers:
        processor = module.processor
        if not isinstance(processor, HypernetworkAttnProcessor):
            processor = HypernetworkAttnProcessor(processor)
            module.set_processor(processor)
        processor.hypernetworks.append(hypernetwork)
    return HypernetworkHandle(hypernetwork, [m for _, m in layers])


class HypernetworkHandle(Handle):
    """``set_weight`` changes the multiplier; ``detach`` restores the original processors."""

    def __init__(self, hypernetwork: Hypernetwork, modules: list):
        self.hypernetwork, self.modules, self.attached = hypernetwork, modules, True

    @property
    def layers(self) -> int:
        return len(self.modules)

    def set_weight(self, weight: float) -> None:
        if not self.attached:
            raise RuntimeError("hypernetwork is detached")
        self.hypernetwork.multiplier = float(weight)

    def detach(self) -> None:
        if not self.attached:
            return
        for module in self.modules:
            processor = module.processor
            if isinstance(processor, HypernetworkAttnProcessor) and self.hypernetwork in processor.hypernetworks:
                processor.hypernetworks.remove(self.hypernetwork)
                if not processor.hypernetworks:
                    module.set_processor(processor.original)
        self.attached = False
