"""DoRA (weight-decomposed LoRA): read, merge, attach, save, for Stable Diffusion and Flux.

The oracles are the reference implementations themselves: lycoris-lora's own modules
(``weight_decompose=True``, both ``wd_on_out``; their ``get_merged_weight``) and PEFT's
``LoraConfig(use_dora=True)`` (``merge_and_unload``). A file is written with each tool's own state dict,
read with ``adapterhub.load`` and merged; the result must equal the tool's merged weights (float32, 1e-5).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import adapterhub
from adapterhub.errors import AdapterError

ATOL = 1e-5
EPS = torch.finfo(torch.float32).eps  # what lycoris-lora 4.1.3 adds to the norm


def _modules(model, names):
    found = dict(model.named_modules())
    return [found[n] for n in names]


def _lycoris_module(algo: str, name: str, module, wd_on_out: bool, seed: int):
    """A lycoris-lora module with DoRA on ``module``, every factor random (LyCORIS starts one at zero) and
    the magnitude moved away from the base norm (else the result is the base's direction only)."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    extra = {"factor": 4} if algo == "lokr" else {}
    # LoHa / LoKr at alpha = rank: lycoris-lora 4.1.3's LohaModule.get_diff_weight applies alpha / rank twice
    # (once as get_weight's gamma, once more), which no loader does; the LoRA cases test the scale
    alpha = 2 if algo == "lora" else 4
    lyco = cls(name, module, 1.0, lora_dim=4, alpha=alpha, weight_decompose=True, wd_on_out=wd_on_out, **extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in lyco.named_parameters():
            if pname == "dora_scale":
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            elif not pname.startswith("org_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return lyco


def _lycoris_file(path, model, names, prefix, algo="lora", wd_on_out=True, rename=None):
    """``(file, {module name: lycoris' merged weight})``: the modules' own state dicts under ``prefix`` + the
    module path joined by ``_`` (or ``rename(path)``)."""
    tensors, merged = {}, {}
    for i, (name, module) in enumerate(zip(names, _modules(model, names))):
        key = rename(name) if rename else prefix + name.replace(".", "_")
        lyco = _lycoris_module(algo, key, module, wd_on_out, seed=i)
        tensors.update({f"{key}.{k}": v.detach().clone().contiguous() for k, v in lyco.state_dict().items()})
        with torch.no_grad():
            merged[name] = lyco.get_merged_weight(multiplier=1, shape=module.weight.shape)[0].detach().clone()
    save_file(tensors, str(path))
    return path, merged


def _sd1_targets(unet):
    """A Linear, a square Linear (the 1's position tells the orientation) and a 3x3 conv of the tiny UNet."""
    names = [n for n, m in unet.named_modules()]
    linear = next(n for n in names if n.endswith("attn2.to_k"))
    square = next(n for n in names if n.endswith("attn1.to_q"))
    conv = next(n for n in names if n.endswith("resnets.0.conv1"))
    return [linear, square, conv]


def _formula(w, delta, m, s=1.0):
    """The DoRA definition (test-side): ``V = W + delta``, ``D = m V / ||V||`` per output row when ``m`` has
    the output dim, per input channel when it is ``(1, in, ...)``; ``W + s (D - W)``."""
    v = w + delta
    if m.dim() == 1 or (m.shape[0] == w.shape[0] and m.numel() == w.shape[0]):
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
        m = m.reshape(norm.shape)
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (v.dim() - 2))
    return w + s * (m * v / (norm + EPS) - w)


# ---------------------------------------------------------------------------------------------
# the oracles: lycoris-lora and PEFT
# ---------------------------------------------------------------------------------------------
def _peft_dora(model, folder, targets, alpha, seed) -> dict:
    """A PEFT ``use_dora`` LoRA (rank 4) on a copy of ``model`` with random ``lora_B`` and magnitudes off their
    initial norms, saved with PEFT's own ``save_pretrained`` to ``folder``; PEFT's ``merge_and_unload`` state."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=alpha, use_dora=True,
                                                           target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    peft.save_pretrained(str(folder))
    return peft.merge_and_unload().state_dict()


SD3_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
               "transformer_blocks.0.ff.net.2", "transformer_blocks.0.norm1.linear"]


def test_peft_dora_on_the_sd3_transformer_equals_merge_and_unload(tiny_sd3, tmp_path):
    """The same on SD3's MMDiT (its joint blocks' image and context projections, the feed-forward, a modulation)."""
    pipe = copy.deepcopy(tiny_sd3)
    oracle = _peft_dora(pipe.transformer, tmp_path / "peft" / "transformer", SD3_TARGETS, 8, 2)
    adapter = adapterhub.load(tmp_path / "peft")
    assert adapter.family == "sd3" and len(adapter.patches) == len(SD3_TARGETS)
    adapter.merge_into(pipe, 1.0)
    ours = pipe.transformer.state_dict()
    for key in oracle:
        assert torch.allclose(ours[key], oracle[key], atol=ATOL, rtol=0), key


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_dora_merge_equals_lycoris(algo, wd_on_out, fresh_sd1, tmp_path):
    names = _sd1_targets(fresh_sd1.unet)
    path, merged = _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", algo, wd_on_out)
    adapter = adapterhub.load(path)
    assert adapter.type == ("locon" if algo == "lora" else algo)
    adapter.merge_into(fresh_sd1, 1.0)
    for name, module in zip(names, _modules(fresh_sd1.unet, names)):
        assert torch.allclose(module.weight, merged[name], atol=ATOL, rtol=0), name


def test_peft_dora_on_the_sd1_unet_equals_merge_and_unload(fresh_sd1, tmp_path):
    oracle = _peft_dora(fresh_sd1.unet, tmp_path / "peft" / "unet", ["to_q", "to_k", "to_out.0", "proj_in", "conv1"],
                        8, 0)
    adapter = adapterhub.load(tmp_path / "peft")
    assert adapter.type == "locon" and adapter.format == "peft"
    before = {k: v.clone() for k, v in fresh_sd1.unet.state_dict().items()}
    adapter.merge_into(fresh_sd1, 1.0)
    ours = fresh_sd1.unet.state_dict()
    for key in oracle:
        assert torch.allclose(ours[key], oracle[key], atol=ATOL, rtol=0), key
    assert any(k.endswith("conv1.weight") and not torch.equal(ours[k], before[k]) for k in ours)  # a conv DoRA too


@pytest.fixture
def flux(tiny_flux):
    return copy.deepcopy(tiny_flux)


FLUX_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"]


def test_peft_dora_on_the_flux_transformer_equals_merge_and_unload(flux, tmp_path):
    oracle = _peft_dora(flux.transformer, tmp_path / "peft" / "transformer", FLUX_TARGETS, 2, 1)
    adapter = adapterhub.load(tmp_path / "peft")
    assert adapter.family == "flux" and len(adapter.patches) == len(FLUX_TARGETS)
    before = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    adapter.merge_into(flux, 1.0)
    ours = flux.transformer.state_dict()
    assert sum(not torch.equal(ours[k], before[k]) for k in ours) == len(FLUX_TARGETS)
    for key in oracle:
        assert torch.allclose(ours[key], oracle[key], atol=ATOL, rtol=0), key


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_dora_on_the_flux_transformer_equals_lycoris(wd_on_out, flux, tmp_path):
    """LyCORIS' wrapper names (SimpleTuner): ``lycoris_`` + the diffusers path joined by ``_``."""
    path, merged = _lycoris_file(tmp_path / "dora.safetensors", flux.transformer, FLUX_TARGETS, "lycoris_",
                                 "lora", wd_on_out)
    adapterhub.load(path).merge_into(flux, 1.0)
    for name, module in zip(FLUX_TARGETS, _modules(flux.transformer, FLUX_TARGETS)):
        assert torch.allclose(module.weight, merged[name], atol=ATOL, rtol=0), name


# ---------------------------------------------------------------------------------------------
# OneTrainer's Flux DoRA names: lora_transformer_ + dora_scale (1, in), lora_te1_ CLIP, lora_te2_ T5
# ---------------------------------------------------------------------------------------------
ONETRAINER = {
    "transformer": ("transformer", "single_transformer_blocks.0.attn.to_q",
                    "lora_transformer_single_transformer_blocks_0_attn_to_q"),
    "clip": ("text_encoder", "encoder.layers.0.mlp.fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    "t5": ("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q",
           "lora_te2_encoder_block_0_layer_0_SelfAttention_q"),
}


def _onetrainer_file(path, pipe):
    """OneTrainer's names over a lycoris ``wd_on_out=False`` module's tensors on each of ``pipe``'s modules;
    ``{(component, module path): lycoris' merged weight}``."""
    tensors, merged = {}, {}
    for i, (component, module_path, key) in enumerate(ONETRAINER.values()):
        module = dict(getattr(pipe, component).named_modules())[module_path]
        lyco = _lycoris_module("lora", key, module, wd_on_out=False, seed=10 + i)
        tensors.update({f"{key}.{k}": v.detach().clone().contiguous() for k, v in lyco.state_dict().items()})
        with torch.no_grad():
            merged[(component, module_path)] = lyco.get_merged_weight(multiplier=1, shape=module.weight.shape)[0]
    save_file(tensors, str(path))
    return path, merged


def test_onetrainer_flux_dora_merges_as_lycoris(flux, tmp_path):
    path, merged = _onetrainer_file(tmp_path / "onetrainer.safetensors", flux)
    adapter = adapterhub.load(path)
    assert adapter.family == "flux" and adapter.extra["dora"] == len(ONETRAINER)
    adapter.merge_into(flux, 1.0)
    for (component, module_path), expected in merged.items():
        weight = dict(getattr(flux, component).named_modules())[module_path].weight
        assert torch.allclose(weight, expected, atol=ATOL, rtol=0), module_path


def test_onetrainer_flux_dora_binds_to_flux_dev_with_every_key(tmp_path):
    """Shapes of FLUX.1-dev (3072 wide, CLIP-L 768, T5-XXL 4096), rank 1: every key used, every shape exact."""
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    shapes = {"transformer": (3072, 3072), "clip": (3072, 768), "t5": (4096, 4096)}
    tensors = {}
    for part, (_, _, key) in ONETRAINER.items():
        out_f, in_f = shapes[part]
        tensors.update({f"{key}.lora_down.weight": torch.zeros(1, in_f), f"{key}.lora_up.weight": torch.zeros(out_f, 1),
                        f"{key}.alpha": torch.tensor(1.0), f"{key}.dora_scale": torch.ones(1, in_f)})
    save_file(tensors, str(tmp_path / "ot.safetensors"))
    adapter = adapterhub.load(tmp_path / "ot.safetensors")
    used = {k for patch in adapter.patches.values() for k in patch.file_keys.values()}
    assert used == set(tensors)
    bindings = bind(build_transformer_base("flux-dev"), adapter)
    assert len(bindings) == len(ONETRAINER)
    for b in bindings:
        assert tuple(b.patch.expected_shape()) == tuple(b.param.shape), b.patch.target
        assert tuple(b.patch.tensors["dora_scale"].shape) == (1, b.param.shape[1])


# ---------------------------------------------------------------------------------------------
# a fused BFL module: a per-row magnitude splits by rows, a per-column one does not
# ---------------------------------------------------------------------------------------------
def _fused_qkv_file(path, transformer, per_row: bool):
    parts = [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    weights = [m.weight.detach().clone() for m in _modules(transformer, parts)]
    w = torch.cat(weights)
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(w.shape[0], 4, generator=gen) * 0.2, torch.randn(4, w.shape[1], generator=gen) * 0.2
    norm_dims = (w.shape[0], 1) if per_row else (1, w.shape[1])
    m = torch.rand(norm_dims, generator=gen) + 0.5
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": m}, str(path))
    expected = _formula(w, up @ down * 0.5, m)
    return parts, expected.split([x.shape[0] for x in weights])


def test_a_fused_qkv_dora_per_output_row_splits_exactly(flux, tmp_path):
    parts, expected = _fused_qkv_file(tmp_path / "qkv.safetensors", flux.transformer, per_row=True)
    adapterhub.load(tmp_path / "qkv.safetensors").merge_into(flux, 1.0)
    for module, want in zip(_modules(flux.transformer, parts), expected):
        assert torch.allclose(module.weight, want, atol=ATOL, rtol=0)


def test_a_fused_qkv_dora_per_input_column_is_refused_in_one_line(flux, tmp_path):
    _fused_qkv_file(tmp_path / "qkv.safetensors", flux.transformer, per_row=False)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(tmp_path / "qkv.safetensors")
    text = str(err.value)
    assert "qkv.safetensors" in text and "DoRA" in text and "\n" not in text


# ---------------------------------------------------------------------------------------------
# attach / detach, the multiplier, the zero norm
# ---------------------------------------------------------------------------------------------
def test_attach_weights_and_detach_restores_bitwise(fresh_sd1, tmp_path):
    names = _sd1_targets(fresh_sd1.unet)
    path, merged = _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", "lora", True)
    modules = _modules(fresh_sd1.unet, names)
    before = [m.weight.detach().clone() for m in modules]
    adapter = adapterhub.load(path)
    handle = adapter.attach(fresh_sd1, 1.0)
    for module, name in zip(modules, names):
        assert torch.allclose(module.weight, merged[name], atol=ATOL, rtol=0)
    handle.set_weight(0.5)  # the webui's and ComfyUI's rule: W + s (D - W)
    for module, name, w in zip(modules, names, before):
        assert torch.allclose(module.weight, w + 0.5 * (merged[name] - w), atol=ATOL, rtol=0)
    handle.set_weight(0.0)
    assert all(torch.equal(m.weight, w) for m, w in zip(modules, before))
    handle.set_weight(1.0)
    handle.detach()
    assert all(torch.equal(m.weight, w) for m, w in zip(modules, before))


def test_a_zero_norm_column_gives_no_nan(tmp_path):
    """A base row of zeros with no change on it: lycoris' epsilon keeps it zero (no NaN), as lycoris does."""
    lin = torch.nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[2] = 0
    lyco = _lycoris_module("lora", "lora_unet_x", lin, True, seed=0)
    with torch.no_grad():
        lyco.lora_up.weight[2] = 0
        oracle = lyco.get_merged_weight(multiplier=1, shape=lin.weight.shape)[0]
    from adapterhub_plugins.lora.dora import DoRAPatch
    from adapterhub_plugins.lora.patches import LoRAPatch

    sd = lyco.state_dict()
    inner = LoRAPatch("unet.x", "x", {"up": sd["lora_up.weight"], "down": sd["lora_down.weight"]},
                      alpha=float(sd["alpha"]))
    patch = DoRAPatch(inner, sd["dora_scale"])
    acc = lin.weight.detach().clone()
    patch.add_to(acc, 1.0)
    assert torch.isfinite(acc).all() and torch.equal(acc[2], torch.zeros(8))
    assert torch.allclose(acc, oracle, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# what needs no base refuses a DoRA: the algebra, the norm chart; inspect says DoRA
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def sd1_dora(fresh_sd1, tmp_path):
    names = _sd1_targets(fresh_sd1.unet)
    return _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", "lora", True)[0]


def test_the_lora_algebra_refuses_a_dora_in_one_line(sd1_dora):
    from adapterhub.algebra import combine, resize

    adapter = adapterhub.load(sd1_dora)
    patch = next(iter(adapter.patches.values()))
    assert patch.low_rank_factors() is None and patch.squared_norm() is None
    for call in (lambda: resize(adapter, rank=2), lambda: combine([(adapter, 1.0)])):
        with pytest.raises(AdapterError) as err:
            call()
        assert "dora.safetensors" in str(err.value) and "a DoRA module's change depends on the base weights" \
            in str(err.value) and "\n" not in str(err.value)


def test_inspect_keeps_the_type_and_says_dora(sd1_dora, capsys):
    from adapterhub.cli import main

    rc = main(["inspect", "--json", "--no-hash", str(sd1_dora)])
    facts = json.loads(capsys.readouterr().out)
    assert rc in (0, None) and facts["type"] == "locon" and facts["dora"] is True
    assert "unsupported" not in facts
    main(["inspect", "--no-hash", str(sd1_dora)])
    assert "DoRA" in capsys.readouterr().out


def test_cli_merge_of_a_dora_file(fresh_sd1, tmp_path):
    from adapterhub.base import load_base
    from adapterhub.cli import main

    names = _sd1_targets(fresh_sd1.unet)
    path, merged = _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", "lora", False)
    rc = main(["merge", "--base", "tiny-sd1", "--out", str(tmp_path / "merged"), f"{path}:1"])
    assert rc in (0, None)
    out = load_base(str(tmp_path / "merged"))
    for name, module in zip(names, _modules(out.unet, names)):
        assert torch.allclose(module.weight, merged[name], atol=ATOL, rtol=0), name


# ---------------------------------------------------------------------------------------------
# saving: the magnitude kept exactly, or a one-line refusal
# ---------------------------------------------------------------------------------------------
def _merged_unet(pipe, path):
    mine = copy.deepcopy(pipe)
    adapterhub.load(path).merge_into(mine, 1.0)
    return mine.unet.state_dict()


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_kohya_round_trip_keeps_the_magnitude(wd_on_out, tiny_sd1, tmp_path):
    names = _sd1_targets(tiny_sd1.unet)
    path, _ = _lycoris_file(tmp_path / "dora.safetensors", tiny_sd1.unet, names, "lora_unet_", "lora", wd_on_out)
    adapterhub.load(path).save(tmp_path / "again.safetensors", "kohya")
    from safetensors.torch import load_file

    a, b = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("dora_scale"))
    assert {k for k in a if k.endswith("dora_scale")} == {k for k in b if k.endswith("dora_scale")}
    ours, again = _merged_unet(tiny_sd1, path), _merged_unet(tiny_sd1, tmp_path / "again.safetensors")
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_peft_layout_round_trip_and_refusals(tiny_sd1, tmp_path):
    names = _sd1_targets(tiny_sd1.unet)
    per_row, _ = _lycoris_file(tmp_path / "row.safetensors", tiny_sd1.unet, names, "lora_unet_", "lora", True)
    adapterhub.load(per_row).save(tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    ours, again = _merged_unet(tiny_sd1, per_row), _merged_unet(tiny_sd1, tmp_path / "peft")
    assert all(torch.allclose(ours[k], again[k], atol=ATOL, rtol=0) for k in ours)
    # back from PEFT's (out,) to kohya's (out, 1, ...): the same values
    adapterhub.load(tmp_path / "peft").save(tmp_path / "back.safetensors", "kohya")
    back = _merged_unet(tiny_sd1, tmp_path / "back.safetensors")
    assert all(torch.allclose(ours[k], back[k], atol=ATOL, rtol=0) for k in ours)
    per_column, _ = _lycoris_file(tmp_path / "col.safetensors", tiny_sd1.unet, names, "lora_unet_", "lora", False)
    for source, layout, out in ((per_column, "peft", tmp_path / "p2"),
                                (per_column, "diffusers", tmp_path / "d.safetensors")):
        with pytest.raises(AdapterError) as err:
            adapterhub.load(source).save(out, layout)
        assert source.name in str(err.value) and "DoRA" in str(err.value) and "\n" not in str(err.value)
        assert not out.exists()


def test_a_magnitude_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(32, 2),
               f"{name}.dora_scale": torch.randn(5, 1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(err.value) and "dora_scale" in str(err.value)


def test_a_fused_dora_is_written_back_to_its_fused_kohya_module(flux, tiny_flux, tmp_path):
    """Read split by rows, written joined: the magnitudes stacked by rows as the parts' LoRAs are; the same merge."""
    parts, expected = _fused_qkv_file(tmp_path / "qkv.safetensors", flux.transformer, per_row=True)
    adapter = adapterhub.load(tmp_path / "qkv.safetensors")
    adapter.save(tmp_path / "again.safetensors", "kohya")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "qkv.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    key = "lora_unet_double_blocks_0_img_attn_qkv.dora_scale"
    assert torch.equal(a[key], b[key])
    adapterhub.load(tmp_path / "again.safetensors").merge_into(flux, 1.0)
    for module, want in zip(_modules(flux.transformer, parts), expected):
        assert torch.allclose(module.weight, want, atol=ATOL, rtol=0)
    # one part without its DoRA: the fused module's magnitude would need that part's base norms
    del adapter.patches[f"transformer.{parts[1]}"]
    with pytest.raises(AdapterError) as err:
        adapter.save(tmp_path / "part.safetensors", "kohya")
    assert "qkv.safetensors" in str(err.value) and "DoRA" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "part.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_stack_with_a_dora_restores_bitwise_and_reweights(dtype, tmp_path):
    """Beside a plain LoRA on the same modules: the DoRA decomposes what the stack holds before it; weight 0
    is the stack without it (bitwise), and remove restores every tensor bitwise."""
    from adapterhub.base import build_preset
    from adapterhub.plugins import adapter_type
    from adapterhub.stack import Entry, Stack

    def model():
        return build_preset("tiny-sd1", device="cpu", components=("unet", "text_encoder"), seed=11, dtype=dtype)

    def snapshot(m):
        return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
                for k, v in getattr(m, c).state_dict().items()}

    base = model()
    lora = adapterhub.load(adapter_type("lora").example(base, tmp_path / "style.safetensors", seed=1))
    f32 = build_preset("tiny-sd1", device="cpu", components=("unet", "text_encoder"), seed=11)
    dora = adapterhub.load(_lycoris_file(tmp_path / "dora.safetensors", f32.unet, _sd1_targets(f32.unet),
                                         "lora_unet_", "lora", False)[0])
    original = snapshot(base)
    stack = Stack([Entry(lora, 0.8), Entry(dora, 0.7)])
    stack.apply(base)
    changed = snapshot(base)
    target = next(k for k in changed if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(changed[target], original[target])
    stack.set_weights([0.8, 0.0])
    only_lora = model()
    Stack([Entry(lora, 0.8)]).apply(only_lora)
    ours, expected = snapshot(base), snapshot(only_lora)
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    stack.set_weights([0.8, 0.7])
    assert all(torch.equal(snapshot(base)[k], changed[k]) for k in changed)
    stack.remove()
    now = snapshot(base)
    assert all(torch.equal(now[k], original[k]) for k in original)


def test_cli_convert_keeps_the_magnitude(sd1_dora, tmp_path, capsys):
    from safetensors.torch import load_file

    from adapterhub.cli import main

    out = tmp_path / "kohya.safetensors"
    assert main(["convert", str(sd1_dora), "--to", "kohya", "--out", str(out)]) in (0, None)
    a, b = load_file(str(sd1_dora)), load_file(str(out))
    assert [k for k in a if k.endswith("dora_scale")] and all(torch.equal(a[k], b[k]) for k in a if "dora" in k)
    # per output row: diffusers' lora_magnitude_vector (its loader as the oracle, and the refusals: test_dora_diffusers)
    assert main(["convert", str(sd1_dora), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")]) in (0, None)
    d = load_file(str(tmp_path / "d.safetensors"))
    assert sum(k.endswith("lora_magnitude_vector.weight") for k in d) == sum(k.endswith("dora_scale") for k in a)


def test_a_nan_magnitude_is_refused_naming_its_key_and_the_model_untouched(fresh_sd1, tmp_path):
    from safetensors.torch import load_file

    names = _sd1_targets(fresh_sd1.unet)
    path, _ = _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", "lora", True)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("dora_scale"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    before = {k: v.clone() for k, v in fresh_sd1.unet.state_dict().items()}
    with pytest.raises(AdapterError) as err:
        adapterhub.load(tmp_path / "nan.safetensors").merge_into(fresh_sd1, 1.0)
    assert "nan.safetensors" in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh_sd1.unet.state_dict().items())


def test_a_magnitude_that_overflows_the_saved_dtype_is_refused(fresh_sd1, tmp_path):
    """No cheap bound holds for ``D - W`` without the weight: the exact result is checked (here for float16)."""
    from safetensors.torch import load_file

    from adapterhub.weights import merge

    names = _sd1_targets(fresh_sd1.unet)
    path, _ = _lycoris_file(tmp_path / "dora.safetensors", fresh_sd1.unet, names, "lora_unet_", "lora", True)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("dora_scale"))
    tensors[key] = tensors[key] * 1e6
    save_file(tensors, str(tmp_path / "big.safetensors"))
    before = {k: v.clone() for k, v in fresh_sd1.unet.state_dict().items()}
    adapter = adapterhub.load(tmp_path / "big.safetensors")
    with pytest.raises(AdapterError) as err:
        merge(fresh_sd1, [(adapter, 1.0)], dtype=torch.float16)
    assert "big.safetensors" in str(err.value) and "overflows float16" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh_sd1.unet.state_dict().items())


@pytest.mark.parametrize("wd_on_output", [True, False])
def test_lycoris_wrapper_file_on_the_flux_transformer_equals_its_merge_to(wd_on_output, flux, tmp_path):
    """lycoris-lora's own network (``create_lycoris(..., dora_wd=True)``) and writer (``save_weights``) on every
    Linear of the tiny Flux transformer; the oracle is the network's own ``merge_to(1.0)``."""
    from lycoris import create_lycoris

    transformer = copy.deepcopy(flux.transformer)
    net = create_lycoris(transformer, 1.0, linear_dim=4, linear_alpha=2, algo="lora", dora_wd=True,
                         wd_on_output=wd_on_output, warn_on_unmatched=False)
    net.apply_to()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.2)
            lora.dora_scale.mul_(1 + 0.3 * torch.rand(lora.dora_scale.shape, generator=gen))
    net.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, None)
    net.restore()
    net.merge_to(1.0)
    oracle = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    adapter = adapterhub.load(tmp_path / "lycoris.safetensors")
    assert (adapter.family, adapter.extra["dora"]) == ("flux", len(net.loras))
    before = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    adapter.merge_into(flux, 1.0)
    ours = flux.transformer.state_dict()
    assert sum(not torch.equal(ours[k], before[k]) for k in ours) == len(net.loras)  # every Linear changed
    for key in ours:
        assert torch.allclose(ours[key], oracle[key], atol=ATOL, rtol=0), key


def test_a_dora_in_a_flux_control_lora_is_refused_not_dropped(flux, tmp_path):
    """A control LoRA's reader splits plain LoRA pairs only: a magnitude there is refused by name, never lost."""
    w = flux.transformer.transformer_blocks[0].attn.to_q.weight
    norm = flux.transformer.transformer_blocks[0].attn.norm_q.weight
    name = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.randn(2, w.shape[1]), f"{name}.lora_B.weight": torch.randn(w.shape[0], 2),
               f"{name}.lora_magnitude_vector": torch.rand(w.shape[0]) + 0.5,
               "transformer.transformer_blocks.0.attn.norm_q.weight": torch.ones_like(norm)},
              str(tmp_path / "control.safetensors"))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(tmp_path / "control.safetensors")
    assert "control.safetensors" in str(err.value) and "DoRA" in str(err.value) and "\n" not in str(err.value)


def test_flux_dora_files_convert_to_kohya_and_peft_and_merge_the_same(tiny_flux, tmp_path):
    """A per-input-channel file on modules sd-scripts keeps apart as kohya, a per-row one as a PEFT folder
    (``transformer/``, ``use_dora``): each reads back to the same merge. OneTrainer's to_q of a single block is one
    part of sd-scripts' fused ``linear1``, which one part's magnitude cannot fill: refused in one line."""
    unfused = ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.2"]
    per_column, _ = _lycoris_file(tmp_path / "col.safetensors", tiny_flux.transformer, unfused, "lycoris_",
                                  wd_on_out=False)
    per_row, _ = _lycoris_file(tmp_path / "row.safetensors", tiny_flux.transformer, FLUX_TARGETS, "lycoris_")

    def merged(path):
        pipe = copy.deepcopy(tiny_flux)
        adapterhub.load(path).merge_into(pipe, 1.0)
        return {k: v for k, v in pipe.transformer.state_dict().items()}

    for source, layout, out in ((per_column, "kohya", tmp_path / "col_kohya.safetensors"),
                                (per_row, "peft", tmp_path / "row_peft")):
        adapterhub.load(source).save(out, layout)
        assert adapterhub.load(out).extra["dora"] == adapterhub.load(source).extra["dora"]
        a, b = merged(source), merged(out)
        assert all(torch.allclose(a[k], b[k], atol=ATOL, rtol=0) for k in a), (source.name, layout)
    onetrainer, _ = _onetrainer_file(tmp_path / "onetrainer.safetensors", tiny_flux)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(onetrainer).save(tmp_path / "ot.safetensors", "kohya")
    assert "onetrainer.safetensors" in str(err.value) and "DoRA" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ot.safetensors").exists()


def test_a_dora_lokr_on_a_fused_module_is_refused_not_dropped(flux, tmp_path):
    """A LoKr on a fused module patches its parts by rows of its delta; the magnitude has no such split there."""
    w = torch.cat([m.weight for m in _modules(flux.transformer, [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"])])
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    out_f, in_f = w.shape
    save_file({f"{name}.lokr_w1": torch.randn(4, 4), f"{name}.lokr_w2": torch.randn(out_f // 4, in_f // 4) * 0.1,
               f"{name}.alpha": torch.tensor(1.0), f"{name}.dora_scale": torch.rand(out_f, 1) + 0.5},
              str(tmp_path / "lokr.safetensors"))
    with pytest.raises(AdapterError) as err:
        adapterhub.load(tmp_path / "lokr.safetensors")
    assert "lokr.safetensors" in str(err.value) and "DoRA" in str(err.value) and "\n" not in str(err.value)
