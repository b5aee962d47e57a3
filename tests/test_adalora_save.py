"""An AdaLoRA saved (or converted ``--to peft``) is PEFT's AdaLoRA layout and reads back as ``adalora``.

Oracle: PEFT itself. ``PeftModel.from_pretrained`` loads each component folder (resizing a module the rank
allocator pruned, from the config's ``rank_pattern``) and ``merge_and_unload`` gives the weights, which must
equal our merge of the source. Other layouts hold the plain LoRA it equals, as the type declares.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch


@pytest.fixture
def adalora(tiny_sd1, tmp_path):
    """The adalora example with one module pruned to 2 of its 4 ranks (PEFT keeps ``ranknum`` = ``init_r``)."""
    from adapterhub.api import load
    from adapterhub.plugins import adapter_types

    adapter = load(adapter_types()["adalora"].example(tiny_sd1, tmp_path / "ada", seed=3))
    patch = next(iter(adapter.patches.values()))
    t = patch.tensors
    patch.tensors = {"down": t["down"][:2].clone(), "E": t["E"][:2].clone(), "up": t["up"][:, :2].clone()}
    return adapter


def _ours(tiny_sd1, adapter) -> dict[str, torch.Tensor]:
    pipe = copy.deepcopy(tiny_sd1)
    adapter.merge_into(pipe, 1.0)
    return {k: v for k, v in pipe.unet.state_dict().items()}


def _peft(tiny_sd1, folder: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    assert sorted(p.name for p in folder.iterdir()) == ["unet"]
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_sd1.unet), str(folder), subfolder="unet")
    return model.merge_and_unload().state_dict()


def test_saved_adalora_is_peft_adalora_and_reads_back_as_adalora(adalora, tiny_sd1, tmp_path):
    from adapterhub.api import load

    out = adalora.save(tmp_path / "saved")
    again = load(out)
    assert (again.type, again.format) == ("adalora", "peft")
    assert again.patches.keys() == adalora.patches.keys()
    for target, patch in adalora.patches.items():
        for key, tensor in patch.tensors.items():
            assert torch.equal(again.patches[target].tensors[key], tensor), (target, key)
        assert again.patches[target].scale == patch.scale, target
    ours, ref = _ours(tiny_sd1, adalora), _peft(tiny_sd1, out)
    changed = [k for k in ours if not torch.equal(ours[k], tiny_sd1.unet.state_dict()[k])]
    assert changed  # the adapter does something
    assert ref.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(ref[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)


def test_converted_to_peft_merges_as_peft_does(adalora, tiny_sd1, tmp_path):
    from adapterhub.api import load
    from adapterhub.convert import convert

    source = adalora.save(tmp_path / "source")
    out = Path(convert(source, "peft", tmp_path / "peft")["out"])
    assert load(out).type == "adalora"
    ours, ref = _ours(tiny_sd1, load(source)), _peft(tiny_sd1, out)
    for key in ours:
        torch.testing.assert_close(ref[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)


def test_kohya_holds_the_lora_it_equals(adalora, tiny_sd1, tmp_path):
    from adapterhub.api import load
    from adapterhub.plugins import adapter_types

    again = load(adalora.save(tmp_path / "k.safetensors", "kohya"))
    assert again.type == adapter_types()["adalora"].reads_back_as["kohya"] == "lora"
    ours, back = _ours(tiny_sd1, adalora), _ours(tiny_sd1, again)
    for key in ours:
        torch.testing.assert_close(back[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)


def test_modules_of_different_initial_rank_are_refused_in_one_line(adalora, tmp_path):
    from adapterhub.errors import AdapterError

    first = next(iter(adalora.patches.values()))
    first.ranknum = 7
    with pytest.raises(AdapterError, match="different lora_alpha or initial ranks have no one PEFT config"):
        adalora.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
