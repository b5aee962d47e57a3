"""SD3 / SD3.5 and FLUX.1 (issue #21, first slice): bases, reading the LoRA layouts, merging.

The oracle for every layout is diffusers' own loader (``load_lora_weights`` + ``fuse_lora``) on the
same tiny base; our merge must equal it within 1e-5 (float32).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from flux_helpers import RANK, bfl_file as _bfl_file, lora_pair as _lora, peft_file as _peft_file
from flux_helpers import assert_same as _assert_same, diffusers_fused as _diffusers_fused, ours_merged as _ours_merged
from flux_helpers import state as _state
from flux_helpers import cli as _cli


# ---------------------------------------------------------------------------------------------
# merge equals diffusers' fuse_lora, per layout
# ---------------------------------------------------------------------------------------------
FLUX_PEFT_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
                   "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out",
                   "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
                   "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.attn.to_q",
                   "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out",
                   "single_transformer_blocks.0.norm.linear", "x_embedder", "context_embedder", "proj_out"]


def test_flux_peft_merge_equals_diffusers(tiny_flux, tmp_path):
    path = _peft_file(tmp_path / "flux_peft.safetensors", tiny_flux.transformer, FLUX_PEFT_PATHS)
    _assert_same(_ours_merged(tiny_flux, path), _diffusers_fused(tiny_flux, path), _state(tiny_flux),
                 len(FLUX_PEFT_PATHS))


SD3_PEFT_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
                  "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
                  "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_out.0",
                  "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                  "transformer_blocks.1.norm1.linear", "transformer_blocks.0.attn.to_out.0"]


def test_sd3_peft_merge_equals_diffusers(tiny_sd3, tmp_path):
    path = _peft_file(tmp_path / "sd3_peft.safetensors", tiny_sd3.transformer, SD3_PEFT_PATHS)
    _assert_same(_ours_merged(tiny_sd3, path), _diffusers_fused(tiny_sd3, path), _state(tiny_sd3),
                 len(SD3_PEFT_PATHS))


# diffusers' kohya converter writes the single blocks' linear1 split sizes for the real Flux width
# (3072 x 3 + 12288), and names the top-level modules (img_in, final_layer ...) without ``transformer.``,
# so its loader drops them; on the tiny base the blocks are compared end to end, and linear1 and the
# top-level modules against the converter's own output below.
TOP_LEVEL = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_flux_bfl_merge_equals_diffusers(tiny_flux, tmp_path, style):
    path = _bfl_file(tmp_path / f"flux_{style}.safetensors", tiny_flux.transformer, style,
                     skip=("linear1", *TOP_LEVEL))
    _assert_same(_ours_merged(tiny_flux, path), _diffusers_fused(tiny_flux, path), _state(tiny_flux), 32)


def _assert_patches_equal_converter(adapter, theirs, count):
    targets = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert {t.removeprefix("transformer.") for t in adapter.patches} == {t.removeprefix("transformer.")
                                                                         for t in targets}
    assert len(targets) == count
    for target in targets:
        expected = theirs[f"{target}.lora_B.weight"] @ theirs[f"{target}.lora_A.weight"]
        patch = adapter.patches["transformer." + target.removeprefix("transformer.")]
        got = patch.delta(torch.zeros(patch.expected_shape()))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=target)


def test_flux_top_level_modules_equal_diffusers_converter(tiny_flux, tmp_path):
    """img_in, txt_in, the time / vector / guidance embedders and the final layer, whose (shift, scale)
    rows diffusers' ``norm_out`` holds as (scale, shift). The converter ignores the final layer's alpha (kohya
    applies alpha / rank to every module, as we do), so alpha = rank here, where both rules agree."""
    import adapterhub
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import load_file

    path = _bfl_file(tmp_path / "top.safetensors", tiny_flux.transformer, "kohya", skip=("blocks",), alpha=RANK)
    theirs = _convert_kohya_flux_lora_to_diffusers(load_file(str(path)))
    _assert_patches_equal_converter(adapterhub.load(path), theirs, 10)
    merged = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(merged)
    assert not torch.equal(merged.transformer.norm_out.linear.weight, tiny_flux.transformer.norm_out.linear.weight)


def test_kohya_linear1_split_equals_diffusers_converter_at_flux_width(tmp_path):
    """A single block's fused linear1 (q, k, v, MLP: 3 x 3072 + 12288 rows) and a double block's qkv,
    at the real width, against ``diffusers.loaders.lora_conversion_utils``' kohya converter."""
    import adapterhub
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(3)
    sd = {}
    fused = {"lora_unet_single_blocks_5_linear1": 3 * 3072 + 12288, "lora_unet_double_blocks_2_txt_attn_qkv": 3 * 3072}
    for name, rows in fused.items():
        up, down = _lora(rows, 3072, gen, rank=2)
        sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)})
    save_file(sd, str(tmp_path / "linear1.safetensors"))
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    adapter = adapterhub.load(tmp_path / "linear1.safetensors")
    _assert_patches_equal_converter(adapter, theirs, 7)
    assert adapter.family == "flux" and adapter.base == "flux"


def test_flux_kohya_attach_detach_is_bitwise_and_equals_merge(tiny_flux, tmp_path):
    import adapterhub

    path = _bfl_file(tmp_path / "flux_kohya.safetensors", tiny_flux.transformer, "kohya")
    before = _state(tiny_flux)
    pipe = copy.deepcopy(tiny_flux)
    handle = adapterhub.load(path).attach(pipe, 0.7)
    attached = _state(pipe)
    handle.detach()
    after = _state(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    merged = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(merged, 0.7)
    assert all(torch.equal(attached[k], v) for k, v in _state(merged).items())
    assert sum(not torch.equal(attached[k], before[k]) for k in before) > 40


# ---------------------------------------------------------------------------------------------
# inspect: family and base from shapes; merge from the command line; bad input
# ---------------------------------------------------------------------------------------------
def _header_file(path, modules, metadata=None):
    """A rank-1 LoRA with the given ``{module name: (out, in)}`` widths (real widths cost little at rank 1)."""
    sd = {}
    for name, (out_f, in_f) in modules.items():
        down_key, up_key = ((".lora_A.weight", ".lora_B.weight") if name.startswith("transformer.")
                            else (".lora_down.weight", ".lora_up.weight"))
        sd[name + down_key], sd[name + up_key] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
    save_file(sd, str(path), metadata=metadata)
    return path


INSPECTED = [
    ({"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}, "flux", "flux"),
    ({"diffusion_model.single_blocks.3.linear1": (21504, 3072)}, "flux", "flux"),
    ({"transformer.single_transformer_blocks.0.proj_out": (3072, 15360)}, "flux", "flux"),
    ({"transformer.transformer_blocks.0.ff_context.net.2": (2432, 9728)}, "sd3", "sd3.5-large"),
    ({"transformer.single_transformer_blocks.0.norm.linear": (96, 32)}, "flux", "tiny-flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)}, "flux", "flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, "sd3", "sd3-medium"),
    ({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536),
      "transformer.transformer_blocks.0.attn2.to_q": (1536, 1536)}, "sd3", "sd3.5-medium"),
    ({"transformer.transformer_blocks.0.attn.to_k": (2432, 2432)}, "sd3", "sd3.5-large"),
    ({"transformer.transformer_blocks.1.attn.to_v": (48, 48)}, "sd3", "tiny-sd3"),
    ({"transformer.transformer_blocks.1.attn.add_q_proj": (32, 32)}, "flux", "tiny-flux"),
]


@pytest.mark.parametrize("modules,family,base", INSPECTED)
def test_inspect_names_family_and_base_from_shapes(tmp_path, capsys, modules, family, base):
    path = _header_file(tmp_path / "a.safetensors", modules)
    rc, out, _ = _cli(capsys, "inspect", "--json", "--no-hash", str(path))
    facts = json.loads(out)
    assert rc == 0 and (facts["family"], facts["base"]) == (family, base)


def test_inspect_falls_back_to_metadata_for_the_family(tmp_path, capsys):
    """A width that tells nothing (the context embedder takes T5's 4096 in both families): metadata decides."""
    path = _header_file(tmp_path / "a.safetensors", {"transformer.context_embedder": (1536, 4096)},
                        metadata={"modelspec.architecture": "stable-diffusion-3.5-medium/lora"})
    rc, out, _ = _cli(capsys, "inspect", "--json", "--no-hash", str(path))
    facts = json.loads(out)
    assert rc == 0 and (facts["family"], facts["base"]) == ("sd3", "sd3.5-medium")


@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])
def test_cli_merge_equals_diffusers(tmp_path, capsys, base, request):
    from diffusers import DiffusionPipeline

    pipe = request.getfixturevalue(base.replace("-", "_"))
    if base == "tiny-flux":
        path, changed = _bfl_file(tmp_path / "a.safetensors", pipe.transformer, "kohya",
                                  skip=("linear1", *TOP_LEVEL)), 32
    else:
        path, changed = _peft_file(tmp_path / "a.safetensors", pipe.transformer, SD3_PEFT_PATHS), len(SD3_PEFT_PATHS)
    rc, out, err = _cli(capsys, "merge", str(path), "--base", base, "--out", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    ours = {k: v.detach() for k, v in merged.transformer.state_dict().items()}
    _assert_same(ours, _diffusers_fused(pipe, path), _state(pipe), changed)


def test_ai_toolkit_flux_file_with_wrong_metadata_is_flux(tmp_path, capsys):
    """As a real ai-toolkit file (see the wild adapters' notes): only single blocks' proj_out (input: attention
    + MLP, 5 x 3072) and ``ss_base_model_version=sd_1.5``, which is wrong; the shapes win."""
    modules = {f"transformer.single_transformer_blocks.{i}.proj_out": (3072, 15360) for i in range(4)}
    path = _header_file(tmp_path / "a.safetensors", modules, metadata={"ss_base_model_version": "sd_1.5"})
    rc, out, _ = _cli(capsys, "inspect", "--json", "--no-hash", str(path))
    facts = json.loads(out)
    assert rc == 0 and (facts["family"], facts["base"], facts["targets"]) == ("flux", "flux", 4)


def test_fused_module_of_another_kind_is_refused_in_one_line(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    # a LoHa with Tucker cores (a conv kernel): 2-D LoKr / LoHa / diffs split by rows (test_flux_fused_lycoris)
    shapes = {"hada_w1_a": (2, 96), "hada_w1_b": (2, 32), "hada_w2_a": (2, 96), "hada_w2_b": (2, 32),
              "hada_t1": (2, 2, 1, 1), "hada_t2": (2, 2, 1, 1)}
    sd = {f"{name}.{role}": torch.randn(shape, generator=gen) for role, shape in shapes.items()}
    save_file(sd, str(tmp_path / "loha.safetensors"))
    rc, out, err = _cli(capsys, "merge", str(tmp_path / "loha.safetensors"), "--base", "tiny-flux",
                        "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]  # the rest: progress lines
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "loha.safetensors" in err and "fused module" in err and name in err
    assert not (tmp_path / "out").exists()


def test_flux_adapter_on_an_sd3_base_is_refused_before_any_change(tiny_sd3, tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError

    path = _peft_file(tmp_path / "flux.safetensors", adapterhub.load_base("tiny-flux").transformer,
                      ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"])
    pipe = copy.deepcopy(tiny_sd3)
    before = _state(pipe)
    with pytest.raises(AdapterError, match="flux.safetensors: no module transformer.single_transformer_blocks"):
        adapterhub.load(path).merge_into(pipe)
    assert all(torch.equal(v, before[k]) for k, v in _state(pipe).items())


def test_presets_have_the_published_shapes():
    """On the meta device (no memory): Flux 11.9 B parameters, SD3.5 Large 8.1 B, SD3.5 Medium 2.2 B."""
    from adapterhub.transformer_bases import build_transformer_base

    counts = {name: sum(p.numel() for p in build_transformer_base(name).transformer.parameters())
              for name in ("flux-dev", "flux-schnell", "sd3.5-medium", "sd3.5-large")}
    assert counts == {"flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560, "sd3.5-medium": 2_243_171_520,
                      "sd3.5-large": 8_056_627_520}


@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])
def test_diffusers_written_lora_with_alpha_metadata_equals_diffusers(tmp_path, base, request):
    """A file as diffusers' ``save_lora_weights`` writes it after PEFT training: ``lora_alpha`` (here 8 at
    rank 4, scale 2) lives only in the ``lora_adapter_metadata`` header, not in the tensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = request.getfixturevalue(base.replace("-", "_"))
    trained = copy.deepcopy(pipe.transformer)
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["to_q", "to_v", "add_k_proj", "proj_mlp", "ff.net.2"])
    trained.add_adapter(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    type(pipe).save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(trained),
                                 transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _assert_same(_ours_merged(pipe, path), _diffusers_fused(pipe, path), _state(pipe), 8)


def test_tiny_bases_are_reproducible_and_offline(tiny_flux, monkeypatch):
    """Built from the fixed seed with nothing fetched (the hub is unreachable here): the same weights each
    time, and every text encoder has a tokenizer that works (T5's is built with ``tokenizers``)."""
    from adapterhub.base import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_base("tiny-flux")
    assert all(torch.equal(v, again.transformer.state_dict()[k]) for k, v in tiny_flux.transformer.state_dict().items())
    assert type(again).__name__ == "FluxPipeline" and again.transformer.config.guidance_embeds
    ids = again.tokenizer_2("a red fox", return_tensors="pt").input_ids
    assert ids[0, -1].item() == again.tokenizer_2.eos_token_id and ids.max() < again.text_encoder_2.config.vocab_size
