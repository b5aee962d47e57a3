"""Module-name maps: kohya / ldm-sgm / PEFT / diffusers names <-> canonical module paths.

Round trips run over every Linear/Conv2d module of the tiny SD1 and SDXL bases; the ldm/sgm map is
checked against diffusers' own conversion (``_maybe_map_sgm_blocks_to_diffusers`` +
``_convert_non_diffusers_lora_to_diffusers`` + ``convert_unet_state_dict_to_peft``) on the full SDXL
and SD1.5 module names, built on the meta device.
"""
from __future__ import annotations

import pytest
import torch

from adapterhub.keymaps import canonical, kohya_name, sgm_to_diffusers
from adapterhub.types import Adapter
from adapterhub.weights import bind
from adapterhub_plugins.lora.keys import split_key
from adapterhub_plugins.lora.patches import LoRAPatch

from lora_helpers import diffusers_kohya_names, diffusers_to_sgm, kohya_te_name, linear_or_conv, parts, quiet

quiet()
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def meta_bases():
    return {arch: parts(arch, device="meta") for arch in ("tiny-sd1", "tiny-sdxl", "sd1", "sdxl")}


def _modules(model):
    """(component, path, module) for every Linear / Conv2d of the model."""
    for comp in COMPONENTS:
        root = getattr(model, comp, None)
        if root is None:
            continue
        for name, module in root.named_modules():
            if linear_or_conv(module):
                yield comp, name, module


def _sd_scripts_name(comp, path, sdxl):
    """What sd-scripts writes (formats.md §1.1): prefix + path with '.' -> '_', TE paths with text_model."""
    if comp == "unet":
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[comp]
    return kohya_te_name(prefix, path)


def _lora_for(module, source):
    w = module.weight
    down = torch.zeros(1, *w.shape[1:], device="meta")
    up = torch.zeros(w.shape[0], 1, *([1, 1] if w.dim() == 4 else []), device="meta")
    return LoRAPatch(canonical(source), source, {"up": up, "down": down}, alpha=1.0)


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_kohya_names_round_trip_every_module(arch, meta_bases):
    model = meta_bases[arch]
    sdxl = arch == "tiny-sdxl"
    patches, expected = {}, {}
    for comp, path, module in _modules(model):
        name = kohya_name(f"{comp}.{path}", arch)
        if sdxl and comp == "unet":  # sd-scripts' SDXL UNet has the sgm module names
            assert name == "lora_unet_" + diffusers_to_sgm(path).replace(".", "_")
        else:
            assert name == _sd_scripts_name(comp, path, sdxl)
        target = canonical(name)
        if comp == "unet":
            assert target == f"unet.{path}"
        else:  # canonical keeps kohya's text_model; the engine finds the flattened CLIPTextModel's module
            assert target.removeprefix(f"{comp}.").removeprefix("text_model.") == path.removeprefix("text_model.")
        patches[target] = _lora_for(module, name)
        expected[target] = module.weight
    assert len(patches) == len(expected) > 100
    adapter = Adapter(type="lora", format="kohya", patches=patches, base=arch)
    bound = bind(model, adapter)
    assert len(bound) == len(patches)
    for binding in bound:
        assert binding.param is expected[binding.patch.target], binding.patch.source


@pytest.mark.parametrize("arch", ["sdxl", "tiny-sdxl"])
def test_sgm_names_match_diffusers_conversion(arch, meta_bases):
    model = meta_bases[arch]
    unet = model.unet
    sgm_names = {}
    for comp, path, _ in _modules(model):
        if comp != "unet":
            continue
        if path.startswith(("time_embedding", "add_embedding", "conv_in", "conv_out")):
            continue  # top-level modules are checked separately below
        sgm_names["lora_unet_" + diffusers_to_sgm(path).replace(".", "_")] = f"unet.{path}"
    assert any("output_blocks_2_2_conv" in n for n in sgm_names)  # an upsampler is included
    reference = diffusers_kohya_names(list(sgm_names), unet.config)
    assert len(reference) == len(sgm_names)
    mismatches = []
    for name, path in sgm_names.items():
        ours = canonical(name, unet.config.layers_per_block)
        assert ours == path, name
        assert sgm_to_diffusers(diffusers_to_sgm(path[5:]), unet.config.layers_per_block) == path[5:]
        if reference[name] != path:
            mismatches.append((name, reference[name]))
    assert not mismatches, mismatches[:3]


def test_sgm_top_level_modules_match_diffusers(meta_bases):
    unet = meta_bases["sdxl"].unet
    names = {"lora_unet_input_blocks_0_0": "unet.conv_in", "lora_unet_out_2": "unet.conv_out",
             "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
             "lora_unet_time_embed_2": "unet.time_embedding.linear_2",
             "lora_unet_label_emb_0_0": "unet.add_embedding.linear_1",
             "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2"}
    reference = diffusers_kohya_names(list(names), unet.config)
    for name, path in names.items():
        assert canonical(name) == path
        assert reference[name] == path
        assert unet.get_submodule(path[5:]) is not None


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_diffusers_block_and_text_names_match_diffusers_conversion(arch, meta_bases):
    """UNet names in diffusers blocks (sd-scripts SD1/2, LyCORIS for any base) and every TE name,
    on the full-size models."""
    model = meta_bases[arch]
    sdxl = arch == "sdxl"
    names = {_sd_scripts_name(comp, path, sdxl): f"{comp}.{path}" for comp, path, _ in _modules(model)}
    reference = diffusers_kohya_names(list(names), model.unet.config)
    strip = lambda p: p.replace(".text_model.", ".")  # noqa: E731 - flattened CLIPTextModel
    differ = set()
    for name, path in names.items():
        assert strip(canonical(name)) == strip(path), name
        if strip(reference.get(name, "")) != strip(path):
            differ.add(name)
    # diffusers 0.42.1 maps both lora_unet_add_embedding_linear_1 and _2 to "unet.add.embedding.linear"
    # (its SDXL rule drops the last ".<digit>" of any name containing "emb"), so one overwrites the other.
    # We map them to add_embedding.linear_1 / linear_2, the modules that exist.
    known = {"lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2"} if sdxl else set()
    assert differ == known, sorted(differ)[:3]


def test_attention_processor_names_match_diffusers(meta_bases):
    """The old attention-processor layout, on every attention module of SD1.5."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = meta_bases["sd1"].unet
    proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    keys = {}
    for path, _ in unet.named_modules():
        leaf = next((p for p in proc if path.endswith(".attn1." + p) or path.endswith(".attn2." + p)), None)
        if leaf:
            block = path[: -len(leaf) - 1]
            keys[f"{block}.processor.{proc[leaf]}.down.weight"] = path
    assert len(keys) == 16 * 2 * 4
    reference = convert_unet_state_dict_to_peft({k: torch.zeros(1) for k in keys})
    ref_paths = sorted(k.split(".lora_A.")[0] for k in reference)
    assert ref_paths == sorted(keys.values())
    for key, path in keys.items():
        module, role = split_key(key)
        assert role == "down"
        assert canonical(module) == f"unet.{path}"
        assert canonical("unet." + module) == f"unet.{path}"


@pytest.mark.parametrize("name,expected", [
    ("base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("base_model.model.mid_block.resnets.1.conv_shortcut", "unet.mid_block.resnets.1.conv_shortcut"),
    ("unet.up_blocks.2.attentions.1.proj_out", "unet.up_blocks.2.attentions.1.proj_out"),
    ("text_encoder.text_model.encoder.layers.3.mlp.fc1", "text_encoder.text_model.encoder.layers.3.mlp.fc1"),
    ("text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
     "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
     "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0",
     "unet.mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1"),
    ("lora_unet_output_blocks_5_2_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    ("lora_unet_middle_block_2_emb_layers_1", "unet.mid_block.resnets.1.time_emb_proj"),
    ("lycoris_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("base_model.model.transformer.h.0.attn.c_attn", "?.transformer.h.0.attn.c_attn"),
])
def test_canonical_examples(name, expected):
    """Examples from formats.md §0.1 / §1.2 and the wild files (a GPT-2 PEFT name is not SD)."""
    assert canonical(name) == expected


@pytest.mark.parametrize("key,module,role", [
    ("lora_unet_x.lora_down.weight", "lora_unet_x", "down"),
    ("unet.a.to_k.lora.up.weight", "unet.a.to_k", "up"),
    ("a.attn1.processor.to_out_lora.up.weight", "a.attn1.processor.to_out", "up"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "down"),
    ("base_model.model.lin0.lora_E", "base_model.model.lin0", "E"),
    ("base_model.model.emb.lora_embedding_A", "base_model.model.emb", "emb_down"),
    ("lora_te_x.lokr_w1_a", "lora_te_x", "lokr_w1_a"),
    ("x.alpha", "x", "alpha"),
])
def test_split_key_suffix_table(key, module, role):
    assert split_key(key) == (module, role)
    assert canonical("a.attn1.processor.to_out") == "?.a.attn1.to_out.0"
