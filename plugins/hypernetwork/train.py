"""Training an AUTOMATIC1111 hypernetwork: one MLP pair per attention context width, attached as usual.

The MLPs are built as A1111's ``HypernetworkModule`` builds them (``layer_structure``, activation,
layer norm, dropout structure) with its "Normal" initialisation (weights N(0, 0.01), zero biases), and
attached through the same attention processor that applies a trained file, at multiplier 1 (A1111
forces 1 while training). Only the MLPs train; UNet, VAE and text encoders stay frozen, so the text
conditioning is cached. Written as A1111's ``.pt`` (``formats.write``). The learning-rate schedule
string A1111 uses (``5e-5:100, 5e-6:1500``) is the loop's ``--lr-schedule``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.types import Adapter, Trainable
from adapterhub.weights import architecture_of, component

from . import formats, processor
from .module import ACTIVATIONS, Config, HyperModule, parse_dropout_structure


def hyper_config(config) -> Config:
    try:
        structure = tuple(float(x) for x in str(config.hn_layer_structure).split(",") if x.strip())
    except ValueError:
        raise AdapterhubError(f"--hn-layer-structure {config.hn_layer_structure!r}: numbers, comma-separated") from None
    structure = tuple(int(x) if x.is_integer() else x for x in structure)
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise AdapterhubError(f"--hn-layer-structure {list(structure)} must start and end with 1")
    activation = config.hn_activation or "linear"
    if activation not in ACTIVATIONS:
        raise AdapterhubError(f"--hn-activation {activation!r}: unknown (e.g. linear, relu, swish, tanh)")
    dropout = tuple(parse_dropout_structure(structure, bool(config.hn_dropout), False))
    return Config(layer_structure=structure, activation_func=activation, is_layer_norm=bool(config.hn_layer_norm),
                  dropout_structure=dropout, use_dropout=bool(config.hn_dropout))


def _normal_init(module: HyperModule) -> None:
    with torch.no_grad():
        for layer in module.linear:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.01)
                layer.bias.zero_()


class HypernetworkTrainable(Trainable):
    default_lr = 1e-5  # AUTOMATIC1111's hypernetwork learning rate

    def __init__(self, layers: dict, hconfig: Config, handle, metadata: dict[str, str]):
        params = [p for pair in layers.values() for m in pair for p in m.parameters()]
        super().__init__([{"name": "hypernetwork", "params": params}], trains_text=False, metadata=metadata)
        self.layers, self.hconfig, self.handle = layers, hconfig, handle

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        facts = {"name": metadata.get("ss_output_name") or Path(path).stem,
                 "step": int(metadata.get("ss_steps", 0) or 0), "sd_checkpoint": metadata.get("ss_sd_model_hash"),
                 "sd_checkpoint_name": metadata.get("ss_sd_model_name")}
        return formats.write(self.layers, self.hconfig, Path(path), facts)


def make_trainable(model, config) -> HypernetworkTrainable:
    unet = component(model, "unet")
    if unet is None:
        raise AdapterhubError("hypernetwork: the model has no UNet")
    available = formats.attention_widths(unet)
    widths = list(config.hn_widths) or available
    unknown = [w for w in widths if w not in available]
    if unknown:
        raise AdapterhubError(f"--hn-widths {unknown}: no attention layer takes that context width "
                              f"(available: {', '.join(map(str, available))})")
    hconfig = hyper_config(config)
    device = next(unet.parameters()).device
    layers = {}
    for width in sorted(widths):
        pair = (HyperModule(width, hconfig).to(device), HyperModule(width, hconfig).to(device))
        for module in pair:
            _normal_init(module)
            module.train().requires_grad_(True)
        layers[width] = pair
    patches = {p.target: p for p in (formats.HypernetworkPatch(w, *pair) for w, pair in layers.items())}
    adapter = Adapter(type="hypernetwork", format=formats.FORMAT, patches=patches, base=architecture_of(model),
                      extra={"config": hconfig})
    handle = processor.attach(adapter, model, 1.0)
    return HypernetworkTrainable(layers, hconfig, handle, {"modelspec.architecture": "hypernetwork"})
