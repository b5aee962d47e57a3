"""Training LoRA, LoCon and LoHa: PEFT layers on the kohya / LyCORIS targets, written in the kohya layout.

The targets are the ones the files of each type carry (``targets.target_modules``): attention-block
Linear and 1x1 layers for LoRA; for LoCon and LoHa also the resnet and sampler convs, where kxk convs
take ``conv_rank`` / ``conv_alpha`` (PEFT ``rank_pattern`` / ``alpha_pattern``), as kohya's
``conv_dim`` / ``conv_alpha`` do. PEFT's own initialisation (LoRA: ``B = 0``; LoHa: ``w2_b = 0``) makes
the first step start from the base model. Saving reads the factors back into our patches and writes
them with ``save.save`` (``lora_unet_…`` / ``lora_te_…``; ``lora_down``/``lora_up``/``alpha``; LoHa
``hada_*``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from adapterhub.errors import AdapterhubError
from adapterhub.types import Adapter, Trainable
from adapterhub.weights import architecture_of, component

from . import save as lora_save
from .patches import LoHaPatch, LoRAPatch
from .targets import target_modules

TRAINABLE_KINDS = ("lora", "locon", "loha")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _real_names(root: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Canonical path -> the module's name inside ``root`` (transformers 5 drops ``text_model.``)."""
    by_id = {id(m): name for name, m in root.named_modules()}
    return {target: by_id[id(m)] for target, m in modules.items()}


def _ranks(kind: str, config) -> tuple[int, float, int, float]:
    rank, alpha = int(config.rank), float(config.alpha if config.alpha is not None else config.rank)
    conv_rank = int(config.conv_rank) if config.conv_rank else rank
    conv_alpha = float(config.conv_alpha) if config.conv_alpha is not None else (alpha if not config.conv_rank
                                                                                 else float(conv_rank))
    if min(rank, conv_rank) <= 0:
        raise AdapterhubError(f"{kind}: rank and conv rank must be positive")
    return rank, alpha, conv_rank, conv_alpha


def _peft_config(kind: str, names: list[str], kxk: list[str], config):
    from peft import LoHaConfig, LoraConfig

    rank, alpha, conv_rank, conv_alpha = _ranks(kind, config)
    ranks = {re.escape(n): conv_rank for n in kxk}
    alphas = {re.escape(n): conv_alpha for n in kxk}
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas,
                          module_dropout=float(config.dropout or 0.0))
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas,
                      lora_dropout=float(config.dropout or 0.0), init_lora_weights=True)


class LoRATrainable(Trainable):
    """PEFT layers injected into the model; ``layers`` maps each canonical target to its PEFT layer."""

    def __init__(self, kind: str, layers: dict[str, nn.Module], groups: list[dict], trains_text: bool,
                 metadata: dict[str, str], base: str):
        super().__init__(groups, trains_text, metadata)
        self.kind, self.layers, self.base = kind, layers, base

    def adapter(self) -> Adapter:
        patches = {}
        for target, layer in self.layers.items():
            alpha = float(layer.alpha["default"] if self.kind == "loha" else layer.lora_alpha["default"])
            if self.kind == "loha":
                tensors = {k: getattr(layer, k)["default"].detach().float().clone()
                           for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
                patches[target] = LoHaPatch(target, target, tensors, alpha=alpha)
            else:
                down = layer.lora_A["default"].weight.detach().float().clone()
                up = layer.lora_B["default"].weight.detach().float().clone()
                patches[target] = LoRAPatch(target, target, {"up": up, "down": down}, alpha=alpha)
        return Adapter(type=self.kind, format="lycoris" if self.kind == "loha" else "kohya", patches=patches,
                       metadata={}, base=self.base)

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        adapter = self.adapter()
        adapter.metadata = {**self.metadata, **metadata}
        return lora_save.save(adapter, Path(path), "kohya")


def network_metadata(kind: str, config, has_conv: bool) -> dict[str, str]:
    rank, alpha, conv_rank, conv_alpha = _ranks(kind, config)
    args: dict[str, str] = {"algo": kind} if kind == "loha" else {}
    if has_conv:
        args.update({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    meta = {"ss_network_module": lora_save.NETWORK_MODULE[kind], "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_network_dropout": str(config.dropout or 0.0),
            "modelspec.architecture": "lora"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def make_trainable(kind: str, model, config) -> LoRATrainable:
    """Inject ``kind`` (lora, locon, loha) layers on every target of ``model``; see the module doc."""
    from peft import inject_adapter_in_model

    if kind not in TRAINABLE_KINDS:
        raise AdapterhubError(f"{kind}: training is not supported (trainable: {', '.join(TRAINABLE_KINDS)})")
    text = bool(getattr(config, "train_text_encoder", False))
    targets = target_modules(model, conv=kind != "lora", text=text)
    if kind == "lora":  # LoRA proper: linear and 1x1 layers only (a kxk conv makes a file LoCon)
        targets = {k: m for k, m in targets.items() if not _is_kxk(m)}
    layers, groups, has_conv = {}, [], False
    for name in COMPONENTS:
        root = component(model, name)
        own = {t: m for t, m in targets.items() if t.startswith(name + ".")}
        if root is None or not own:
            continue
        real = _real_names(root, own)
        kxk = [real[t] for t, m in own.items() if _is_kxk(m)]
        has_conv = has_conv or bool(kxk)
        inject_adapter_in_model(_peft_config(kind, sorted(real.values()), kxk, config), root, adapter_name="default")
        params = [p for n, p in root.named_parameters() if ("lora_" in n or "hada_" in n)]
        for p in params:
            p.requires_grad_(True)
        groups.append({"name": name, "params": params})
        layers.update({t: root.get_submodule(real[t]) for t in own})
    if not layers:
        raise AdapterhubError(f"{kind}: the model has no module this type targets")
    return LoRATrainable(kind, layers, groups, trains_text=text, metadata=network_metadata(kind, config, has_conv),
                         base=architecture_of(model))
