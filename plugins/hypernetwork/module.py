"""The AUTOMATIC1111 hypernetwork MLP, rebuilt exactly as ``HypernetworkModule`` builds it.

For each step ``i`` of ``layer_structure``: ``Linear(dim*ls[i] -> dim*ls[i+1])``, then the activation
(none for ``linear``/None, and none on the last layer unless ``activate_output``), then ``LayerNorm`` if
``is_layer_norm``, then ``Dropout`` where ``dropout_structure[i+1] > 0``. The Linear indices inside the
``linear`` Sequential therefore depend on those settings, which is why the file's settings are needed
to load its state dicts. Forward: ``x + mlp(x) * multiplier``.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adapterhub.errors import AdapterError

# A1111's table: its own names first, then every class of torch.nn.modules.activation, lower-cased.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
                    if cls.__module__ == "torch.nn.modules.activation" and name != "MultiheadAttention"})
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


@dataclass(frozen=True)
class Config:
    """A hypernetwork's settings, with A1111 ``Hypernetwork.load``'s defaults for missing keys."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = None
    is_layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0, 0, 0)
    use_dropout: bool = False
    activate_output: bool = True
    last_layer_dropout: bool = False
    weight_initialization: str = "Normal"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layer_structure"], d["dropout_structure"] = list(self.layer_structure), list(self.dropout_structure)
        return d


def parse_dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's rule for files that predate ``dropout_structure``."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def _numbers(value, path: Path, key: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
        raise AdapterError(path, f"{key} must be a list of numbers, not {value!r}", key)
    return tuple(value)


def config_from(extra: dict, path: Path) -> Config:
    structure = extra.get("layer_structure") or [1, 2, 1]
    structure = _numbers(structure, path, "layer_structure")
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise AdapterError(path, f"layer_structure {list(structure)} must start and end with 1", "layer_structure")
    activation = extra.get("activation_func")
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        raise AdapterError(path, f"unknown hypernetwork activation {activation!r}", "activation_func")
    try:
        ACTIVATIONS.get(activation, nn.Identity)()
    except TypeError:
        raise AdapterError(path, f"hypernetwork activation {activation!r} needs arguments", "activation_func") from None
    dropout = extra.get("dropout_structure")
    use_dropout = bool(dropout is not None and any(dropout)) or bool(extra.get("use_dropout", False))
    last_layer_dropout = bool(extra.get("last_layer_dropout", False))
    if dropout is None:
        dropout = parse_dropout_structure(structure, use_dropout, last_layer_dropout)
    dropout = _numbers(dropout, path, "dropout_structure")
    if len(dropout) != len(structure) or any(not 0 <= p < 1 for p in dropout):
        raise AdapterError(path, f"dropout_structure {list(dropout)} does not fit layer_structure {list(structure)}",
                           "dropout_structure")
    return Config(structure, activation, bool(extra.get("is_layer_norm", False)), dropout, use_dropout,
                  bool(extra.get("activate_output", True)), last_layer_dropout,
                  str(extra.get("weight_initialization") or "Normal"))


def build(dim: int, config: Config) -> nn.Sequential:
    """The empty Sequential A1111 builds for context width ``dim``."""
    ls, layers = config.layer_structure, []
    for i in range(len(ls) - 1):
        layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        last = i >= len(ls) - 2
        if config.activation_func not in (None, "linear") and not (last and not config.activate_output):
            layers.append(ACTIVATIONS[config.activation_func]())
        if config.is_layer_norm:
            layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
        if config.dropout_structure[i + 1] > 0:
            layers.append(nn.Dropout(p=config.dropout_structure[i + 1]))
    return nn.Sequential(*layers)


class HyperModule(nn.Module):
    """One of a width's two MLPs (for ``to_k`` or ``to_v``): ``x + mlp(x) * multiplier``."""

    def __init__(self, dim: int, config: Config):
        super().__init__()
        self.linear = build(dim, config)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


def load_module(dim: int, config: Config, state: dict[str, torch.Tensor], path: Path, where: str) -> HyperModule:
    """Build and fill one MLP; a state dict that does not fit the settings is refused by name."""
    state = {OLD_KEYS.get(k, k): v for k, v in state.items()}
    module = HyperModule(dim, config)
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise AdapterError(path, f"the {dim}-wide MLP does not match layer_structure {list(config.layer_structure)}, "
                                 f"activation {config.activation_func!r}, layer norm {config.is_layer_norm}: "
                                 f"{first[:160]}", where) from None
    return module.eval().requires_grad_(False)


def state_of(module: HyperModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
