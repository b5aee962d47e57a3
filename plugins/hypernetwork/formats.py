"""The AUTOMATIC1111 hypernetwork file: a ``torch.save``d dict, read with ``weights_only=True``.

``{320: (sd_k, sd_v), 640: ..., 768: ..., 1280: ..., 'layer_structure': [1, 2, 1], 'activation_func': ...,
'is_layer_norm', 'use_dropout', 'dropout_structure', 'activate_output', 'last_layer_dropout',
'weight_initialization', 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name', 'optional_info'}``.
The int keys are context widths; each value holds the state dicts of the ``to_k`` and ``to_v`` MLPs
(``linear.N.weight`` / ``.bias``; very old files ``linear1`` / ``linear2``). The file opens flattened:
``768.0.linear.0.weight`` is width 768, the ``k`` MLP.
"""
from __future__ import annotations

import re
from pathlib import Path

from typing import TYPE_CHECKING

from adapterhub.archs import CONTEXT_WIDTH
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile, atomic_path
from adapterhub.types import Adapter, Patch, Sniff

if TYPE_CHECKING:  # torch (and ``module``, torch MLPs) are imported where modules are built or values read:
    from .module import Config, HyperModule  # sniffing another type's file must not pay for them

FORMAT = "a1111"
KEY = re.compile(r"^(\d+)\.([01])\.(linear\.\d+\.(?:weight|bias)|linear[12]\.(?:weight|bias))$")
SETTINGS = ("layer_structure", "activation_func", "is_layer_norm", "use_dropout", "activate_output",
            "weight_initialization", "dropout_structure", "last_layer_dropout")
FACTS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "optional_info")


class HypernetworkPatch(Patch):
    """The two MLPs for one context width: ``k`` (feeds ``to_k``) and ``v`` (feeds ``to_v``)."""

    kind = "hypernetwork"
    linear_in_multiplier = False

    def __init__(self, width: int, k: HyperModule, v: HyperModule):
        tensors = {f"{side}.{name}": t for side, m in (("k", k), ("v", v)) for name, t in m.state_dict().items()}
        super().__init__(target=f"unet.attn@{width}", source=str(width), tensors=tensors)
        self.width, self.k, self.v = width, k, v

    @property
    def in_features(self) -> int:
        return self.width

    def delta(self, weight):
        raise NotImplementedError("a hypernetwork transforms the attention context; it is not a weight delta")


def widths_of(file: AdapterFile) -> dict[int, list[str]] | None:
    """width -> its keys when every tensor key has the layout (keys only, no tensor reads)."""
    if not file.keys:
        return None
    found: dict[int, list[str]] = {}
    for key in file.keys:
        m = KEY.match(key)
        if m is None:
            return None
        found.setdefault(int(m.group(1)), []).append(key)
    return found


def sniff(file: AdapterFile) -> Sniff | None:
    widths = widths_of(file)
    if widths is None:
        return None
    sides = {key.split(".")[1] for keys in widths.values() for key in keys}
    if sides != {"0", "1"}:
        return None
    settings = [k for k in SETTINGS if k in file.extra]
    return Sniff(0.95 if settings else 0.7, FORMAT, {"widths": sorted(widths)})


def base_of(widths) -> str:
    """The base whose text-context width is among the MLP widths (768 sd1, 1024 sd2, 2048 sdxl).

    Two real context widths (768 and 1024 both trained) is ambiguous: unknown. The tiny bases' widths
    overlap (tiny-sdxl's 64-wide self-attention is tiny-sd1's text width), so there the widest wins.
    """
    known = sorted(w for w in widths if w in CONTEXT_WIDTH)
    real = [w for w in known if not CONTEXT_WIDTH[w].startswith("tiny")]
    if real:
        return CONTEXT_WIDTH[real[0]] if len(real) == 1 else "unknown"
    return CONTEXT_WIDTH[known[-1]] if known else "unknown"


def parse(file: AdapterFile, found: Sniff, type_name: str) -> Adapter:
    import torch

    from .module import config_from, load_module

    config = config_from(file.extra, file.path)
    widths = widths_of(file) or {}
    patches = {}
    for width in sorted(widths):
        prefix = f"{width}."
        keys = widths[width]
        modules = []
        for side in ("0", "1"):
            own = [k for k in keys if k.startswith(f"{prefix}{side}.")]
            state = {k[len(prefix) + 2:]: t for k, t in file.tensors(own).items()}
            for name, t in state.items():
                if not torch.isfinite(t.float()).all():
                    raise AdapterError(file.path, "the hypernetwork holds NaN or infinite values",
                                       f"{prefix}{side}.{name}")
            modules.append(load_module(width, config, state, file.path, f"{prefix}{side}"))
        patch = HypernetworkPatch(width, *modules)
        patches[patch.target] = patch
    extra = {"config": config}
    extra.update({k: file.extra[k] for k in FACTS if k in file.extra})
    return Adapter(type=type_name, format=FORMAT, patches=patches, metadata=dict(file.metadata), path=file.path,
                   file=file, base=base_of(widths), extra=extra)


def summary(adapter: Adapter) -> dict:
    config: Config = adapter.extra["config"]
    patches = [p for p in adapter.patches.values() if isinstance(p, HypernetworkPatch)]
    facts = {"widths": sorted(p.width for p in patches),
             "parameters": sum(t.numel() for p in patches for t in p.tensors.values())}
    facts.update(config.as_dict())
    for key in FACTS:
        if key in adapter.extra and not (key == "optional_info" and adapter.extra[key] is None):
            facts["internal_name" if key == "name" else key] = adapter.extra[key]
    return facts


def write(layers: dict[int, tuple[HyperModule, HyperModule]], config: Config, path: Path,
          facts: dict | None = None) -> Path:
    """A1111's ``Hypernetwork.save`` layout (the only format there is), written atomically."""
    import torch

    from .module import state_of

    facts = facts or {}
    state: dict = {w: (state_of(k), state_of(v)) for w, (k, v) in sorted(layers.items())}
    settings = config.as_dict()
    state.update({
        "step": facts.get("step", 0), "name": facts.get("name", Path(path).stem),
        "layer_structure": settings["layer_structure"], "activation_func": settings["activation_func"],
        "is_layer_norm": settings["is_layer_norm"], "weight_initialization": settings["weight_initialization"],
        "sd_checkpoint": facts.get("sd_checkpoint"), "sd_checkpoint_name": facts.get("sd_checkpoint_name"),
        "activate_output": settings["activate_output"], "use_dropout": settings["use_dropout"],
        "dropout_structure": settings["dropout_structure"],
        "last_layer_dropout": settings["last_layer_dropout"], "optional_info": facts.get("optional_info"),
    })
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, str(tmp))
    return Path(path)


def save(adapter: Adapter, path: Path, fmt: str | None) -> Path:
    if fmt not in (None, FORMAT):
        raise AdapterError(path, f"a hypernetwork has one format, {FORMAT!r} (a .pt file), not {fmt!r}")
    layers = {p.width: (p.k, p.v) for p in adapter.patches.values() if isinstance(p, HypernetworkPatch)}
    return write(layers, adapter.extra["config"], path, adapter.extra)


def attention_widths(unet) -> list[int]:
    """The context widths the UNet's attention layers take (self-attention widths and the text width)."""
    return sorted({m.to_k.in_features for m in unet.modules() if _is_attention(m)})


def _is_attention(module) -> bool:
    import torch

    return hasattr(module, "set_processor") and isinstance(getattr(module, "to_k", None), torch.nn.Linear)


def example(model, path: Path, seed: int = 0, activation: str = "relu") -> Path:
    """A1111's defaults ([1, 2, 1], Normal init: weights N(0, 0.01), zero bias) for every width of the UNet."""
    import torch

    from adapterhub.weights import component

    from .module import Config, HyperModule

    unet = component(model, "unet")
    if unet is None:
        raise AdapterError(path, "the model has no unet to write a hypernetwork for")
    gen = torch.Generator().manual_seed(seed)
    config = Config(activation_func=activation)
    layers = {}
    for width in attention_widths(unet):
        pair = []
        for _ in range(2):
            module = HyperModule(width, config)
            with torch.no_grad():
                for layer in module.linear:
                    if isinstance(layer, torch.nn.Linear):
                        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
                        layer.bias.zero_()
            pair.append(module.eval())
        layers[width] = tuple(pair)
    return write(layers, config, Path(path), {"name": Path(path).stem})
