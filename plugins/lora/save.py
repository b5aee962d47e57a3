"""Writing LoRA-family files: the kohya/LyCORIS layout (what AUTOMATIC1111, ComfyUI and diffusers load)
and, for AdaLoRA, the PEFT layout. Also the small random example adapters for demo and tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterhub.errors import AdapterError
from adapterhub.io import atomic_dir, save_safetensors
from adapterhub.keymaps import kohya_name
from adapterhub.types import Adapter

from .patches import AdaLoRAPatch, DiffPatch, LoHaPatch, LoKrPatch, LoRAPatch
from .targets import target_modules

NETWORK_MODULE = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                  "lokr": "lycoris.kohya", "adalora": "networks.lora"}


def _alpha(patch) -> torch.Tensor:
    # alpha written so that a reader's alpha/rank reproduces our scale exactly
    return torch.tensor(float(patch.scale) * float(patch.rank), dtype=torch.float32)


def kohya_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    sdxl = adapter.base in ("sdxl", "tiny-sdxl") or any(t.startswith("text_encoder_2.") for t in adapter.patches)
    out: dict[str, torch.Tensor] = {}
    for patch in adapter.patches.values():
        name = kohya_name(patch.target, sdxl)
        t = patch.tensors
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
        elif isinstance(patch, DiffPatch):
            out[f"{name}.{'diff' if patch.param == 'weight' else 'diff_b'}"] = t["diff"]
        else:  # pragma: no cover - every family patch is listed above
            raise AdapterError(adapter.path, f"cannot write {type(patch).__name__} in the kohya layout")
    return out


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    meta = dict(adapter.metadata)
    ranks = sorted({p.rank for p in adapter.patches.values() if getattr(p, "rank", None)})
    meta.setdefault("ss_network_module", NETWORK_MODULE.get(adapter.type, "networks.lora"))
    if ranks:
        meta.setdefault("ss_network_dim", str(ranks[0]) if len(ranks) == 1 else "Dynamic")
    if adapter.type in ("loha", "lokr"):
        meta.setdefault("ss_network_args", json.dumps({"algo": adapter.type}))
    if adapter.base in ("sdxl",):
        meta.setdefault("ss_base_model_version", "sdxl_base_v1-0")
    elif adapter.base == "sd2":
        meta.setdefault("ss_v2", "True")
    meta.pop("lora_adapter_metadata", None)
    return meta


def save(adapter: Adapter, path: Path, format: str) -> Path:
    if format in ("kohya", "lycoris"):
        return save_safetensors(kohya_tensors(adapter), path, kohya_metadata(adapter))
    if format == "peft" and adapter.type == "adalora":
        raise AdapterError(path, "re-writing AdaLoRA in the PEFT layout is not supported yet; use --format kohya")
    raise AdapterError(path, f"cannot save a {adapter.type} in the {format!r} layout (supported: kohya)")


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
    sdxl = any(k.startswith("text_encoder_2.") for k in targets)
    tensors = {}
    for target, module in targets.items():
        for suffix, tensor in _example_module(kind, module, rank, gen).items():
            tensors[f"{kohya_name(target, sdxl)}.{suffix}"] = tensor.contiguous()
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
