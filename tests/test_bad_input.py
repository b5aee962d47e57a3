"""Bad input: every failure is one ``AdapterError`` line naming the file (and the first offending key),
and the model is bit-for-bit untouched afterwards (all or nothing)."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import adapterhub
from adapterhub.errors import AdapterError
from adapterhub.plugins import adapter_type
from conftest import WILD_ADAPTERS
from adapterhub.weights import attach, merge

from lora_helpers import parts, quiet, safetensors_header_keys, snapshot, weights

quiet()


@pytest.fixture(scope="module")
def sd1():
    return parts("tiny-sd1")


@pytest.fixture(scope="module")
def pristine(sd1):
    return snapshot(sd1)


def _untouched(model, before):
    after = weights(model)
    assert after.keys() == before.keys()
    bad = [k for k in before if not torch.equal(after[k], before[k])]
    assert not bad, bad[:3]


def _one_line(err, path, key=None):
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    if key is not None:
        assert key in message, message
        assert err.value.key == key
    return message


def _good_kohya(model, path, seed=1):
    return adapter_type("lora").example(model, path, seed=seed)


# ---------------------------------------------------------------------------------------------
# unreadable files
# ---------------------------------------------------------------------------------------------
def test_truncated_safetensors(sd1, tmp_path):
    path = _good_kohya(sd1, tmp_path / "full.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    first_beyond = min((k for k, v in header.items() if v["data_offsets"][1] > len(data) - 1000 - 8 - n),
                       key=lambda k: list(header).index(k))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(cut)
    assert "truncated" in _one_line(err, cut, first_beyond)
    with pytest.raises(AdapterError):
        adapterhub.inspect(cut)


@pytest.mark.parametrize("claimed", [200 * 1024 * 1024, 2 ** 63])
def test_safetensors_header_over_the_cap(claimed, tmp_path):
    path = tmp_path / "huge_header.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + b'{"a": 1}' + b"\0" * 64)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(path)
    assert "cap" in _one_line(err, path)


def test_safetensors_header_cap_is_a_parameter(tmp_path):
    from adapterhub.io import read_safetensors_header

    path = tmp_path / "small.safetensors"
    save_file({"a.lora_down.weight": torch.zeros(2, 2)}, str(path))
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    with pytest.raises(AdapterError) as err:
        read_safetensors_header(path, cap=n - 1)
    _one_line(err, path)
    assert read_safetensors_header(path, cap=n)[2] == n


@pytest.mark.parametrize("payload", [b"", b"\x00" * 3, b"not an adapter at all, just text\n" * 4,
                                     struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8])
def test_garbage_files(payload, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(payload)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(path)
    _one_line(err, path)


class Evil:
    """Unpickling this would create a marker file: it must never be unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_needing_code_is_refused_not_run(how, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "payload": Evil(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(path)
    assert "refused" in _one_line(err, path)
    assert not marker.exists()


def test_corrupt_zip_pickle(sd1, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = b"\xef\xbf\xbd" * ((len(data) - len(data) // 2) // 3 + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(path)
    _one_line(err, path)


# ---------------------------------------------------------------------------------------------
# adapters that do not fit the model: nothing changes
# ---------------------------------------------------------------------------------------------
def _apply_all_ways(adapter, model, before):
    """merge_into, attach and the engine's merge must each fail and leave the model untouched."""
    errors = []
    for how in (lambda: adapter.merge_into(model, 1.0), lambda: attach(model, adapter, 0.5),
                lambda: merge(model, [(adapter, 1.0)])):
        with pytest.raises(AdapterError) as err:
            how()
        _untouched(model, before)
        errors.append(err)
    return errors


def test_sdxl_lora_on_sd1_base(sd1, pristine, tmp_path):
    sdxl = parts("tiny-sdxl")
    path = _good_kohya(sdxl, tmp_path / "sdxl_lora.safetensors")
    adapter = adapterhub.load(path)
    assert adapter.base == "tiny-sdxl"
    # every lora_te1_ module is too narrow for SD1's text encoder, and they come first in the file
    first = safetensors_header_keys(path)[0].split(".")[0]
    assert first.startswith("lora_te1_")
    for err in _apply_all_ways(adapter, sd1, pristine):
        message = _one_line(err, path, first)
        assert "tiny-sdxl" in message and "tiny-sd1" in message  # says which base is which


def _write(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _valid_module_tensors(module, r=2):
    w = module.weight
    return {"lora_down.weight": torch.randn(r, *w.shape[1:]), "lora_up.weight": torch.randn(w.shape[0], r),
            "alpha": torch.tensor(1.0)}


def test_key_matching_no_module(sd1, pristine, tmp_path):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{good}.{s}": t for s, t in _valid_module_tensors(
        sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).items()}
    for bad in ("lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_9_attentions_0_transformer_blocks_0_attn1_to_q"):
        tensors.update({f"{bad}.lora_down.weight": torch.randn(2, 32), f"{bad}.lora_up.weight": torch.randn(32, 2)})
    path = _write(tensors, tmp_path / "no_module.safetensors")
    first_bad = next(k.split(".")[0] for k in safetensors_header_keys(path) if "_7_" in k or "_9_" in k)
    adapter = adapterhub.load(path)
    for err in _apply_all_ways(adapter, sd1, pristine):
        assert "no module" in _one_line(err, path, first_bad)


def test_wrong_shape(sd1, pristine, tmp_path):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1),
               f"{name}.lora_down.weight": torch.randn(2, 768),  # an SD1.5 width on the tiny base (64)
               f"{name}.lora_up.weight": torch.randn(64, 2)}
    path = _write(tensors, tmp_path / "wrong_shape.safetensors")
    adapter = adapterhub.load(path)
    for err in _apply_all_ways(adapter, sd1, pristine):
        message = _one_line(err, path, name)
        assert "768" in message and "64" in message


def test_a_bad_adapter_in_a_batch_changes_nothing(sd1, pristine, tmp_path):
    good = adapterhub.load(_good_kohya(sd1, tmp_path / "good.safetensors"))
    name = "lora_unet_mid_block_attentions_0_proj_out"
    bad_path = _write({f"{name}.lora_down.weight": torch.randn(2, 63, 1, 1),
                       f"{name}.lora_up.weight": torch.randn(64, 2, 1, 1)}, tmp_path / "bad.safetensors")
    bad = adapterhub.load(bad_path)
    with pytest.raises(AdapterError) as err:
        merge(sd1, [(good, 1.0), (bad, 0.5)])
    _one_line(err, bad_path, name)
    _untouched(sd1, pristine)
    handle = good.attach(sd1, 0.5)  # a live attachment survives a failed second attach
    during = snapshot(sd1)
    with pytest.raises(AdapterError):
        bad.attach(sd1, 1.0)
    _untouched(sd1, during)
    handle.detach()
    _untouched(sd1, pristine)


def test_non_sd_and_refused_variants_change_nothing(sd1, pristine, tmp_path):
    peft_gpt2 = str(WILD_ADAPTERS / "anirudhak_peft_gpt2_adapter_model.safetensors")
    adapters = []
    try:
        adapters.append((peft_gpt2, adapterhub.load(peft_gpt2)))
    except AdapterError:  # refused at load: nothing to attach (a missing file is an error, not a skip)
        pass
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    oft = _write({f"{name}.oft_blocks": torch.randn(4, 8, 8)}, tmp_path / "oft.safetensors")
    adapters.append((str(oft), adapterhub.load(oft)))
    # a DoRA magnitude that fits neither the rows nor the input channels of the module it lands on (a LoHa's
    # header does not tell the weight's width: refused when it is bound)
    dora = _write({f"{name}.hada_w1_a": torch.randn(32, 2), f"{name}.hada_w1_b": torch.randn(2, 32),
                   f"{name}.hada_w2_a": torch.randn(32, 2), f"{name}.hada_w2_b": torch.randn(2, 32),
                   f"{name}.dora_scale": torch.rand(1, 7)}, tmp_path / "dora.safetensors")
    adapters.append((str(dora), adapterhub.load(dora)))
    for path, adapter in adapters:
        for err in _apply_all_ways(adapter, sd1, pristine):
            _one_line(err, path)
