"""``inspect`` of a safetensors file reads its header and the few values it shows without torch
(``adapterhub.io.StoredTensor``, ``adapterhub.api.describe``), and shows exactly what parsing the file with
its tensors read by torch shows.

Oracles: torch's own ``item()``, ``.float().item()`` and ``isfinite`` on the tensors the safetensors library
reads; and ``inspect`` through the torch path (the tensors read as ``load`` reads them) on every example
file the registered types write, on LoRA-family files with NaN, float16 / bfloat16 / float64 alphas, and on
the real-world files of ``shared/wild-adapters``.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterhub
from adapterhub import api
from adapterhub.io import StoredTensor, open_adapter_file, stored_view
from adapterhub.plugins import adapter_types

from conftest import WILD_ADAPTERS

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _values(dtype) -> torch.Tensor:
    special = torch.tensor([0.0, -0.0, 1.5, -2.25, 448.0, 1e-3, math.inf, -math.inf, math.nan, 3e38, -1e39])
    return torch.cat([special, torch.randn(53, generator=torch.Generator().manual_seed(0)) * 100]).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS + INTS, ids=str)
def test_stored_values_are_torch_values(dtype, tmp_path):
    values = _values(dtype) if dtype in FLOATS else torch.arange(-3, 61).to(dtype)
    tensors = {"many": values.reshape(8, 8).clone(),
               **{f"one{i}": values[i].reshape(()).clone() for i in range(12)}}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    stored = stored_view(open_adapter_file(path)).tensors()
    theirs = load_file(str(path))
    assert all(isinstance(t, StoredTensor) for t in stored.values())
    for key, t in theirs.items():
        ours = stored[key]
        assert ours.shape == tuple(t.shape) and ours.dim() == t.dim() and ours.numel() == t.numel()
        assert ours.is_floating_point() == t.is_floating_point()
        # (float32 holds every float8 value, NaN and infinity included: torch has no float8 isfinite)
        expected_bad = int(t.numel() - torch.isfinite(t.float()).sum()) if t.is_floating_point() else 0
        assert ours.nonfinite() == expected_bad, key
        if t.numel() == 1:
            for mine, torchs in ((ours.item(), t.item()), (ours.float().item(), t.float().item())):
                assert type(mine) is type(torchs) and (mine == torchs or math.isnan(mine) and math.isnan(torchs)), \
                    (key, mine, torchs)


def _torch_path_inspect(path, monkeypatch) -> dict:
    """The oracle: ``inspect`` with the file's tensors read by torch (no stored view)."""
    with monkeypatch.context() as m:
        m.setattr(api, "stored_view", lambda file: file)
        return api.inspect(path)


def _same_facts(path, monkeypatch) -> dict:
    light = adapterhub.inspect(path)
    assert _jsonish(light) == _jsonish(_torch_path_inspect(path, monkeypatch)), path
    return light


def _jsonish(facts: dict) -> str:
    import json

    return json.dumps(facts, sort_keys=True, default=str)


def _kohya_lora(path, dtype=torch.float32, alpha_dtype=torch.float16, alpha=4.0, nan=False) -> None:
    g = torch.Generator().manual_seed(1)
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {f"{unet}.lora_down.weight": torch.randn(4, 768, generator=g),
               f"{unet}.lora_up.weight": torch.randn(320, 4, generator=g),
               f"{unet}.alpha": torch.tensor(alpha, dtype=alpha_dtype),
               f"{conv}.lora_down.weight": torch.randn(2, 320, 3, 3, generator=g),
               f"{conv}.lora_up.weight": torch.randn(320, 2, 1, 1, generator=g),
               f"{conv}.alpha": torch.tensor(1.0, dtype=alpha_dtype)}
    tensors = {k: v if k.endswith("alpha") else v.to(dtype) for k, v in tensors.items()}
    if nan:
        tensors[f"{unet}.lora_up.weight"][3, 1] = math.nan
        tensors[f"{conv}.lora_down.weight"][0, 0, 0, 0] = math.inf
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})


@pytest.mark.parametrize("case", [
    dict(), dict(dtype=torch.float16), dict(dtype=torch.bfloat16, alpha_dtype=torch.bfloat16),
    dict(alpha_dtype=torch.float64, alpha=0.1), dict(alpha_dtype=torch.int64, alpha=8), dict(nan=True),
    dict(alpha_dtype=torch.float32, alpha=math.inf), dict(alpha_dtype=torch.float64, alpha=1e300),
], ids=str)
def test_lora_facts_without_torch_are_the_facts_with_torch(case, tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    _kohya_lora(path, **case)
    _same_facts(path, monkeypatch)
    adapter, _ = api.describe(path)  # and no tensor was read by torch to say it
    assert all(isinstance(t, StoredTensor) for p in adapter.patches.values() for t in p.tensors.values())


def test_every_example_file_shows_the_same_facts(tiny_sd1, tmp_path, monkeypatch):
    """The example each registered type writes (LoRA, LoCon, LoHa, AdaLoRA, embeddings, hypernetwork,
    ControlNet, T2I-Adapter ...): types whose parse needs the tensors themselves get them, the facts match."""
    written = 0
    for name, adapter_type in adapter_types().items():
        if "example" not in adapter_type.capabilities:
            continue
        path = adapter_type.example(tiny_sd1, tmp_path / f"{name}{adapter_type.example_suffix}", seed=2)
        facts = _same_facts(path, monkeypatch)
        assert facts["type"] == name
        written += 1
    assert written >= 8


WILD = sorted(p for p in WILD_ADAPTERS.glob("*") if p.suffix in (".safetensors", ".sft", ".pti")) \
    if WILD_ADAPTERS.is_dir() else []


@pytest.mark.skipif(not WILD, reason="shared/wild-adapters is not available")
def test_real_world_safetensors_files_show_the_same_facts_or_the_same_error(monkeypatch):
    for path in WILD:
        try:
            light = _jsonish(adapterhub.inspect(path))
        except adapterhub.AdapterError as exc:
            light = f"error: {exc}"
        try:
            heavy = _jsonish(_torch_path_inspect(path, monkeypatch))
        except adapterhub.AdapterError as exc:
            heavy = f"error: {exc}"
        assert light == heavy, path


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_nonfinite_count_of_a_float8_torch_tensor(dtype):
    """torch has no float8 ``isfinite``: the count goes through float32, which holds every float8 value."""
    from adapterhub.finite import nonfinite_count

    values = torch.tensor([1.0, math.nan, -2.0, math.nan, 0.5]).to(dtype)
    assert nonfinite_count(values) == 2
