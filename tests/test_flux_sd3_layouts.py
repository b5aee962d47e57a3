"""SD3 / FLUX.1 (issue #21): the other layouts users have, each against a reference implementation.

* sd-scripts SD3 (``lora_unet_joint_blocks_0_x_block_attn_qkv``: SAI's MMDiT names, fused qkv): diffusers
  has no loader for it, so the oracle is diffusers' SD3 *checkpoint* converter
  (``convert_sd3_transformer_checkpoint_to_diffusers``) applied to each module's delta written under its
  SAI name: it says which diffusers weight (and which rows, swapped or not) each SAI weight is;
* XLabs Flux (``double_blocks.0.processor.qkv_lora1.down.weight``) and the ``lora_transformer_`` names
  (diffusers paths joined by ``_``, what diffusers calls the mixture layout): diffusers' own loader;
* LyCORIS on Flux (``lycoris_transformer_blocks_0_attn_to_q.lokr_w1``, as SimpleTuner writes them):
  lycoris-lora's own wrapper, merged into the transformer.
"""
from __future__ import annotations

import copy

import pytest
import torch
from flux_helpers import (assert_bitwise_same_deltas, assert_same, diffusers_fused, lora_pair, ours_merged, peft_file,
                          quiet_pipe, state)
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def tiny_flux(adapterhub_cache):
    from adapterhub.base import load_base

    return quiet_pipe(load_base("tiny-flux"))


@pytest.fixture(scope="module")
def tiny_sd3(adapterhub_cache):
    from adapterhub.base import load_base

    return quiet_pipe(load_base("tiny-sd3"))


# ---------------------------------------------------------------------------------------------
# sd-scripts SD3
# ---------------------------------------------------------------------------------------------
# SAI MMDiT module -> the diffusers modules whose rows it holds (used here only for the shapes; which
# weight each one really is, the checkpoint converter says)
SAI_BLOCK = {"x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "x_block.attn.proj": ["attn.to_out.0"],
             "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.proj": ["attn2.to_out.0"],
             "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
             "x_block.adaLN_modulation.1": ["norm1.linear"],
             "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
             "context_block.attn.proj": ["attn.to_add_out"], "context_block.mlp.fc1": ["ff_context.net.0.proj"],
             "context_block.mlp.fc2": ["ff_context.net.2"], "context_block.adaLN_modulation.1": ["norm1_context.linear"]}
SAI_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
           "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}


def _sai_modules(transformer) -> dict[str, tuple[int, ...]]:
    """SAI module -> weight shape, for every module the diffusers transformer has."""
    modules = dict(transformer.named_modules())
    out = {}
    for i in range(transformer.config.num_layers):
        for sai, parts in SAI_BLOCK.items():
            found = [modules.get(f"transformer_blocks.{i}.{p}") for p in parts]
            if all(m is not None for m in found):
                out[f"joint_blocks.{i}.{sai}"] = (sum(m.weight.shape[0] for m in found), *found[0].weight.shape[1:])
    out.update({sai: tuple(modules[path].weight.shape) for sai, path in SAI_TOP.items()})
    return out


def _sd_scripts_sd3_file(path, transformer, seed=0, alpha=2.0):
    """A LoRA as sd-scripts' ``networks/lora_sd3.py`` names it: ``lora_unet_`` + the SAI path joined by ``_``
    (the patch embedding a conv LoRA); returns the file and each SAI module's delta."""
    gen = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for sai, shape in _sai_modules(transformer).items():
        up, down = lora_pair(shape[0], int(torch.tensor(shape[1:]).prod()), gen)
        name = "lora_unet_" + sai.replace(".", "_")
        down = down.reshape(down.shape[0], *shape[1:])
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up.reshape(*up.shape, *(1,) * (len(shape) - 2))
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[sai] = ((up @ down.flatten(1)) * (alpha / up.shape[1])).reshape(shape)
    save_file(sd, str(path))
    return path, deltas


class _Checkpoint(dict):
    """A checkpoint holding only some weights: the converter pops every weight of a whole model, and a
    missing one reads as NaN, which marks the diffusers weights no module of the file became."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.full((6, 6), float("nan"))


def _converter_deltas(sai_deltas: dict) -> dict[str, torch.Tensor]:
    """diffusers path -> delta, as diffusers' SD3 checkpoint converter places each SAI weight."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    checkpoint = _Checkpoint({f"{sai}.weight": d.clone() for sai, d in sai_deltas.items()})
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # every SAI weight of the file was taken by the converter
    return {k.removesuffix(".weight"): v for k, v in converted.items()
            if k.endswith(".weight") and not v.isnan().any()}


def _our_deltas(adapter) -> dict[str, torch.Tensor]:
    return {t.removeprefix("transformer."): p.delta(torch.zeros(p.expected_shape())) for t, p in adapter.patches.items()}


def test_sd_scripts_sd3_modules_are_where_diffusers_sd3_converter_puts_them(tiny_sd3, tmp_path):
    """Every SAI module of the tiny SD3.5-shaped base (dual attention, the last block's context stream with
    only its (shift, scale) modulation, the patch-embedding conv, the final layer): our patches equal the
    converter's placement of the same deltas, and the adapter merges into the base."""
    import adapterhub

    path, sai = _sd_scripts_sd3_file(tmp_path / "sd3_kohya.safetensors", tiny_sd3.transformer)
    adapter = adapterhub.load(path)
    assert (adapter.family, adapter.base) == ("sd3", "tiny-sd3")
    theirs, ours = _converter_deltas(sai), _our_deltas(adapter)
    assert ours.keys() == theirs.keys() and len(ours) == 37
    for target, delta in theirs.items():
        torch.testing.assert_close(ours[target], delta, atol=1e-6, rtol=0, msg=target)
    merged = copy.deepcopy(tiny_sd3)
    adapter.merge_into(merged)
    changed = sum(not torch.equal(v, state(tiny_sd3)[k]) for k, v in state(merged).items())
    assert changed == 37


SD3_PEFT_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                  "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.attn2.to_v",
                  "transformer_blocks.0.attn.to_add_out", "transformer_blocks.1.norm1_context.linear",
                  "transformer_blocks.0.norm1_context.linear", "transformer_blocks.1.ff.net.0.proj", "norm_out.linear",
                  "context_embedder"]


def test_sd3_written_as_sd_scripts_names_is_placed_right_by_the_converter(tiny_sd3, tmp_path):
    """PEFT-named SD3 -> kohya: names as sd-scripts writes them; the converter places each written module's
    delta on the source's modules (zeros where a fused module's part had no LoRA); read back bit for bit."""
    import adapterhub
    from adapterhub.convert import convert

    src = peft_file(tmp_path / "sd3.safetensors", tiny_sd3.transformer, SD3_PEFT_PATHS)
    out = tmp_path / "kohya.safetensors"
    convert(src, "kohya", out)
    written = load_file(str(out))
    names = {k.split(".")[0] for k in written}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_context_embedder"} <= names
    sai = {}
    for name in names:
        up, down = written[f"{name}.lora_up.weight"].float(), written[f"{name}.lora_down.weight"].float()
        scale = written[f"{name}.alpha"].item() / down.shape[0]
        sai_name = next(s for s in _sai_modules(tiny_sd3.transformer) if "lora_unet_" + s.replace(".", "_") == name)
        sai[sai_name] = up.flatten(1) @ down.flatten(1) * scale
    source = _our_deltas(adapterhub.load(src))
    for target, delta in _converter_deltas(sai).items():
        expected = source.get(target, torch.zeros_like(delta))
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0, msg=target)
    assert_bitwise_same_deltas(adapterhub.load(src), adapterhub.load(out))
