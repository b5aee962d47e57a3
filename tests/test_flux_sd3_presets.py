"""SD3 / FLUX.1 (issue #21): files at the real widths bind to the real architectures, every key and shape.

Rank-1 LoRAs of zeros on every linear module of the published transformers (FLUX.1 dev: 19 double and
38 single blocks; SD3.5 Large: 38 joint blocks; SD3.5 Medium: 24, the first 13 with a second attention)
are read, converted to kohya (sd-scripts' BFL / SAI names) and read back; each binds to the preset built
on the meta device (shapes only, no memory), and the family and base are told from the shapes.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file


def _every_linear(path, transformer):
    """A diffusers / PEFT rank-1 LoRA of zeros (bfloat16: the files stay small) on every Linear."""
    sd = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            sd[f"transformer.{name}.lora_A.weight"] = torch.zeros(1, in_f, dtype=torch.bfloat16)
            sd[f"transformer.{name}.lora_B.weight"] = torch.zeros(out_f, 1, dtype=torch.bfloat16)
    save_file(sd, str(path))
    return len(sd) // 2


# preset, base reported, kohya modules (Flux: 19 x 10 + 38 x 3 + 10 top level; SD3: per joint block x and
# context streams, the last block's context stream only its modulation, SD3.5 Medium's attn2 on 13 blocks)
CASES = [("flux-dev", "flux-dev", 19 * 10 + 38 * 3 + 10), ("sd3.5-large", "sd3.5-large", 38 * 10 - 3 + 7),
         ("sd3.5-medium", "sd3.5-medium", 24 * 10 - 3 + 13 * 2 + 7)]


@pytest.mark.parametrize("preset,base,kohya_modules", CASES)
def test_every_module_binds_to_the_meta_preset_before_and_after_kohya(tmp_path, preset, base, kohya_modules):
    import adapterhub
    from adapterhub.convert import convert
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    model = build_transformer_base(preset)  # meta device
    count = _every_linear(tmp_path / "peft.safetensors", model.transformer)
    source = adapterhub.load(tmp_path / "peft.safetensors")
    family = "flux" if preset.startswith("flux") else "sd3"
    assert (source.family, source.base, len(source.patches)) == (family, base, count)
    assert len(bind(model, source)) == count
    convert(tmp_path / "peft.safetensors", "kohya", tmp_path / "kohya.safetensors")
    names = {k.split(".")[0] for k in load_file(str(tmp_path / "kohya.safetensors"))}
    assert len(names) == kohya_modules and all(n.startswith("lora_unet_") for n in names)
    again = adapterhub.load(tmp_path / "kohya.safetensors")
    assert (again.family, again.base) == (source.family, source.base)
    assert again.patches.keys() == source.patches.keys() and len(bind(model, again)) == count
