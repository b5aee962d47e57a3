"""Saving a base pipeline: a diffusers folder, or one ``.safetensors`` in the original key layout.

The single file uses the ldm (SD1/SD2) or sgm (SDXL) names that AUTOMATIC1111, ComfyUI and
``from_single_file`` read, the same layout diffusers' ``convert_diffusers_to_original_stable_diffusion.py``
and ``convert_diffusers_to_original_sdxl.py`` write:

* UNet ``model.diffusion_model.*``: diffusers blocks become ``input_blocks.N.K`` / ``middle_block.K`` /
  ``output_blocks.N.K``; transformer internals keep their names; resnet layers are renamed.
* VAE ``first_stage_model.*``: ``down.N.block.J``, ``mid.block_1``, ``up.(reversed N)``; the mid attention's
  linear layers are stored as 1x1 convolutions, as the original autoencoder has them.
* CLIP ViT-L (SD1, SDXL's first encoder): the transformers layout under ``cond_stage_model.transformer.``
  or ``conditioner.embedders.0.transformer.``.
* OpenCLIP (SD2, SDXL's second encoder): ``resblocks.N`` with fused ``in_proj`` q/k/v and a transposed
  ``text_projection``. SD2's diffusers text encoder has 23 of OpenCLIP's 24 layers (SD2 reads the
  penultimate layer), so the 24th layer is absent from the file, as in diffusers' own conversion.

The architecture is recorded in the metadata (``adapterhub.base``) so :func:`adapterhub.base.load_base`
loads the file back with the matching configuration, tiny bases included.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from adapterhub.base import METADATA_KEY, detect_architecture
from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_dir, save_safetensors
from adapterhub.keymaps import UNetLayout, diffusers_to_sgm, rename_first

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (component, key prefix, layout) per text-encoder family
TEXT_LAYOUTS = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.text_model.", "clip"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "openclip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.text_model.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
}
FAMILY = {"sd1": "sd1", "tiny-sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "tiny-sdxl": "sdxl"}
MODELSPEC = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------
def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """``down_blocks.1.attentions.0.proj_in.weight`` -> ``input_blocks.4.1.proj_in.weight`` (no prefix);
    the keymaps' one diffusers -> ldm/sgm table, which the kohya SDXL writer uses too."""
    ldm = diffusers_to_sgm(key, UNetLayout(layers_per_block, tuple(up_has_attention)))
    if ldm is None:
        raise AdapterhubError(f"cannot convert UNet key {key!r} to the original layout "
                              "(fuse or detach attached adapters before saving)")
    return ldm


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    return {UNET_PREFIX + unet_key_to_ldm(k, config.layers_per_block, up_has_attention): v
            for k, v in unet.state_dict().items()}


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)"
                        r"\.(\d+)\.(.+)$")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """``decoder.up_blocks.0.resnets.1.conv1.weight`` -> ``decoder.up.3.block.1.conv1.weight`` (no prefix)."""
    m = _VAE_BLOCK.match(key)
    if m:
        part, block, kind, j, rest = m[1], int(m[3]), m[4], int(m[5]), m[6]
        if part == "decoder":  # the original numbers decoder levels from the lowest resolution up
            block = num_up_blocks - 1 - block
        level = f"{part}.{'down' if part == 'encoder' else 'up'}.{block}"
        if kind == "resnets":
            return f"{level}.block.{j}.{rename_first(rest, [('conv_shortcut', 'nin_shortcut')])}"
        return f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    m = _VAE_MID.match(key)
    if m:
        if m[2] == "attentions":
            return f"{m[1]}.mid.attn_1.{rename_first(m[4], _VAE_ATTENTION)}"
        return f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4]}"
    return key.replace("conv_norm_out", "norm_out")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # the original attention is 1x1 convolutions
        out[VAE_PREFIX + new] = value
    return out


# --------------------------------------------------------------------------------------------
# text encoders
# --------------------------------------------------------------------------------------------
def _text_state(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattens CLIPTextModel (no "text_model." prefix); older versions and
    # CLIPTextModelWithProjection keep it. Work on the flat names either way.
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _text_state(text_encoder).items()}


_OPENCLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
_OPENCLIP_TOP = (("embeddings.token_embedding.weight", "token_embedding.weight"),
                 ("embeddings.position_embedding.weight", "positional_embedding"), ("final_layer_norm", "ln_final"))
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)$")


def openclip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in _text_state(text_encoder).items():
        m = _LAYER.match(key)
        if m and _QKV.match(m[2]):
            q = _QKV.match(m[2])
            qkv.setdefault((int(m[1]), q[2]), {})[q[1]] = value
        elif m:
            out[f"{prefix}transformer.resblocks.{m[1]}.{rename_first(m[2], _OPENCLIP_LAYER)}"] = value
        elif key == "text_projection.weight":  # OpenCLIP multiplies x @ P; a Linear stores P transposed
            out[prefix + "text_projection"] = value.T.contiguous()
        else:
            renamed = rename_first(key, _OPENCLIP_TOP)
            if renamed == key:
                raise AdapterhubError(f"cannot convert text-encoder key {key!r} to the OpenCLIP layout")
            out[prefix + renamed] = value
    for (layer, kind), parts in sorted(qkv.items()):
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    return out


# --------------------------------------------------------------------------------------------
# whole pipelines
# --------------------------------------------------------------------------------------------
def _layout_family(pipe, arch: str) -> str:
    if arch in FAMILY:
        return FAMILY[arch]
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


def original_state_dict(pipe, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoders in the ldm/sgm single-file key layout."""
    arch = arch or detect_architecture(pipe)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for component, prefix, layout in TEXT_LAYOUTS[_layout_family(pipe, arch)]:
        encoder = getattr(pipe, component, None)
        if encoder is None:
            raise AdapterhubError(f"cannot save a {arch} checkpoint: the pipeline has no {component}")
        convert = clip_to_ldm if layout == "clip" else openclip_to_ldm
        state.update(convert(encoder, prefix))
    return state


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _checkpoint_metadata(arch: str) -> dict[str, str]:
    metadata = {METADATA_KEY: arch}
    if arch in MODELSPEC:
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC[arch]})
    return metadata


def _cast_folder(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file under ``folder`` with its floating tensors cast to ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(_cast(tensors, dtype), str(path), metadata=metadata)


def save_pipeline(pipe, out: str | Path, dtype: torch.dtype | None = None,
                  metadata: dict[str, str] | None = None) -> Path:
    """Save ``pipe`` atomically: ``*.safetensors`` as one original-layout checkpoint, anything else as a
    diffusers folder. ``dtype`` casts the floating tensors written (the pipeline itself is untouched);
    ``metadata`` goes into a single file's header (training metadata), under our architecture keys."""
    out = Path(out)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer  # SD3 / Flux pipelines have a transformer
    if any(p.device.type == "meta" for p in denoiser.parameters()):
        raise AdapterhubError(f"{out}: cannot save a model built on the meta device (it has no weights)")
    if out.suffix.lower() == ".safetensors" and getattr(pipe, "unet", None) is None:
        raise AdapterhubError(f"{out}: single-file checkpoints of SD3 / Flux models are not written yet "
                              "(name a folder for a diffusers model)")
    if out.suffix.lower() == ".safetensors":
        arch = detect_architecture(pipe)
        save_safetensors(_cast(original_state_dict(pipe, arch), dtype), out,
                         {**(metadata or {}), **_checkpoint_metadata(arch)})
        return out
    if out.suffix.lower() in {".ckpt", ".pt", ".pth", ".bin", ".sft"}:
        raise AdapterhubError(f"{out}: single-file checkpoints are written as .safetensors only")
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            _cast_folder(tmp, dtype)
    return out


def component_tensors(pipe) -> dict[str, Any]:
    """Every UNet / VAE / text-encoder tensor under ``component.key`` (for comparisons and hashing)."""
    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return out
