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
                          state)
from safetensors.torch import load_file, save_file


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
             "context_block.mlp.fc2": ["ff_context.net.2"],
             "context_block.adaLN_modulation.1": ["norm1_context.linear"]}
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
    return {t.removeprefix("transformer."): p.delta(torch.zeros(p.expected_shape()))
            for t, p in adapter.patches.items()}


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


# ---------------------------------------------------------------------------------------------
# XLabs and the lora_transformer_ names: diffusers' own loader
# ---------------------------------------------------------------------------------------------
def _xlabs_file(path, transformer, seed=0):
    """An XLabs Flux LoRA (x-flux's attention-processor LoRAs, no alpha): per double block the image and text
    qkv (``qkv_lora1`` / ``qkv_lora2``) and output projections (``proj_lora1`` / ``proj_lora2``), per single
    block the qkv (3 x hidden rows, without the MLP) and the output projection."""
    gen = torch.Generator().manual_seed(seed)
    h = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    shapes = {}
    for i in range(transformer.config.num_layers):
        shapes.update({f"double_blocks.{i}.processor.qkv_lora1": (3 * h, h), f"double_blocks.{i}.processor.qkv_lora2":
                       (3 * h, h), f"double_blocks.{i}.processor.proj_lora1": (h, h),
                       f"double_blocks.{i}.processor.proj_lora2": (h, h)})
    for i in range(transformer.config.num_single_layers):
        shapes.update({f"single_blocks.{i}.processor.qkv_lora": (3 * h, h),
                       f"single_blocks.{i}.processor.proj_lora": (h, 5 * h)})
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        up, down = lora_pair(out_f, in_f, gen)
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = down, up
    save_file(sd, str(path))
    return path


def test_xlabs_flux_merge_equals_diffusers(tiny_flux, tmp_path):
    import adapterhub

    path = _xlabs_file(tmp_path / "xlabs.safetensors", tiny_flux.transformer)
    adapter = adapterhub.load(path)
    assert (adapter.family, adapter.base, len(adapter.patches)) == ("flux", "tiny-flux", 2 * 8 + 2 * 4)
    assert_same(ours_merged(tiny_flux, path), diffusers_fused(tiny_flux, path), state(tiny_flux), 24)


UNDERSCORED = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
               "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_add_out",
               "transformer_blocks.0.ff_context.net.0.proj",
               "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.attn.to_v",
               "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.proj_out", "x_embedder",
               "context_embedder", "proj_out", "norm_out.linear", "time_text_embed.guidance_embedder.linear_1"]


# diffusers' mixture converter names a block's attention modules only (a block's ff / proj_mlp / proj_out
# become the block itself); those are decoded the same way in the LyCORIS tests below
MIXTURE = [p for p in UNDERSCORED if ".attn." in p or not p.startswith(("transformer_blocks", "single_"))]


def test_lora_transformer_names_merge_equals_diffusers(tiny_flux, tmp_path):
    """``lora_transformer_`` + the diffusers path joined by ``_``, kohya tensors with alpha (what diffusers'
    Flux loader calls the mixture layout): each name decoded back to its module, whatever ``_`` it holds."""
    gen = torch.Generator().manual_seed(3)
    modules = dict(tiny_flux.transformer.named_modules())
    sd = {}
    for path in MIXTURE:
        up, down = lora_pair(*modules[path].weight.shape, gen)
        name = "lora_transformer_" + path.replace(".", "_")
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(tmp_path / "mixture.safetensors"))
    path = tmp_path / "mixture.safetensors"
    assert_same(ours_merged(tiny_flux, path), diffusers_fused(tiny_flux, path), state(tiny_flux), len(MIXTURE))
    from adapterhub.api import describe
    from adapterhub.convert import convert

    assert describe(path)[0].format == "onetrainer"  # named for the tool that writes it, not "diffusers"
    done = convert(path, "diffusers", tmp_path / "d.safetensors")  # read-only: written as the layouts we write
    assert (done["from"], done["format"]) == ("onetrainer", "diffusers")
    assert_same(diffusers_fused(tiny_flux, tmp_path / "d.safetensors"), diffusers_fused(tiny_flux, path),
                state(tiny_flux), len(MIXTURE))


# ---------------------------------------------------------------------------------------------
# LyCORIS on Flux: lycoris-lora's own wrapper
# ---------------------------------------------------------------------------------------------
def _lycoris_file(path, transformer, kind, seed=0, alpha=2.0, rank=2):
    """LoKr (``lokr_w1`` whole, ``lokr_w2_a`` / ``lokr_w2_b`` factored) or LoHa (``hada_w1_a`` ...) on
    diffusers' module paths, named as LyCORIS' wrapper names them (``lycoris_`` + the path joined by ``_``)."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    sd = {}
    for module_path in UNDERSCORED:
        out_f, in_f = modules[module_path].weight.shape
        name = "lycoris_" + module_path.replace(".", "_")
        if kind == "lokr":
            a, c = 4, 4 if in_f % 4 == 0 else 1
            sd[f"{name}.lokr_w1"] = torch.randn(a, c, generator=gen) * 0.1
            sd[f"{name}.lokr_w2_a"] = torch.randn(out_f // a, rank, generator=gen) * 0.1
            sd[f"{name}.lokr_w2_b"] = torch.randn(rank, in_f // c, generator=gen) * 0.1
        else:
            for w in ("w1", "w2"):
                sd[f"{name}.hada_{w}_a"] = torch.randn(out_f, rank, generator=gen) * 0.3
                sd[f"{name}.hada_{w}_b"] = torch.randn(rank, in_f, generator=gen) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_on_flux_merge_equals_lycoris(tiny_flux, tmp_path, kind):
    import adapterhub
    from lycoris import create_lycoris_from_weights

    path = _lycoris_file(tmp_path / f"{kind}.safetensors", tiny_flux.transformer, kind)
    adapter = adapterhub.load(path)
    assert (adapter.type, adapter.family, adapter.base) == (kind, "flux", "tiny-flux")
    reference = copy.deepcopy(tiny_flux.transformer)
    network, _ = create_lycoris_from_weights(1.0, str(path), reference)
    assert len(network.loras) == len(UNDERSCORED)
    network.merge_to(1.0)
    theirs = {k: v.detach() for k, v in reference.state_dict().items()}
    assert_same(ours_merged(tiny_flux, path), theirs, state(tiny_flux), len(UNDERSCORED))


def test_lycoris_on_flux_converts_to_peft_or_kohya_where_it_can(tiny_flux, tmp_path, capsys):
    """A LoHa on q / k / v: peft holds it (one LoHa per module); kohya's fused modules cannot (one line, exit 2)."""
    import adapterhub
    from adapterhub.cli import main

    path = _lycoris_file(tmp_path / "loha.safetensors", tiny_flux.transformer, "loha")
    folder = tmp_path / "peft"
    assert main(["convert", str(path), "--to", "peft", "--out", str(folder)]) == 0
    assert_bitwise_same_deltas(adapterhub.load(path), adapterhub.load(folder))
    capsys.readouterr()
    rc = main(["convert", str(path), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "a loha on transformer." in err and "cannot join the fused kohya module lora_unet_" in err, err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "k.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# ai-toolkit's other names: diffusers paths under diffusion_model. (its ComfyUI prefix), or bare
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_ai_toolkit_comfy_prefixed_names_merge_as_diffusers_paths(tiny_flux, tmp_path, prefix):
    """ai-toolkit writes ``diffusion_model.<diffusers path>.lora_A.weight`` (``lora_keys_use_comfy_prefix``;
    no alpha: scale 1), and ComfyUI reads bare ``<diffusers path>`` keys too. diffusers' Flux loader reads
    neither, so its oracle is the same tensors under ``transformer.``, the names they stand for."""
    src = peft_file(tmp_path / "src.safetensors", tiny_flux.transformer, UNDERSCORED, prefix=prefix)
    renamed = {f"transformer.{k.removeprefix(prefix)}": v for k, v in load_file(str(src)).items()}
    save_file(renamed, str(tmp_path / "diffusers.safetensors"))
    assert_same(ours_merged(tiny_flux, src), diffusers_fused(tiny_flux, tmp_path / "diffusers.safetensors"),
                state(tiny_flux), len(UNDERSCORED))


def test_lokr_on_fused_flux_modules_is_refused_for_kohya_without_sending_elsewhere(tiny_flux, tmp_path, capsys):
    """PEFT cannot hold a LyCORIS LoKr either, so the line does not send the user there."""
    from adapterhub.cli import main

    path = _lycoris_file(tmp_path / "lokr.safetensors", tiny_flux.transformer, "lokr")
    rc = main(["convert", str(path), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "a lokr on transformer." in err and "keep it in its own layout" in err, err
    assert not (tmp_path / "k.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# T5 modules (sd-scripts' lora_te3_): no reference loader reads them (diffusers drops T5 keys), so each
# merges by the layout's own formula, on the T5 encoder of the family (Flux text_encoder_2, SD3 text_encoder_3)
# ---------------------------------------------------------------------------------------------
T5_MODULES = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.o",
              "encoder.block.0.layer.1.DenseReluDense.wi_0", "encoder.block.1.layer.1.DenseReluDense.wo"]


@pytest.mark.parametrize("base,t5", [("tiny-flux", "text_encoder_2"), ("tiny-sd3", "text_encoder_3")])
def test_sd_scripts_t5_modules_merge_by_the_formula_and_round_trip(base, t5, request, tmp_path):
    import adapterhub
    from adapterhub.convert import convert

    pipe = request.getfixturevalue(base.replace("-", "_"))
    modules = dict(getattr(pipe, t5).named_modules())
    gen = torch.Generator().manual_seed(5)
    sd = {}
    first = "transformer_blocks.0.attn.to_q"
    up, down = lora_pair(*dict(pipe.transformer.named_modules())[first].weight.shape, gen)
    sd.update({"transformer." + first + ".lora_A.weight": down, "transformer." + first + ".lora_B.weight": up})
    expected = {}
    for path in T5_MODULES:
        up, down = lora_pair(*modules[path].weight.shape, gen)
        name = "lora_te3_" + path.replace(".", "_")
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
        expected[path] = modules[path].weight.detach() + up @ down * (2.0 / up.shape[1])
    save_file(sd, str(tmp_path / "t5.safetensors"))
    adapter = adapterhub.load(tmp_path / "t5.safetensors")
    assert {f"{t5}.{p}" for p in T5_MODULES} <= adapter.patches.keys()
    merged = copy.deepcopy(pipe)
    adapter.merge_into(merged)
    got = dict(getattr(merged, t5).named_modules())
    for path, weight in expected.items():
        torch.testing.assert_close(got[path].weight, weight, atol=1e-6, rtol=0, msg=path)
    convert(tmp_path / "t5.safetensors", "kohya", tmp_path / "kohya.safetensors")
    written = load_file(str(tmp_path / "kohya.safetensors"))
    assert all(f"lora_te3_{p.replace('.', '_')}.lora_down.weight" in written for p in T5_MODULES)
    assert_bitwise_same_deltas(adapter, adapterhub.load(tmp_path / "kohya.safetensors"))


CLIP_L, CLIP_G, T5XXL = (f"text_encoders.{m}.transformer." for m in ("clip_l", "clip_g", "t5xxl"))


@pytest.mark.parametrize("base,prefixes", [
    ("tiny-flux", {CLIP_L: "text_encoder", T5XXL: "text_encoder_2"}),
    ("tiny-sd3", {CLIP_L: "text_encoder", CLIP_G: "text_encoder_2", T5XXL: "text_encoder_3"})])
def test_comfyui_text_encoder_names_merge_by_the_formula(base, prefixes, request, tmp_path):
    """ComfyUI's own names for the text encoders beside ``diffusion_model.``:
    ``text_encoders.clip_l.transformer.`` + the transformers module path (``clip_g`` for SD3's second CLIP,
    ``t5xxl`` for T5). No reference loader applies them all (diffusers keeps only CLIP-L): the formula is the oracle."""
    import adapterhub

    pipe = request.getfixturevalue(base.replace("-", "_"))
    gen = torch.Generator().manual_seed(9)
    sd, expected = {}, {}
    for prefix, component in prefixes.items():
        modules = dict(getattr(pipe, component).named_modules())
        path = next(p for p in modules if p.endswith(("layers.1.self_attn.k_proj", "block.1.layer.0.SelfAttention.k")))
        up, down = lora_pair(*modules[path].weight.shape, gen)
        name = prefix + ("text_model." + path if "layers." in path and not path.startswith("text_model.") else path)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
        expected[(component, path)] = modules[path].weight.detach() + up @ down * 0.5
    up, down = lora_pair(*pipe.transformer.transformer_blocks[0].attn.to_q.weight.shape, gen)
    sd.update({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": down,
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": up})
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    merged = copy.deepcopy(pipe)
    adapterhub.load(tmp_path / "comfy.safetensors").merge_into(merged)
    for (component, path), weight in expected.items():
        got = dict(getattr(merged, component).named_modules())[path].weight
        torch.testing.assert_close(got, weight, atol=1e-6, rtol=0, msg=f"{component}.{path}")


def test_xlabs_converts_to_kohya_compactly_and_back_bit_for_bit(tiny_flux, tmp_path):
    """XLabs' single-block qkv LoRA (q, k, v share one ``down``; no MLP part) becomes sd-scripts' ``linear1``
    at the same rank (zero ``up`` rows for the MLP), and reads back to the same deltas, bit for bit."""
    import adapterhub
    from adapterhub.convert import convert

    src = _xlabs_file(tmp_path / "xlabs.safetensors", tiny_flux.transformer)
    convert(src, "kohya", tmp_path / "kohya.safetensors")
    written = load_file(str(tmp_path / "kohya.safetensors"))
    assert written["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4
    assert written["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape[0] == 4
    assert_bitwise_same_deltas(adapterhub.load(src), adapterhub.load(tmp_path / "kohya.safetensors"))


def test_loha_on_sd3_last_context_modulation_is_applied_with_its_rows_swapped(tiny_sd3, tmp_path):
    """SAI's last context modulation holds (shift, scale), diffusers' (scale, shift): a LoHa there is no stack of
    rows to swap factor by factor, so diffusers' module takes the rows of its delta, swapped (as a LoRA's are)."""
    import adapterhub

    gen = torch.Generator().manual_seed(2)
    name = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"  # tiny-sd3's last block: 2 x 48 rows
    shapes = {"hada_w1_a": (96, 2), "hada_w1_b": (2, 48), "hada_w2_a": (96, 2), "hada_w2_b": (2, 48)}
    sd = {f"{name}.{role}": torch.randn(shape, generator=gen) for role, shape in shapes.items()}
    sd[f"{name}.alpha"] = torch.tensor(2.0)  # scale alpha / rank = 1
    save_file(sd, str(tmp_path / "loha.safetensors"))
    delta = (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])
    pipe = copy.deepcopy(tiny_sd3)
    adapterhub.load(tmp_path / "loha.safetensors").merge_into(pipe)
    key = "transformer_blocks.1.norm1_context.linear.weight"
    before, after = tiny_sd3.transformer.state_dict()[key], pipe.transformer.state_dict()[key]
    torch.testing.assert_close(after, before + torch.cat([delta[48:], delta[:48]]), atol=1e-5, rtol=0)
