"""A bias difference (``diff_b``, ``b_norm``) beside a LoRA / LoHa / LoKr module of a Stable Diffusion file: ComfyUI's
trainer and extract node and LyCORIS write one for every module with a bias. It patches the module's bias (the
weight multiplier applies, as ComfyUI adds ``strength x diff_b``), never dropped silently."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"
TARGET = "down_blocks.0.attentions.0.proj_in"


def _file(path, linear, kind="lora", extra_bias="diff_b"):
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = linear.weight.shape[:2]
    sd = {f"{MODULE}.alpha": torch.tensor(2.0)}
    if kind == "lora":
        sd[f"{MODULE}.lora_down.weight"] = torch.randn(2, in_f, *linear.weight.shape[2:], generator=gen) * 0.1
        sd[f"{MODULE}.lora_up.weight"] = torch.randn(out_f, 2, *([1] * (linear.weight.dim() - 2)), generator=gen)
    else:  # loha
        for side in ("1", "2"):
            sd[f"{MODULE}.hada_w{side}_a"] = torch.randn(out_f, 2, generator=gen) * 0.1
            sd[f"{MODULE}.hada_w{side}_b"] = torch.randn(2, in_f, generator=gen) * 0.1
    sd[f"{MODULE}.{extra_bias}"] = torch.randn(out_f, generator=gen)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("kind, role", [("lora", "diff_b"), ("loha", "diff_b"), ("lora", "b_norm")])
def test_a_bias_difference_beside_a_lora_patches_the_bias(fresh_sd1, tmp_path, kind, role):
    import adapterhub

    module = fresh_sd1.unet.get_submodule(TARGET)
    bias, weight = module.bias.detach().clone(), module.weight.detach().clone()
    sd = _file(tmp_path / "a.safetensors", module, kind, role)
    adapter = adapterhub.load(tmp_path / "a.safetensors")
    used = {k for patch in adapter.patches.values() for k in patch.file_keys.values()}
    assert used == set(sd)  # every key read: the bias difference is not left over
    adapter.merge_into(fresh_sd1, weight=0.5)
    torch.testing.assert_close(module.bias.detach(), bias + 0.5 * sd[f"{MODULE}.{role}"], rtol=0, atol=1e-6)
    assert not torch.equal(module.weight.detach(), weight)


@pytest.mark.parametrize("w2_shape, expected", [((16, 8), "(32, 16)"), ((16, 8, 3, 3), "(32, 16, 3, 3)")])
def test_a_lokr_that_does_not_fit_names_its_shape(fresh_sd1, tmp_path, w2_shape, expected):
    """The refusal names the LoKr's product shape (kron of (2, 2) and w2), not "?"."""
    import adapterhub
    from adapterhub.errors import AdapterError

    gen = torch.Generator().manual_seed(0)
    save_file({f"{MODULE}.lokr_w1": torch.randn(2, 2, generator=gen),
               f"{MODULE}.lokr_w2": torch.randn(*w2_shape, generator=gen)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterError, match=re.escape(f"shape {expected} does not fit")):
        adapterhub.load(tmp_path / "k.safetensors").merge_into(fresh_sd1)
