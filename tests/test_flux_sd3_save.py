"""SD3 / FLUX.1 (issue #21): saving and converting transformer-family LoRAs.

* diffusers: ``transformer.<module>.lora_A/B.weight``, read back by diffusers' own ``load_lora_weights``
  (Flux and SD3 pipelines) with the same fused weights as our merge of the source;
* peft: a ``transformer/`` PEFT adapter folder, merged by PEFT itself;
* kohya: sd-scripts' Flux names (``lora_unet_double_blocks_0_img_attn_qkv``: BFL's fused modules), read
  back by diffusers' kohya Flux conversion;
* round trips through each layout give bit-for-bit the same deltas.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from flux_helpers import (assert_bitwise_same_deltas, assert_same, bfl_file, diffusers_fused, lora_pair, ours_merged,
                          peft_file, state)
from safetensors.torch import load_file, save_file


# PEFT-named modules on every kind of Flux module (double, single blocks' q/k/v/mlp, top level)
FLUX_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
              "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out",
              "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
              "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.attn.to_q",
              "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
              "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out",
              "single_transformer_blocks.1.norm.linear", "x_embedder", "context_embedder", "norm_out.linear"]
SD3_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
             "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
             "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_out.0",
             "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
             "transformer_blocks.1.norm1.linear"]


def _convert(src, to, out):
    from adapterhub.convert import convert

    return Path(convert(src, to, out)["out"])


# ---------------------------------------------------------------------------------------------
# diffusers layout: diffusers' own loader is the oracle
# ---------------------------------------------------------------------------------------------
def test_flux_kohya_to_diffusers_is_loaded_by_diffusers_as_we_merge(tiny_flux, tmp_path):
    """Every BFL module (fused qkv and linear1 split, the final layer's rows swapped, the top level):
    written under diffusers' names, diffusers' loader fuses what we merge from the kohya source."""
    src = bfl_file(tmp_path / "flux_kohya.safetensors", tiny_flux.transformer, "kohya")
    out = _convert(src, "diffusers", tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") for k in load_file(str(out)))
    assert_same(ours_merged(tiny_flux, src), diffusers_fused(tiny_flux, out), state(tiny_flux), 50)


def test_sd3_peft_to_diffusers_is_loaded_by_diffusers_as_we_merge(tiny_sd3, tmp_path):
    src = peft_file(tmp_path / "sd3.safetensors", tiny_sd3.transformer, SD3_PATHS, prefix="base_model.model.")
    out = _convert(src, "diffusers", tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") for k in load_file(str(out)))
    assert_same(ours_merged(tiny_sd3, src), diffusers_fused(tiny_sd3, out), state(tiny_sd3), len(SD3_PATHS))


# ---------------------------------------------------------------------------------------------
# peft layout: PEFT itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])
def test_peft_folder_is_merged_by_peft_as_we_merge(base, request, tmp_path):
    from peft import PeftModel

    pipe = request.getfixturevalue(base.replace("-", "_"))
    if base == "tiny-flux":
        src = bfl_file(tmp_path / "src.safetensors", pipe.transformer, "comfyui", alpha=8.0)
    else:
        src = peft_file(tmp_path / "src.safetensors", pipe.transformer, SD3_PATHS)
    folder = _convert(src, "peft", tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["transformer"]
    model = PeftModel.from_pretrained(copy.deepcopy(pipe.transformer), str(folder), subfolder="transformer")
    theirs = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    assert_same(ours_merged(pipe, src), theirs, state(pipe), 10)


# ---------------------------------------------------------------------------------------------
# kohya layout: diffusers' kohya Flux conversion is the oracle
# ---------------------------------------------------------------------------------------------
# diffusers' kohya converter splits a single block's linear1 by the real width (3 x 3072 + 12288) and its
# loader drops the top-level modules (see test_flux_sd3.py); those are checked at the real width below
TINY_KOHYA_PATHS = [p for p in FLUX_PATHS if not p.startswith(("single_transformer_blocks.0", "x_", "context_",
                                                                 "norm_out"))]


def test_flux_peft_to_kohya_is_loaded_by_diffusers_as_we_merge(tiny_flux, tmp_path):
    """Separate q / k / v LoRAs join one fused ``img_attn_qkv`` module (block-diagonal ``up``, stacked
    ``down``), a lone ``add_q_proj`` one ``txt_attn_qkv`` with zero rows for k and v."""
    src = peft_file(tmp_path / "flux.safetensors", tiny_flux.transformer, TINY_KOHYA_PATHS)
    out = _convert(src, "kohya", tmp_path / "kohya.safetensors")
    names = {k.split(".")[0] for k in load_file(str(out))}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_1_linear2"} <= names
    assert_same(ours_merged(tiny_flux, src), diffusers_fused(tiny_flux, out), state(tiny_flux), len(TINY_KOHYA_PATHS))


def test_kohya_linear1_and_top_level_equal_diffusers_converter_at_flux_width(tmp_path):
    """A single block's q, k, v and MLP (different ranks and scales) fused into linear1 at the real width,
    and the top-level modules, against ``_convert_kohya_flux_lora_to_diffusers``' own output."""
    import adapterhub
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(7)
    sd = {}
    shapes = {"single_transformer_blocks.3.attn.to_q": (3072, 3072, 2), "single_transformer_blocks.3.attn.to_k":
              (3072, 3072, 2), "single_transformer_blocks.3.proj_mlp": (12288, 3072, 1),
              "norm_out.linear": (6144, 3072, 1), "x_embedder": (3072, 64, 2)}
    for path, (out_f, in_f, rank) in shapes.items():
        up, down = lora_pair(out_f, in_f, gen, rank=rank)
        sd[f"transformer.{path}.lora_A.weight"], sd[f"transformer.{path}.lora_B.weight"] = down, up
    save_file(sd, str(tmp_path / "src.safetensors"))
    out = _convert(tmp_path / "src.safetensors", "kohya", tmp_path / "kohya.safetensors")
    theirs = _convert_kohya_flux_lora_to_diffusers(load_file(str(out)))
    source = adapterhub.load(tmp_path / "src.safetensors")
    targets = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert {t.removeprefix("transformer.") for t in targets} >= set(shapes)
    for target in targets:
        got = theirs[f"{target}.lora_B.weight"] @ theirs[f"{target}.lora_A.weight"]
        name = "transformer." + target.removeprefix("transformer.")
        patch = source.patches.get(name)
        expected = torch.zeros_like(got) if patch is None else patch.delta(torch.zeros(got.shape))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=target)


# ---------------------------------------------------------------------------------------------
# round trips: bit for bit
# ---------------------------------------------------------------------------------------------
def test_kohya_round_trip_keeps_every_tensor(tiny_flux, tmp_path):
    """kohya -> adapterhub -> kohya: a fused module is written back whole, the same tensors."""
    src = bfl_file(tmp_path / "src.safetensors", tiny_flux.transformer, "kohya")
    out = _convert(src, "kohya", tmp_path / "again.safetensors")
    before, after = load_file(str(src)), load_file(str(out))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("via", ["kohya", "diffusers", "peft"])
def test_round_trips_give_the_same_deltas_bit_for_bit(tiny_flux, tmp_path, via):
    """PEFT-named source (scale 1/2: exact when baked into lora_B) -> each layout -> read back."""
    import adapterhub

    src = peft_file(tmp_path / "src.safetensors", tiny_flux.transformer, FLUX_PATHS)
    first = adapterhub.load(src)
    for patch in first.patches.values():
        patch.alpha = 2.0
    first.plugin.save(first, tmp_path / "halved.safetensors", "diffusers")
    source = adapterhub.load(tmp_path / "halved.safetensors")
    out = _convert(tmp_path / "halved.safetensors", via, tmp_path / ("out" if via == "peft" else "out.safetensors"))
    again = adapterhub.load(out)
    assert_bitwise_same_deltas(source, again)
    # a block-diagonal fused module reads back as each part's own rank-4 LoRA (as diffusers' converter does)
    assert {p.rank for t, p in again.patches.items() if t in source.patches} == {4}


def test_flux_adapter_save_api_writes_kohya_by_default(tiny_flux, tmp_path):
    import adapterhub

    src = peft_file(tmp_path / "src.safetensors", tiny_flux.transformer, ["transformer_blocks.0.attn.to_q"])
    path = adapterhub.load(src).save(tmp_path / "saved.safetensors")
    assert {k.split(".")[0] for k in load_file(str(path))} == {"lora_unet_double_blocks_0_img_attn_qkv"}


def test_flux_kohya_text_encoder_modules_load_in_diffusers_and_round_trip(tiny_flux, tmp_path):
    """``lora_te1_`` (CLIP-L) modules beside the transformer's: written as diffusers, diffusers' loader fuses
    the text encoder to our merge of the kohya source; kohya -> kohya writes the same names and tensors.
    (diffusers' own kohya converter renames them to its old attention-processor names, of which its loader
    applies only the MLP's with transformers 5: not the oracle here.)"""
    import adapterhub

    gen = torch.Generator().manual_seed(11)
    sd = load_file(str(bfl_file(tmp_path / "unet.safetensors", tiny_flux.transformer, "kohya", skip=("single",))))
    encoder = dict(tiny_flux.text_encoder.named_modules())
    for layer in range(2):
        for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"):
            path = next(p for p in encoder if p.endswith(f"layers.{layer}.{module}"))
            up, down = lora_pair(*encoder[path].weight.shape, gen)
            name = f"lora_te1_text_model_encoder_layers_{layer}_{module.replace('.', '_')}"
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(tmp_path / "with_te.safetensors"))
    src = tmp_path / "with_te.safetensors"

    ours = copy.deepcopy(tiny_flux)
    adapterhub.load(src).merge_into(ours)
    ref = copy.deepcopy(tiny_flux)
    ref.load_lora_weights(str(_convert(src, "diffusers", tmp_path / "d.safetensors")), adapter_name="oracle")
    ref.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)
    ref.unload_lora_weights()
    base = tiny_flux.text_encoder.state_dict()
    theirs = {k: v.detach() for k, v in ref.text_encoder.state_dict().items()}
    assert sum(not torch.equal(v, base[k]) for k, v in theirs.items()) == 6
    assert_same({k: v.detach() for k, v in ours.text_encoder.state_dict().items()}, theirs, base, 6)

    out = _convert(src, "kohya", tmp_path / "again.safetensors")
    before, after = load_file(str(src)), load_file(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
