"""Helpers for the LoRA-family tests: tiny bases, reference pipelines, weight comparisons, and
independent (test-side) name conversions.

The bases are the project's embedded tiny recipes (``adapterhub.base.build_preset``), built from a
fixed seed: building is deterministic and cheaper than a deep copy, so every model a test needs is
built fresh. The reference pipelines are plain objects carrying diffusers' LoRA loader mixins, so
``load_lora_weights`` / ``fuse_lora`` / ``unload_lora_weights`` run exactly as on a real pipeline.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import torch

SEED = 4321
ATOL = 1e-5
PARTS = {"tiny-sd1": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2"),
         "sd1": ("unet", "text_encoder"), "sd2": ("unet", "text_encoder"),
         "sdxl": ("unet", "text_encoder", "text_encoder_2")}


def quiet() -> None:
    """Quieter reference libraries (their own loggers only; nothing process-wide)."""
    for name in ("diffusers", "peft", "transformers", "lycoris", "LyCORIS"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


# ---------------------------------------------------------------------------------------------
# bases
# ---------------------------------------------------------------------------------------------
def parts(arch: str = "tiny-sd1", seed: int = SEED, dtype: torch.dtype | None = None, device: str = "cpu"):
    """UNet and text encoder(s) of ``arch`` (an object with ``unet``/``text_encoder``/...)."""
    from adapterhub.base import build_preset

    return build_preset(arch, device=device, components=PARTS[arch], seed=seed, dtype=dtype)


def _reference_class(arch: str):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    mixin = StableDiffusionXLLoraLoaderMixin if "sdxl" in arch else StableDiffusionLoraLoaderMixin

    class ReferencePipe(mixin):
        hf_device_map = None

        def __init__(self, built):
            self._names = PARTS[arch]
            for name in self._names:
                setattr(self, name, getattr(built, name))

        @property
        def components(self):
            return {n: getattr(self, n) for n in self._names}

    return ReferencePipe


def reference_pipe(arch: str = "tiny-sd1", seed: int = SEED, dtype: torch.dtype | None = None):
    return _reference_class(arch)(parts(arch, seed, dtype))


def weights(model) -> dict[str, torch.Tensor]:
    """``component.param`` -> tensor for every component of a pipe-like object."""
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(model, comp, None)
        if module is not None:
            out.update({f"{comp}.{k}": v for k, v in module.state_dict().items()})
    return out


def frozen_parameters(pipe, adapter_markers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every base parameter of a PEFT-wrapped pipeline under its plain name: tensors whose names hold one of
    ``adapter_markers`` (the adapter's own) left out, ``base_layer`` dropped from the names."""
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        for name, p in getattr(pipe, comp).named_parameters():
            if not any(marker in name for marker in adapter_markers):
                out[f"{comp}.{name.replace('.base_layer', '')}"] = p.detach()
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights(model).items()}


def diffusers_fused(arch: str, files_and_weights, seed: int = SEED) -> dict[str, torch.Tensor]:
    """The reference: diffusers ``load_lora_weights`` of each file, then ``fuse_lora`` at the weights.

    One adapter: ``fuse_lora(lora_scale=w)``. Several: ``set_adapters(names, weights)`` then
    ``fuse_lora``. ``unload_lora_weights`` afterwards keeps the fused weights and removes the PEFT
    layers, so the state dict has the base model's names again.
    """
    ref = reference_pipe(arch, seed)
    names = []
    for i, (path, _) in enumerate(files_and_weights):
        ref.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    ws = [w for _, w in files_and_weights]
    if len(names) == 1:
        ref.fuse_lora(lora_scale=ws[0], adapter_names=names)
    else:
        ref.set_adapters(names, adapter_weights=ws)
        ref.fuse_lora(adapter_names=names)
    ref.unload_lora_weights()
    out = weights(ref)
    assert not any("lora" in k or "base_layer" in k for k in out), "reference still holds LoRA layers"
    return out


def ours_merged(arch: str, adapters_and_weights, seed: int = SEED, dtype=None) -> dict[str, torch.Tensor]:
    """Our merge of ``(adapter or path, weight)`` pairs into a fresh base, as one call."""
    import adapterhub
    from adapterhub.weights import merge

    pipe = parts(arch, seed, dtype)
    pairs = [(adapterhub.load(a) if isinstance(a, (str, Path)) else a, w) for a, w in adapters_and_weights]
    merge(pipe, pairs)
    return weights(pipe)


def changed(after: dict, before: dict) -> set[str]:
    return {k for k in before if not torch.equal(after[k], before[k])}


def assert_same_weights(ours: dict, ref: dict, original: dict | None = None, atol: float = ATOL) -> float:
    """Every tensor within ``atol`` (float32); with ``original``, the same set of tensors changed."""
    assert ours.keys() == ref.keys(), sorted(set(ours) ^ set(ref))[:5]
    worst, worst_key = 0.0, None
    for k in ours:
        if torch.equal(ours[k], ref[k]):
            continue
        d = (ours[k].float() - ref[k].float()).abs().max().item()
        if d > worst:
            worst, worst_key = d, k
    assert worst <= atol, f"max abs error {worst:.3g} at {worst_key}"
    if original is not None:
        ours_changed, ref_changed = changed(ours, original), changed(ref, original)
        assert ours_changed == ref_changed, sorted(ours_changed ^ ref_changed)[:5]
        assert ours_changed, "nothing changed: the comparison would be vacuous"
    return worst


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.1, only=None) -> int:
    """Fill parameters (those whose name contains one of ``only``) with N(0, std^2); returns the count."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or any(s in name for s in only):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                n += 1
    return n


def safetensors_header_keys(path) -> list[str]:
    """Tensor keys in the order of the file's own JSON header (read independently of adapterhub)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


# ---------------------------------------------------------------------------------------------
# independent name conversions (written from formats.md §0.1, for building files and checking maps)
# ---------------------------------------------------------------------------------------------
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return SGM_RESNET.get(head, head) + ("." + tail if tail else "")


def diffusers_to_sgm(path: str, layers_per_block: int = 2, up_has_attention=(True, True, False)) -> str:
    """A diffusers UNet module path -> the ldm/sgm path (A1111 / LyCORIS block map, SDXL layout)."""
    per = layers_per_block + 1
    for old, new in SGM_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + per * i + j}.0.{_resnet_rest(rest)}"
        return f"input_blocks.{1 + per * i + j}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)$", path)
    if m:
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op{m[2]}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)$", path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)$", path)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{per * i + j}.0.{_resnet_rest(rest)}"
        return f"output_blocks.{per * i + j}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)$", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{per * i + layers_per_block}.{2 if up_has_attention[i] else 1}.conv{m[2]}"
    raise ValueError(f"no sgm name for {path}")


def kohya_te_name(prefix: str, module_path: str) -> str:
    """sd-scripts' TE names carry ``text_model`` (transformers < 5 module paths) for the CLIP
    transformer; ``text_projection`` sits beside it (OneTrainer's ``lora_te2_text_projection``)."""
    if module_path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


def linear_or_conv(module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def kohya_targets(model, conv: bool, text: bool = True):
    """(component, module path, module) as sd-scripts' ``LoRANetwork`` picks them: every Linear/Conv
    child of Transformer2DModel, plus (``conv``) ResnetBlock2D/Downsample2D/Upsample2D children, plus
    CLIPAttention/CLIPMLP children of the text encoders."""
    blocks = ["Transformer2DModel"] + (["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv else [])
    te_blocks = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
    out = []
    comps = [("unet", blocks)] + ([(c, te_blocks) for c in ("text_encoder", "text_encoder_2")] if text else [])
    for comp, kinds in comps:
        root = getattr(model, comp, None)
        if root is None:
            continue
        seen = set()
        for name, block in root.named_modules():
            if type(block).__name__ not in kinds:
                continue
            for child_name, child in block.named_modules():
                path = f"{name}.{child_name}" if child_name else name
                if child_name and linear_or_conv(child) and path not in seen:
                    seen.add(path)
                    out.append((comp, path, child))
    return out


def diffusers_kohya_names(module_names, unet_config) -> dict[str, str]:
    """kohya module name -> the module diffusers' kohya loader puts it on (names only: each module is
    given as a tagged LoRA pair, whatever its type, since the loader renames LoRA keys only)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft,
    )

    sd, tags = {}, {}
    for i, name in enumerate(sorted(module_names)):
        sd[f"{name}.lora_down.weight"] = torch.full((1,), float(i))
        sd[f"{name}.lora_up.weight"] = torch.zeros(1)
        tags[float(i)] = name
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):  # then what load_lora_weights does per component
        part = {k[len(comp) + 1:]: v for k, v in converted.items() if k.split(".")[0] == comp}
        if not part:
            continue
        part = convert_unet_state_dict_to_peft(part) if comp == "unet" else \
            convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        for key, tensor in part.items():
            if ".lora_A." in key:
                out[tags[tensor.item()]] = f"{comp}." + key.split(".lora_A.")[0]
    return out
