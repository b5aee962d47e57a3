"""Block weights: the slot table against the LDM block numbering, presets, and exact per-module scaling."""
from __future__ import annotations

import re

import pytest
import torch

import adapterhub
from adapterhub import blocks
from adapterhub.errors import AdapterhubError
from adapterhub.keymaps import sgm_to_diffusers
from adapterhub.plugins import adapter_type
from adapterhub.stack import Entry, Stack

PARTS = {"tiny-sd1": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2"),
         "sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}

# the extension's DEF_WEIGHT_PRESET (scripts/lora_block_weight.py), as it writes it
EXTENSION_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""


def parts(arch: str, device: str = "cpu"):
    from adapterhub.base import build_preset

    return build_preset(arch, device=device, components=PARTS[arch], seed=5)


def ldm_slot(target: str) -> str | None:
    """The slot by the LDM numbering, computed here from the path (independent of the table):
    input_blocks.{1+3i+j} / {3i+3} (downsampler), output_blocks.{3i+j} / {3i+2} (upsampler)."""
    component, rest = target.split(".", 1)
    if component.startswith("text_encoder"):
        return "BASE"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", rest)
    if m:
        side, i, kind, j = m[1], int(m[2]), m[3], int(m[4])
        if side == "down":
            return f"IN{3 * i + 3 if kind == 'downsamplers' else 1 + 3 * i + j:02d}"
        return f"OUT{3 * i + 2 if kind == 'upsamplers' else 3 * i + j:02d}"
    if rest.startswith("mid_block."):
        return "MID"
    if rest == "conv_in" or rest.startswith("conv_in."):
        return "IN00"
    return None


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, device", [("tiny-sd1", "cpu"), ("tiny-sdxl", "cpu"), ("sd1", "meta"), ("sdxl", "meta")])
def test_every_targeted_module_lands_in_exactly_one_block(arch, device):
    model = parts(arch, device)
    targets = adapter_type("locon").target_modules(model, text=True)  # attention, resnet, sampler, TE layers
    assert len(targets) > 50
    family = blocks.family_of(model)
    short = set(blocks.LAYOUTS[family][min(blocks.LAYOUTS[family])])
    attention = adapter_type("lora").target_modules(model, text=True)
    for target in targets:
        hits = [slot for slot, paths in blocks.BLOCK_TABLE.items()
                if any(target == p or target.startswith(p + ".") for p in paths)]
        assert len(hits) == 1, (target, hits)
        assert blocks.block_of(target) == hits[0] == ldm_slot(target), target
        if target in attention:  # what a plain LoRA targets: the slots of the short vector (17 / 12)
            assert hits[0] in short, target
    for outside in ("unet.conv_out", "unet.time_embedding.linear_1", "unet.conv_norm_out"):
        assert blocks.block_of(outside) is None
    assert blocks.block_of("unet.conv_in") == "IN00"


def test_the_table_agrees_with_the_ldm_to_diffusers_name_map():
    """``adapterhub.keymaps`` (LDM/SGM -> diffusers names) and the slot table say the same thing."""
    assert blocks.block_of("unet." + sgm_to_diffusers("input_blocks.0.0")) == "IN00"  # conv_in
    for n in range(1, 12):
        ldms = [f"input_blocks.{n}.0.op"] if n % 3 == 0 else [f"input_blocks.{n}.0.in_layers.2",
                                                               f"input_blocks.{n}.1.proj_in"]
        for ldm in ldms:
            assert blocks.block_of("unet." + sgm_to_diffusers(ldm)) == f"IN{n:02d}", ldm
    for n in range(12):
        for ldm in (f"output_blocks.{n}.0.out_layers.3", f"output_blocks.{n}.1.proj_out"):
            assert blocks.block_of("unet." + sgm_to_diffusers(ldm)) == f"OUT{n:02d}", ldm
    for n in (2, 5, 8):
        assert blocks.block_of("unet." + sgm_to_diffusers(f"output_blocks.{n}.2.conv")) == f"OUT{n:02d}"
    assert blocks.block_of("unet." + sgm_to_diffusers("middle_block.1.proj_in")) == "MID"
    assert blocks.block_of("unet." + sgm_to_diffusers("middle_block.2.in_layers.2")) == "MID"


def test_family_of():
    assert blocks.family_of(parts("tiny-sd1")) == "sd1"
    assert blocks.family_of(parts("tiny-sdxl")) == "sdxl"
    assert blocks.family_of(parts("sd1", "meta")) == "sd1"
    assert blocks.family_of(parts("sdxl", "meta")) == "sdxl"


# ---------------------------------------------------------------------------------------------
# presets and vectors
# ---------------------------------------------------------------------------------------------
def test_presets_are_the_extensions_and_sdxl_has_the_same_names():
    for line in EXTENSION_PRESETS.splitlines():
        name, values = line.split(":")
        assert blocks.PRESETS["sd1"][name] == tuple(float(v) for v in values.split(","))
    assert blocks.PRESETS["sdxl"].keys() == blocks.PRESETS["sd1"].keys()
    for family, presets in blocks.PRESETS.items():
        short = min(blocks.LAYOUTS[family])
        assert all(len(v) == short for v in presets.values())
    xl = blocks.resolve("OUTS", "sdxl")
    assert [s for s, v in xl.items() if v] == ["BASE", "OUT03", "OUT04", "OUT05"]
    sd = blocks.resolve("ind", "sd1")
    assert [s for s, v in sd.items() if v] == ["BASE", "IN05", "IN07", "IN08"]


def test_vectors_expand_to_26_slots_with_zeros_elsewhere():
    values = [0.1 * (k + 1) for k in range(17)]
    factors = blocks.resolve(",".join(map(str, values)), "sd1")
    assert list(factors) == list(blocks.SLOTS)
    assert [factors[s] for s in blocks.LAYOUTS["sd1"][17]] == pytest.approx(values)
    assert factors["IN00"] == factors["IN03"] == factors["OUT00"] == factors["OUT02"] == 0.0
    full = blocks.resolve([float(k) for k in range(26)], "sd1")
    assert [full[s] for s in blocks.SLOTS] == [float(k) for k in range(26)]
    assert blocks.resolve([1.0] * 20, "sdxl")["IN09"] == 0.0


@pytest.mark.parametrize("spec, family, message", [
    ("1,1,1", "sd1", "take 17 or 26 values, not 3"),
    (",".join(["1"] * 17), "sdxl", "take 12 or 20 values, not 17"),
    ("NOPE", "sd1", "unknown preset"),
    ("1,x,1", "sd1", "'x' is not a number"),
    ("nan," + ",".join(["1"] * 16), "sd1", "finite"),
])
def test_bad_block_weights(spec, family, message):
    with pytest.raises(AdapterhubError, match=message):
        blocks.resolve(spec, family)


# ---------------------------------------------------------------------------------------------
# exact scaling by module path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, count", [("tiny-sd1", 26), ("tiny-sd1", 17), ("tiny-sdxl", 20), ("tiny-sdxl", 12)])
def test_block_weights_scale_exactly_the_modules_of_their_block(arch, count, tmp_path):
    """Each changed weight's delta equals the adapter's own delta times te-or-unet times its block's
    value, found from the module path; zero-valued blocks stay bit for bit untouched."""
    base = parts(arch)
    path = adapter_type("locon").example(base, tmp_path / "locon.safetensors", seed=3)
    adapter = adapterhub.load(path)
    family = blocks.family_of(base)
    slots = blocks.LAYOUTS[family][count]
    values = [0.0 if k % 4 == 3 else 0.25 + 0.125 * k for k in range(count)]  # distinct, some zero
    by_slot = dict.fromkeys(blocks.SLOTS, 0.0) | dict(zip(slots, values))
    te, unet = 0.5, -0.75

    pristine = {t: p.detach().clone() for t, p in _params(base, adapter).items()}
    unit = parts(arch)
    Stack([Entry(adapter, 1.0)]).apply(unit)
    unit_delta = {t: p.detach() - pristine[t] for t, p in _params(unit, adapter).items()}

    stack = Stack([Entry(adapter, te=te, unet=unet, lbw=tuple(values))]).apply(base)
    checked = zero = 0
    for target, param in _params(base, adapter).items():
        slot = ldm_slot(target)
        expected = (te if target.startswith("text_encoder") else unet) * (1.0 if slot is None else by_slot[slot])
        if expected == 0.0:
            assert torch.equal(param, pristine[target]), target
            zero += 1
        else:
            torch.testing.assert_close(param - pristine[target], unit_delta[target] * expected,
                                       rtol=1e-4, atol=1e-6, msg=target)
        checked += 1
    assert checked == len(adapter.patches) and zero > 0
    stack.remove()
    assert all(torch.equal(p, pristine[t]) for t, p in _params(base, adapter).items())


def _params(model, adapter) -> dict[str, torch.Tensor]:
    out = {}
    for target in adapter.patches:
        component, rest = target.split(".", 1)
        root = getattr(model, component)
        names = dict(root.named_modules())
        module = names.get(rest) or names.get(rest.removeprefix("text_model."))
        out[target] = module.weight
    return out
