"""Writing LoRA-family files in every layout that exists for them, and the small random examples.

* ``kohya`` / ``lycoris`` / ``a1111`` (the same tensors): ``lora_unet_…`` / ``lora_te_…`` names with
  ``lora_down`` / ``lora_up`` / ``alpha`` (LoHa / LoKr: the LyCORIS ``hada_*`` / ``lokr_*`` names). Module
  names as kohya's scripts write them for the base (:func:`adapterhub.keymaps.kohya_name`): SD1/SD2 UNets
  by their diffusers paths, SDXL UNets by their sgm paths (``lora_unet_input_blocks_4_1_…``) with
  ``lora_te1_`` / ``lora_te2_``. What AUTOMATIC1111, ComfyUI, kohya sd-scripts, LyCORIS and diffusers load.
* ``diffusers``: one file that diffusers' ``load_lora_weights`` and ComfyUI's LoRA loader both read in
  full. ComfyUI names a diffusers UNet's attention projections only in the attention-processor form, so
  the UNet is written in the two older diffusers forms that both read: ``unet.<attention>.processor.
  to_q_lora.down.weight`` (``to_k`` / ``to_v`` / ``to_out``) and ``unet.<module path>.lora.down.weight`` /
  ``lora.up.weight`` for every other module (diffusers reads these forms only when no UNet key is in the
  PEFT form, hence none is). Text encoders: ``text_encoder.<module path>.lora_A.weight`` / ``lora_B.weight``
  (and ``text_encoder_2.…``), what ``save_lora_weights`` writes.
  Each module's ``alpha / rank`` is baked into ``lora_B``: without a ``lora_adapter_metadata`` config,
  diffusers (and ComfyUI, InvokeAI) take ``alpha = rank`` for this layout, so every reader then gets
  the same delta. A baked tensor keeps the source's dtype where that is exact and is float32 otherwise.
* ``peft``: a folder with one PEFT adapter per component, ``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, each ``adapter_config.json`` (written by PEFT's own ``LoraConfig`` / ``LoHaConfig``)
  + ``adapter_model.safetensors`` with ``base_model.model.<module path>.lora_A.weight`` keys; load one with
  ``PeftModel.from_pretrained(pipe.unet, folder, subfolder="unet")``. Per-module ranks and alphas go to
  ``rank_pattern`` / ``alpha_pattern``; alphas stay as they were (PEFT scales by ``alpha / r`` too).
  Text-encoder paths are written without ``text_model.`` (transformers 5 flattens ``CLIPTextModel``; the
  patterns still match the older nesting, whose names end the same way).

A DoRA module (:mod:`.dora`) keeps its magnitude exactly: ``dora_scale`` in the kohya layouts (as read; PEFT's
per-row ``(out,)`` as LyCORIS' ``(out, 1, ...)``), ``lora_magnitude_vector`` with ``use_dora`` in the peft one
(per output row only: PEFT has no per-input-channel form). In the diffusers layout a component with DoRA is
written in the PEFT form diffusers' ``save_lora_weights`` writes for a ``use_dora`` model, every module of it
(the UNet's too: the older UNet forms have no magnitude key): ``<component>.<module path>.lora_A.weight`` /
``lora_B.weight`` (alpha baked in, as above) / ``lora_magnitude_vector.weight`` (per output row only, as PEFT).
diffusers turns DoRA on per component when its keys hold a magnitude, so a component has it on every module or
on none (a mix is refused). ComfyUI's loader reads a DoRA magnitude only as ``dora_scale``: for it and the webui a
DoRA file is written as kohya.

LoRA, LoCon (a CP/Tucker ``lora_mid`` core is folded into ``lora_A`` exactly) and AdaLoRA (PEFT AdaLoRA in
the ``peft`` layout, its default; elsewhere the LoRA it equals, ``A * E``, which reads back as a ``lora``) have
every layout; LoHa has the LyCORIS and PEFT ones; LoKr and full
diffs (``diff`` / ``w_norm``) only the LyCORIS one.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from adapterhub.archs import arch_from_context_width
from adapterhub.errors import AdapterError
from adapterhub.io import atomic_dir, save_safetensors
from adapterhub.keymaps import kohya_arch, kohya_name
from adapterhub.types import Adapter
from adapterhub.weights import architecture_of

from . import math as lmath
from .dora import ROW, DoRAPatch
from .patches import AdaLoRAPatch, DiffPatch, LoHaPatch, LoKrPatch, LoRAPatch
from .targets import target_modules

NETWORK_MODULE = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                  "lokr": "lycoris.kohya", "adalora": "networks.lora"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")  # the transformer: Flux / SD3
TRANSFORMER_FAMILIES = ("flux", "sd3")
KOHYA_FAMILY_META = {"flux": {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"},
                     "sd3": {"ss_base_model_version": "sd3", "ss_network_module": "networks.lora_sd3"}}
KOHYA_LAYOUTS = ("kohya", "lycoris", "a1111")
SAVE_LAYOUTS = (*KOHYA_LAYOUTS, "diffusers", "peft")
STALE_METADATA = ("lora_adapter_metadata",)  # a config for the layout read, wrong for the one written


def _alpha(patch) -> torch.Tensor:
    # alpha written so that a reader's alpha/rank reproduces our scale exactly
    return torch.tensor(float(patch.scale) * float(patch.rank), dtype=torch.float32)


def naming_arch(adapter: Adapter) -> str:
    """The architecture whose kohya names the adapter is written with: its base, or, when it does not say,
    the one its UNet cross-attention width tells (an SDXL UNet-only adapter has no ``text_encoder_2``)."""
    base = adapter.base
    if base in (None, "", "unknown"):
        widths = {p.in_features for p in adapter.patches.values()
                  if p.target.startswith("unet.") and p.target.endswith(("attn2.to_k", "attn2.to_v"))}
        base = next((arch_from_context_width(w) for w in sorted(w for w in widths if w)), base)
    return kohya_arch(base, [p.target for p in adapter.patches.values()])


def kohya_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    if adapter.family in TRANSFORMER_FAMILIES:  # BFL / sd-scripts names, fused modules joined
        from .transformer_save import kohya_tensors as transformer_kohya_tensors

        return transformer_kohya_tensors(adapter, lambda name, patch: module_tensors(adapter, name, patch))
    arch = naming_arch(adapter)
    out: dict[str, torch.Tensor] = {}
    for patch in adapter.patches.values():
        out.update(module_tensors(adapter, kohya_name(patch.target, arch), patch))
    return out


def module_tensors(adapter: Adapter, name: str, patch) -> dict[str, torch.Tensor]:
    """One module's kohya / LyCORIS tensors under ``name``."""
    out: dict[str, torch.Tensor] = {}
    t = patch.tensors
    if isinstance(patch, DoRAPatch):  # the inner module's tensors and the magnitude, as LyCORIS names it
        return {**module_tensors(adapter, name, patch.inner), f"{name}.dora_scale": kohya_magnitude(patch)}
    if isinstance(patch, AdaLoRAPatch):
        out[f"{name}.lora_down.weight"] = (t["down"].float() * t["E"].float()).contiguous()
        out[f"{name}.lora_up.weight"] = t["up"]
        out[f"{name}.alpha"] = _alpha(patch)
    elif isinstance(patch, LoRAPatch):
        out[f"{name}.lora_down.weight"] = t["down"]
        out[f"{name}.lora_up.weight"] = t["up"]
        if "mid" in t:
            out[f"{name}.lora_mid.weight"] = t["mid"]
        out[f"{name}.alpha"] = _alpha(patch)
    elif isinstance(patch, (LoHaPatch, LoKrPatch)):
        out.update({f"{name}.{k}": v for k, v in t.items()})
        if patch.rank:
            out[f"{name}.alpha"] = _alpha(patch)
        elif patch.alpha is not None:  # both LoKr factors whole: scale 1, but LyCORIS' loader needs an alpha
            out[f"{name}.alpha"] = torch.tensor(float(patch.alpha), dtype=torch.float32)
    elif isinstance(patch, DiffPatch):
        out[f"{name}.{'diff' if patch.param == 'weight' else 'diff_b'}"] = t["diff"]
    else:  # pragma: no cover - every family patch is listed above
        raise AdapterError(adapter.path, f"cannot write {type(patch).__name__} in the kohya layout")
    return out


def kohya_magnitude(patch: DoRAPatch) -> torch.Tensor:
    """The magnitude as kohya / LyCORIS files hold it: the file's own where its shape tells its side; PEFT's
    per-row one (``(out,)``, a conv's ``(1, out, 1, 1)``) as LyCORIS' ``wd_on_out`` one, ``(out, 1, ...)`` with
    the weight's number of dimensions (same values)."""
    m = patch.magnitude
    if patch.side is None:
        return m
    dims = len(patch.expected_shape() or (0, 0))
    return m.reshape(-1).reshape(-1, *[1] * (dims - 1)).contiguous()


def peft_magnitude(adapter: Adapter, patch: DoRAPatch, layout: str = "peft") -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` (also diffusers', which loads it with PEFT): per output row, ``(out,)`` for
    a Linear, ``(1, out, 1, 1)`` for a conv; a per-input-channel magnitude (LyCORIS ``wd_on_out=False``,
    OneTrainer) has no PEFT form and is refused, naming ``layout``."""
    shape = patch.expected_shape()
    if patch.side_for(shape) != ROW:
        raise AdapterError(adapter.path, f"a DoRA magnitude per input channel has no {layout} layout (PEFT's "
                                         "lora_magnitude_vector is per output row); write it as kohya", patch.source)
    m = patch.magnitude.reshape(-1)
    return (m.reshape(1, -1, 1, 1) if len(shape) == 4 else m).contiguous()


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    meta = dict(adapter.metadata)
    ranks = sorted({p.rank for p in adapter.patches.values() if getattr(p, "rank", None)})
    if adapter.family in KOHYA_FAMILY_META and adapter.type in ("lora", "locon", "adalora"):
        meta.setdefault("ss_network_module", KOHYA_FAMILY_META[adapter.family]["ss_network_module"])
    meta.setdefault("ss_network_module", NETWORK_MODULE.get(adapter.type, "networks.lora"))
    if ranks:
        meta.setdefault("ss_network_dim", str(ranks[0]) if len(ranks) == 1 else "Dynamic")
    if adapter.type in ("loha", "lokr"):
        meta.setdefault("ss_network_args", json.dumps({"algo": adapter.type}))
    if adapter.family in KOHYA_FAMILY_META:  # sd-scripts' own value for its Flux / SD3 networks
        meta.setdefault("ss_base_model_version", KOHYA_FAMILY_META[adapter.family]["ss_base_model_version"])
    if adapter.base in ("sdxl",):
        meta.setdefault("ss_base_model_version", "sdxl_base_v1-0")
    elif adapter.base == "sd2":
        meta.setdefault("ss_v2", "True")
    for key in STALE_METADATA:
        meta.pop(key, None)
    return meta


# ---------------------------------------------------------------------------------------------
# diffusers and PEFT
# ---------------------------------------------------------------------------------------------
def _split_target(adapter: Adapter, patch) -> tuple[str, str]:
    """(component, module path inside it); only Stable Diffusion components have these layouts."""
    component, _, path = patch.target.partition(".")
    if component not in COMPONENTS or patch.param != "weight":
        raise AdapterError(adapter.path, f"{patch.target}#{patch.param} is not a weight of a Stable Diffusion "
                                         "UNet or text encoder; only the kohya layout can carry it", patch.source)
    return component, path


def low_rank(adapter: Adapter, patch, layout: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, scale)`` in the shapes PEFT's LoRA layers hold: Linear up (out, r), down (r, in);
    conv up (out, r, 1, 1), down (r, in, kh, kw). The file's own tensors where they already are that
    (dtype kept); a LoCon CP core folded into ``down`` and an AdaLoRA ``A * E``, float32. A DoRA module is
    refused (its magnitude would be lost): its writers pass its inner patch and write the magnitude themselves
    (:func:`_lora_component`, :func:`diffusers_dora`)."""
    if isinstance(patch, DoRAPatch):
        raise AdapterError(adapter.path, f"a DoRA module has no {layout} layout here (its magnitude would be lost); "
                                         "write it as kohya", patch.source)
    if isinstance(patch, LoRAPatch) and "mid" not in patch.tensors:
        return patch.tensors["up"], patch.tensors["down"], float(patch.scale)
    if isinstance(patch, (LoRAPatch, AdaLoRAPatch)):
        up, down, scale = patch.low_rank_factors()
        return (*lmath.conv_factors(up, down, tuple(patch.expected_shape())), scale)
    raise AdapterError(adapter.path, f"a {patch.kind} module has no {layout} layout (only LoRA, LoCon and AdaLoRA "
                                     "modules do); write it as kohya", patch.source)


def baked(up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * up``: in ``up``'s dtype when that is exact, else float32 (a delta must not move)."""
    if scale == 1.0:
        return up
    scaled = up.float() * scale
    if up.dtype != torch.float32:
        cast = scaled.to(up.dtype)
        if torch.equal(cast.float(), scaled):
            return cast
    return scaled


# diffusers attention projection -> its attention-processor LoRA name (diffusers' UNET_TO_DIFFUSERS inverted)
ATTENTION_PROCESSOR = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def diffusers_key_stems(target: str) -> tuple[str, str]:
    """The (down, up) key names of ``target`` in our diffusers layout (see the module docstring)."""
    component, _, path = target.partition(".")
    if component != "unet":
        return f"{target}.lora_A.weight", f"{target}.lora_B.weight"
    for projection, processor in ATTENTION_PROCESSOR.items():
        if path.endswith("." + projection):
            attention = target[: -len(projection) - 1]
            return f"{attention}.processor.{processor}.down.weight", f"{attention}.processor.{processor}.up.weight"
    return f"{target}.lora.down.weight", f"{target}.lora.up.weight"


def diffusers_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    refuse_dora_mix(adapter)  # before anything is built
    for patch in adapter.patches.values():
        _split_target(adapter, patch)
        if isinstance(patch, DoRAPatch):
            out.update(diffusers_dora(adapter, patch))
            continue
        up, down, scale = low_rank(adapter, patch, "diffusers")
        down_key, up_key = diffusers_key_stems(patch.target)
        out[down_key] = down.contiguous()
        out[up_key] = baked(up, scale).contiguous()
    return out


def refuse_dora_mix(adapter: Adapter) -> None:
    """Refuse a component (``unet``, ``text_encoder``, ``transformer``, ...) with DoRA on some modules only.
    diffusers builds one PEFT config per component and turns ``use_dora`` on for all of it when any of its keys
    holds a magnitude: a plain module there would get a magnitude of PEFT's making (its base weight's norm), so
    not the LoRA written."""
    grouped: dict[str, list] = {}
    for patch in adapter.patches.values():
        grouped.setdefault(patch.target.partition(".")[0], []).append(patch)
    for component, patches in grouped.items():
        plain = [p for p in patches if not isinstance(p, DoRAPatch)]
        if plain and len(plain) < len(patches):
            raise AdapterError(adapter.path, f"diffusers reads DoRA on every module of a component or on none, and "
                                             f"this {component} mixes them ({plain[0].target} has no magnitude); "
                                             "write it as kohya", plain[0].source)


def diffusers_dora(adapter: Adapter, patch: DoRAPatch) -> dict[str, torch.Tensor]:
    """One DoRA module as diffusers' ``save_lora_weights`` writes a PEFT ``use_dora`` one, under its target
    (``unet.<module path>`` too: diffusers' older UNet forms have no magnitude, and it reads the PEFT form for
    the whole UNet when the UNet's first key is in it): ``lora_A.weight``, ``lora_B.weight`` with alpha baked
    in (diffusers reads no alpha here) and the magnitude (:func:`peft_magnitude`) as
    ``lora_magnitude_vector.weight``, the parameter's own name: PEFT's loader (the UNet, the transformer) takes it
    with or without ``.weight``, transformers 5's (the text encoders) only with it. The norm is taken of
    ``W + up @ down`` either way, so baking the scale into ``up`` keeps the result."""
    up, down, scale = low_rank(adapter, patch.inner, "diffusers")
    return {f"{patch.target}.lora_A.weight": down.contiguous(),
            f"{patch.target}.lora_B.weight": baked(up, scale).contiguous(),
            f"{patch.target}.lora_magnitude_vector.weight": peft_magnitude(adapter, patch, "diffusers")}


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with storage of its own (safetensors refuses shared memory): the parts of a fused
    module read from one file hold the same ``down``."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def diffusers_metadata(adapter: Adapter) -> dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k not in STALE_METADATA}
    meta.setdefault("format", "pt")
    return meta


def peft_path(component: str, path: str) -> str:
    """The module name inside the component's model that PEFT matches (see the module docstring)."""
    return path.removeprefix("text_model.") if component == "text_encoder" else path


def _patterns(values: dict[str, float], default) -> dict[str, float]:
    return {re.escape(path): value for path, value in sorted(values.items()) if value != default}


def _lora_component(adapter: Adapter, patches: dict[str, object]):
    from peft import LoraConfig

    tensors, ranks, alphas = {}, {}, {}
    dora = [p for p in patches.values() if isinstance(p, DoRAPatch)]
    if dora and len(dora) != len(patches):  # PEFT's use_dora is one flag for the whole model
        raise AdapterError(adapter.path, "a PEFT adapter has DoRA on every module or on none, and this one mixes "
                                         "them; write it as kohya", dora[0].source)
    for path, patch in patches.items():
        inner = patch.inner if isinstance(patch, DoRAPatch) else patch
        up, down, scale = low_rank(adapter, inner, "peft")
        rank = int(down.shape[0])
        exact = isinstance(inner, LoRAPatch) and inner._scale is None and inner.alpha is not None
        ranks[path], alphas[path] = rank, float(inner.alpha) if exact else scale * rank
        tensors[f"base_model.model.{path}.lora_A.weight"] = down.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = up.contiguous()
        if inner is not patch:
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = peft_magnitude(adapter, patch)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(patches), rank_pattern=_patterns(ranks, r),
                        alpha_pattern=_patterns(alphas, alpha), init_lora_weights=True, use_dora=bool(dora))
    return tensors, config


def _loha_component(adapter: Adapter, patches: dict[str, LoHaPatch]):
    from peft import LoHaConfig

    tensors, ranks, alphas = {}, {}, {}
    for path, patch in patches.items():
        ranks[path] = int(patch.rank)
        alphas[path] = float(patch.alpha) if patch._scale is None and patch.alpha is not None \
            else float(patch.scale) * patch.rank
        tensors.update({f"base_model.model.{path}.{role}": t.contiguous() for role, t in patch.tensors.items()})
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # PEFT decides CP (``hada_t1``) per layer from this one flag: every kxk conv, never a 1x1 or Linear
    config = LoHaConfig(r=r, alpha=alpha, target_modules=sorted(patches), rank_pattern=_patterns(ranks, r),
                        alpha_pattern=_patterns(alphas, alpha), init_weights=True,
                        use_effective_conv2d=any(p.cp for p in patches.values()))
    return tensors, config


def _adalora_component(adapter: Adapter, patches: dict[str, AdaLoRAPatch]):
    """PEFT AdaLoRA, as ``save_pretrained`` writes it: ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r)
    without ``.weight``, and an ``AdaLoraConfig`` whose ``init_r`` is the ``ranknum`` PEFT scales by; a module
    the rank allocator left with fewer ranks gets its ``rank_pattern`` mask (kept ranks first), as PEFT records
    a pruned module and resizes it on loading. One config holds one ``lora_alpha`` and one ``init_r``."""
    from peft import AdaLoraConfig

    alphas = {float(p.lora_alpha) for p in patches.values()}
    ranknums = {p.ranknum or p.rank for p in patches.values()}
    if len(alphas) > 1 or len(ranknums) > 1:
        first = next(iter(patches.values()))
        raise AdapterError(adapter.path, "AdaLoRA modules with different lora_alpha or initial ranks have no one "
                                         "PEFT config; write it as kohya", first.source)
    init_r = int(ranknums.pop())
    tensors, pattern = {}, {}
    for path, patch in patches.items():
        t = patch.tensors
        tensors.update({f"base_model.model.{path}.lora_{role}": t[key].contiguous()
                        for role, key in (("A", "down"), ("E", "E"), ("B", "up"))})
        if patch.rank != init_r:
            pattern[f"{path}.lora_E"] = [True] * patch.rank + [False] * (init_r - patch.rank)
    config = AdaLoraConfig(init_r=init_r, target_r=min(p.rank for p in patches.values()), lora_alpha=alphas.pop(),
                           target_modules=sorted(patches), total_step=_total_step(adapter), tinit=0, tfinal=0,
                           rank_pattern=pattern or None)
    return tensors, config


def _total_step(adapter: Adapter) -> int:
    """The run's length for ``AdaLoraConfig`` (which refuses none): the source's own config or training
    metadata, else 1 (it only schedules a training run; loading ignores it)."""
    for value in ((adapter.file.config or {}).get("total_step") if adapter.file is not None else None,
                  adapter.metadata.get("ss_max_train_steps")):
        try:
            if value is not None and int(value) > 0:
                return int(value)
        except (TypeError, ValueError):
            continue
    return 1


def peft_components(adapter: Adapter) -> dict[str, tuple[dict[str, torch.Tensor], object]]:
    """component -> (tensors, PEFT config) for each component the adapter changes."""
    grouped: dict[str, dict[str, object]] = {}
    for patch in adapter.patches.values():
        component, path = _split_target(adapter, patch)
        grouped.setdefault(component, {})[peft_path(component, path)] = patch
    out = {}
    for component, patches in grouped.items():
        if all(isinstance(p, LoHaPatch) for p in patches.values()):
            out[component] = _loha_component(adapter, patches)
        elif all(isinstance(p, AdaLoRAPatch) for p in patches.values()):
            out[component] = _adalora_component(adapter, patches)
        elif any(isinstance(p, (LoHaPatch, LoKrPatch)) for p in patches.values()):
            first = next(p for p in patches.values() if isinstance(p, (LoHaPatch, LoKrPatch)))
            why = ("PEFT's LoKr chooses its factor shapes from its own config and cannot hold a LyCORIS file's"
                   if isinstance(first, LoKrPatch) else "a PEFT adapter holds one method per model")
            raise AdapterError(adapter.path, f"a {first.kind} module has no peft layout here ({why}); "
                                             "write it as kohya", first.source)
        else:
            out[component] = _lora_component(adapter, patches)
    return out


def write_peft(adapter: Adapter, path: Path) -> Path:
    components = peft_components(adapter)
    if not components:
        raise AdapterError(adapter.path, "no modules to write")
    meta = diffusers_metadata(adapter)
    with atomic_dir(path) as tmp:
        for component, (tensors, config) in components.items():
            folder = tmp / component
            folder.mkdir()
            save_safetensors(unshared(tensors), folder / "adapter_model.safetensors", meta)
            config.save_pretrained(str(folder))
    return path


def save(adapter: Adapter, path: Path, format: str) -> Path:
    if format in KOHYA_LAYOUTS:
        return save_safetensors(unshared(kohya_tensors(adapter)), path, kohya_metadata(adapter))
    if format == "diffusers":
        return save_safetensors(unshared(diffusers_tensors(adapter)), path, diffusers_metadata(adapter))
    if format == "peft":
        return write_peft(adapter, Path(path))
    raise AdapterError(path, f"cannot save a {adapter.type} in the {format!r} layout "
                             f"(layouts: {', '.join(SAVE_LAYOUTS)})")


# ---------------------------------------------------------------------------------------------
# random examples
# ---------------------------------------------------------------------------------------------
def _randn(gen: torch.Generator, *shape, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _example_module(kind: str, module, rank: int, gen) -> dict[str, torch.Tensor]:
    w = module.weight
    out, fan_in = w.shape[0], w[0].numel()
    kernel = tuple(w.shape[2:])
    r = min(rank, out, fan_in)
    std_up = 0.5 / r ** 0.5
    if kind in ("lora", "locon"):
        down = _randn(gen, r, w.shape[1], *kernel, std=1 / fan_in ** 0.5)
        up = _randn(gen, out, r, *(1,) * len(kernel), std=std_up)
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(r) / 2)}
    if kind == "loha":
        return {"hada_w1_a": _randn(gen, out, r, std=std_up), "hada_w1_b": _randn(gen, r, fan_in, std=1 / fan_in ** 0.5),
                "hada_w2_a": _randn(gen, out, r, std=1.0), "hada_w2_b": _randn(gen, r, fan_in, std=1 / fan_in ** 0.5),
                "alpha": torch.tensor(float(r))}
    raise AdapterError(None, f"no example writer for {kind}")


def write_example(kind: str, model, path: Path, seed: int = 0, rank: int = 4, text: bool = True) -> Path:
    """A random adapter of ``kind`` for every module that kind targets in ``model``."""
    gen = torch.Generator().manual_seed(seed)
    targets = target_modules(model, conv=kind in ("locon", "loha"), text=text)
    if kind == "lora":
        targets = {k: m for k, m in targets.items() if m.weight.dim() == 2 or m.weight.shape[2:] == (1, 1)}
    if kind == "adalora":
        return _write_adalora(model, targets, path, gen, rank)
    arch = kohya_arch(architecture_of(model), targets)
    tensors = {}
    for target, module in targets.items():
        for suffix, tensor in _example_module(kind, module, rank, gen).items():
            tensors[f"{kohya_name(target, arch)}.{suffix}"] = tensor.contiguous()
    meta = {"ss_network_module": NETWORK_MODULE[kind], "ss_network_dim": str(rank),
            "ss_output_name": path.stem, "adapterhub.example": kind}
    if kind == "loha":
        meta["ss_network_args"] = json.dumps({"algo": "loha"})
    return save_safetensors(tensors, path, meta)


def _write_adalora(model, targets, path: Path, gen, rank: int) -> Path:
    """A PEFT AdaLoRA folder for the UNet (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    tensors, names = {}, []
    for target, module in targets.items():
        if not target.startswith("unet.") or module.weight.dim() != 2:
            continue
        path_in_unet = target.split(".", 1)[1]
        out, fan_in = module.weight.shape
        base = f"base_model.model.{path_in_unet}"
        tensors[f"{base}.lora_A"] = _randn(gen, rank, fan_in, std=1 / fan_in ** 0.5)
        tensors[f"{base}.lora_E"] = _randn(gen, rank, 1, std=1.0)
        tensors[f"{base}.lora_B"] = _randn(gen, out, rank, std=0.5)
        names.append(path_in_unet)  # whole paths: a last part like "0" (to_out.0) also names other modules
    config = {"peft_type": "ADALORA", "r": rank, "init_r": rank, "target_r": max(1, rank // 2),
              "lora_alpha": float(rank), "target_modules": sorted(set(names)), "total_step": 100,
              "task_type": None, "base_model_name_or_path": "tiny"}
    with atomic_dir(path) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
