"""Which modules of a model the LoRA family targets (kohya / LyCORIS conventions)."""
from __future__ import annotations

from torch import nn

from adapterhub.keymaps import text_model_path
from adapterhub.weights import component

UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def _children(root: nn.Module, prefix: str, block_names: tuple[str, ...]):
    for name, module in root.named_modules():
        if type(module).__name__ not in block_names:
            continue
        for child_name, child in module.named_modules():
            if child_name and isinstance(child, (nn.Linear, nn.Conv2d)):
                yield f"{prefix}.{text_model_path(name)}.{child_name}", child


def target_modules(model, conv: bool = False, text: bool = True) -> dict[str, nn.Module]:
    """Canonical path -> module: attention-block Linear/1x1 layers, plus resnet and sampler convs
    with ``conv`` (LoCon), plus the text encoders' attention and MLP layers with ``text``."""
    found: dict[str, nn.Module] = {}
    unet = component(model, "unet")
    if unet is not None:
        found.update(_children(unet, "unet", UNET_ATTENTION_BLOCKS))
        if conv:
            found.update(_children(unet, "unet", UNET_CONV_BLOCKS))
    if text:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = component(model, name)
            if encoder is not None:
                found.update(_children(encoder, name, TEXT_BLOCKS))
    return found
