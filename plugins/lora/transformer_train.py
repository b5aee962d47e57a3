"""Training a LoRA on a transformer base (FLUX.1, SD3 / SD3.5): the targets, the family facts and the metadata.

The targets are the linear layers diffusers' DreamBooth LoRA scripts (``train_dreambooth_lora_flux.py`` /
``_sd3.py``) adapt, which are the ones sd-scripts' networks hold in BFL / SAI naming, less the modulations:

* double-stream (FLUX.1) and joint (SD3) blocks: the image stream's attention ``attn.to_q/to_k/to_v``,
  ``attn.to_out.0`` and feed-forward ``ff.net.0.proj`` / ``ff.net.2``; the context stream's
  ``attn.add_q_proj/add_k_proj/add_v_proj``, ``attn.to_add_out`` and ``ff_context.net.0.proj`` / ``ff_context
  .net.2``; SD3.5's second attention ``attn2.*``;
* single-stream blocks (FLUX.1): ``attn.to_q/to_k/to_v``, ``proj_mlp`` (BFL's fused ``linear1``) and
  ``proj_out`` (``linear2``).

With ``--train-text-encoder`` the CLIP encoders train too (FLUX.1: CLIP-L; SD3: CLIP-L and CLIP-G), their
attention and MLP linear layers as for Stable Diffusion, and with ``--train-t5`` the family's T5 encoder, its
``T5Attention`` (q, k, v, o) and ``T5DenseGatedActDense`` (wi_0, wi_1, wo) linear layers: sd-scripts'
``lora_flux`` / ``lora_sd3`` networks (``train_t5xxl``), whose prefixes the file keeps: ``lora_te1_`` (CLIP-L),
``lora_te2_`` (CLIP-G), ``lora_te3_`` (T5).

The file is written in sd-scripts' names (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks
_0_linear1``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``): the separately trained q / k / v (and
``proj_mlp``) join block-diagonally (:mod:`.transformer_save`), which diffusers' kohya converter splits back.
A LoHa or LoKr cannot join a fused module (its product is no stack of rows): it is written in LyCORIS' own
names, the diffusers path joined by ``_`` (``lycoris_transformer_blocks_0_attn_to_q.hada_w1_a``), as LyCORIS'
wrapper and SimpleTuner write them.
"""
from __future__ import annotations

import re

from torch import nn

from adapterhub.errors import AdapterhubError
from adapterhub.io import save_safetensors
from adapterhub.keymaps import kohya_name
from adapterhub.transformer_bases import WIDTH_BASES
from adapterhub.weights import component

from .save import KOHYA_FAMILY_META, kohya_metadata, module_tensors, unshared
from .targets import target_modules
from .transformer_keys import T5_COMPONENT, T5_PREFIX

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
DOUBLE_TARGETS = frozenset({f"attn.{n}" for n in ATTENTION + CONTEXT} | {f"attn2.{n}" for n in ATTENTION}
                           | set(FEED_FORWARD))
SINGLE_TARGETS = frozenset({"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"})
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$")
T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense")  # sd-scripts' T5 modules (T5 v1.1, as both families have)
TRANSFORMER_KINDS = ("lora", "locon", "loha", "lokr")  # lora and locon are one on linear layers
# sd-scripts' modelspec architectures (library/sai_model_spec.py)
MODELSPEC = {"flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell", "sd3-medium": "stable-diffusion-3-medium",
             "sd3.5-medium": "stable-diffusion-3.5-medium", "sd3.5-large": "stable-diffusion-3.5-large"}
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
SD3_IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"


def transformer_of(model):
    """The model's transformer denoiser when it is a transformer base (no UNet), else None."""
    if component(model, "unet") is not None:
        return None
    return component(model, "transformer")


def transformer_targets(model) -> dict[str, nn.Module]:
    """Canonical target (``transformer.<path>``) -> linear module, for every module of the module doc."""
    transformer = transformer_of(model)
    found = {}
    for name, module in transformer.named_modules():
        m = _BLOCK.match(name)
        if m is None or not isinstance(module, nn.Linear):
            continue
        allowed = DOUBLE_TARGETS if m[1] == "transformer_blocks" else SINGLE_TARGETS
        if m[2] in allowed:
            found[f"transformer.{name}"] = module
    return found


def text_targets(model, t5: bool) -> dict[str, nn.Module]:
    """Canonical target -> linear module of the text encoders (see the module doc): the CLIP encoders' attention
    and MLP layers, and with ``t5`` the family's T5 encoder's (``text_encoder_2.encoder.block.0.layer.0
    .SelfAttention.q`` on FLUX.1)."""
    found = target_modules(model, conv=False, text=True)  # no UNet: the CLIP encoders' layers only
    name = T5_COMPONENT[family_and_base(model)[0]]
    encoder = component(model, name) if t5 else None
    for path, block in encoder.named_modules() if encoder is not None else ():
        if type(block).__name__ in T5_BLOCKS:
            found.update({f"{name}.{path}.{child}": m for child, m in block.named_children()
                          if isinstance(m, nn.Linear)})
    return found


def family_and_base(model) -> tuple[str, str]:
    """(``flux`` / ``sd3``, the base an adapter of this transformer is reported for: ``flux-dev``,
    ``flux-schnell``, ``sd3.5-medium``, ``sd3.5-large``, ``sd3-medium``, ``tiny-flux`` ...)."""
    cfg = transformer_of(model).config
    width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    family, base = WIDTH_BASES.get(width, ("flux" if "guidance_embeds" in cfg else "sd3", "unknown"))
    if base == "flux":
        base = "flux-dev" if cfg.guidance_embeds else "flux-schnell"
    elif base == "sd3-medium" and getattr(cfg, "dual_attention_layers", None):
        base = "sd3.5-medium"
    return family, base


def modelspec_architecture(model) -> str:
    """sd-scripts' ``modelspec.architecture`` base: ``flux-1-dev`` / ``flux-1-schnell`` (by the guidance
    embedding), ``stable-diffusion-3.5-medium`` (dual attention) / ``-large`` / ``stable-diffusion-3-medium``;
    a tiny base is named as the real model it is shaped like."""
    family, base = family_and_base(model)
    cfg = transformer_of(model).config
    if family == "flux":
        return MODELSPEC["flux-dev" if cfg.guidance_embeds else "flux-schnell"]
    if getattr(cfg, "dual_attention_layers", None):
        return MODELSPEC["sd3.5-medium"]
    return MODELSPEC.get(base, MODELSPEC["sd3-medium"])


def refuse(kind: str, config) -> None:
    """The LoRA-family options that have no transformer form yet, refused before the model is changed."""
    if kind not in TRANSFORMER_KINDS:
        raise AdapterhubError(f"{kind}: training on a transformer base (FLUX.1, SD3) is available for "
                              f"{', '.join(TRANSFORMER_KINDS)}")


def metadata(model, kind: str, base_meta: dict[str, str]) -> dict[str, str]:
    """``base_meta`` (the network's ``ss_*``) with sd-scripts' Flux / SD3 network module and base version, and
    the modelspec architecture and implementation of the family."""
    family, _ = family_and_base(model)
    meta = {**base_meta, **KOHYA_FAMILY_META[family]}
    meta["modelspec.architecture"] = f"{modelspec_architecture(model)}/lora"
    meta["modelspec.implementation"] = FLUX_IMPLEMENTATION if family == "flux" else SD3_IMPLEMENTATION
    return meta


def lycoris_name(target: str, family: str) -> str:
    """A LoHa / LoKr module's name: LyCORIS' for the transformer (see the module doc); a text encoder's as
    sd-scripts names it (``lora_te1_`` / ``lora_te2_`` CLIP, ``lora_te3_`` T5), as LyCORIS names them on SD."""
    component, _, path = target.partition(".")
    if component == "transformer":
        return "lycoris_" + path.replace(".", "_")
    if component == T5_COMPONENT[family]:
        return T5_PREFIX + path.replace(".", "_")
    return kohya_name(target, "sdxl")


def save_lycoris(adapter, path):
    """A LoHa / LoKr on a transformer base in LyCORIS' names (:func:`lycoris_name`), with the kohya metadata."""
    tensors = {}
    for patch in adapter.patches.values():
        tensors.update(module_tensors(adapter, lycoris_name(patch.target, adapter.family), patch))
    return save_safetensors(unshared(tensors), path, kohya_metadata(adapter))
