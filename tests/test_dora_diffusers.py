"""DoRA in the diffusers layout: ``adapterhub convert <dora file> --to diffusers``, for SD1 / SDXL and Flux / SD3.

The oracle is diffusers' own loader: the converted file, loaded by ``load_lora_weights`` (which turns DoRA on
for a component when its keys hold ``lora_magnitude_vector``) and fused by ``fuse_lora(lora_scale=1.0)``, must
equal our merge of the source (float32, 1e-5). The sources are made by the reference tools: lycoris-lora's own
DoRA module (``wd_on_out=True``, kohya ``dora_scale (out, 1, ...)``) and PEFT's ``use_dora`` (``save_pretrained``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterhub
from adapterhub.cli import main

from lora_helpers import (
    assert_same_weights, diffusers_fused, diffusers_to_sgm, kohya_te_name, ours_merged, parts, quiet, weights,
)
from test_dora import FLUX_TARGETS, SD3_TARGETS, _fused_qkv_file, _lycoris_module, _peft_dora

quiet()
ATOL = 1e-5
MAGNITUDE = ".lora_magnitude_vector.weight"  # PEFT's parameter name, which transformers 5's loader needs
# (component, module path suffix): a Linear, a square Linear, the to_out.0 projection, a 1x1 and a 3x3 conv, the
# text encoders' attention and MLP
SD_TARGETS = (("unet", "attn2.to_k"), ("unet", "attn1.to_q"), ("unet", "attn1.to_out.0"), ("unet", "proj_in"),
              ("unet", "resnets.0.conv1"), ("text_encoder", "self_attn.q_proj"), ("text_encoder", "mlp.fc1"),
              ("text_encoder_2", "self_attn.v_proj"))
TE_PREFIX = {"tiny-sd1": {"text_encoder": "lora_te"}, "tiny-sdxl": {"text_encoder": "lora_te1",
                                                                    "text_encoder_2": "lora_te2"}}


def _kohya_name(arch: str, component: str, path: str) -> str:
    """sd-scripts' module name (test-side: diffusers paths for SD1, sgm paths for SDXL)."""
    if component != "unet":
        return kohya_te_name(TE_PREFIX[arch][component], path)
    return "lora_unet_" + (diffusers_to_sgm(path) if arch == "tiny-sdxl" else path).replace(".", "_")


def _kohya_dora(path, arch: str, wd_on_out: bool = True, plain=()) -> dict:
    """A kohya file of lycoris-lora's own DoRA modules on the first module of ``arch`` ending with each of
    ``SD_TARGETS`` (the components it has); the modules whose suffix is in ``plain`` without their magnitude
    (a plain LoRA). Returns {kohya name: (component, module path)}."""
    base = parts(arch)
    tensors, names = {}, {}
    for i, (component, suffix) in enumerate(SD_TARGETS):
        root = getattr(base, component, None)
        if root is None or component not in ("unet", *TE_PREFIX[arch]):
            continue
        module_path, module = next((n, m) for n, m in root.named_modules() if n.endswith(suffix))
        name = _kohya_name(arch, component, module_path)
        lyco = _lycoris_module("lora", name, module, wd_on_out, seed=20 + i)
        for key, value in lyco.state_dict().items():
            if not (key == "dora_scale" and suffix in plain):
                tensors[f"{name}.{key}"] = value.detach().clone().contiguous()
        names[name] = (component, module_path)
    save_file(tensors, str(path))
    return names


def _convert(source, out, to="diffusers") -> int:
    rc = main(["convert", str(source), "--to", to, "--out", str(out)])
    return 0 if rc is None else rc


def _magnitude_modules(path) -> set[str]:
    return {k.removesuffix(MAGNITUDE) for k in load_file(str(path)) if k.endswith(MAGNITUDE)}


# ---------------------------------------------------------------------------------------------
# Stable Diffusion: the UNet and the text encoders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_kohya_dora_to_diffusers_is_fused_by_diffusers_as_we_merge(arch, tmp_path):
    source, out = tmp_path / "dora.safetensors", tmp_path / "diffusers.safetensors"
    names = _kohya_dora(source, arch)
    assert _convert(source, out) == 0
    # diffusers' own module names (its loader drops a text encoder's ``text_model.``, as transformers 5 does)
    expected = {f"{c}.{p}" for c, p in names.values()}
    assert {m.replace("text_model.", "") for m in _magnitude_modules(out)} == {m.replace("text_model.", "")
                                                                              for m in expected}
    ours, original = ours_merged(arch, [(source, 1.0)]), weights(parts(arch))
    assert_same_weights(ours, diffusers_fused(arch, [(out, 1.0)]), original=original, atol=ATOL)
    assert_same_weights(ours_merged(arch, [(out, 1.0)]), ours, original=original, atol=ATOL)  # read back by us


def test_peft_dora_to_diffusers_is_fused_by_diffusers_as_we_merge(tmp_path):
    """PEFT's own ``use_dora`` folder (the UNet's projections and convs, magnitudes ``(out,)`` / ``(1, out, 1, 1)``)."""
    base = parts("tiny-sd1")
    _peft_dora(base.unet, tmp_path / "peft" / "unet", ["to_q", "to_k", "to_out.0", "proj_in", "conv1"], 8, 0)
    out = tmp_path / "diffusers.safetensors"
    assert _convert(tmp_path / "peft", out) == 0
    ours = ours_merged("tiny-sd1", [(tmp_path / "peft", 1.0)])
    assert_same_weights(ours, diffusers_fused("tiny-sd1", [(out, 1.0)]), original=weights(parts("tiny-sd1")),
                        atol=ATOL)


def test_dora_on_the_unet_and_a_plain_lora_on_the_text_encoder(tmp_path):
    """diffusers makes one LoRA config per component: DoRA on one and not on another reads back as written."""
    source, out = tmp_path / "mixed.safetensors", tmp_path / "diffusers.safetensors"
    _kohya_dora(source, "tiny-sd1", plain=("self_attn.q_proj", "mlp.fc1"))
    assert _convert(source, out) == 0
    assert {m.split(".")[0] for m in _magnitude_modules(out)} == {"unet"}
    ours = ours_merged("tiny-sd1", [(source, 1.0)])
    assert_same_weights(ours, diffusers_fused("tiny-sd1", [(out, 1.0)]), original=weights(parts("tiny-sd1")),
                        atol=ATOL)


def test_diffusers_to_kohya_to_diffusers_keeps_every_tensor(tmp_path):
    source = tmp_path / "dora.safetensors"
    _kohya_dora(source, "tiny-sd1")
    first, kohya, again = tmp_path / "d1.safetensors", tmp_path / "k.safetensors", tmp_path / "d2.safetensors"
    adapterhub.load(source).save(first, format="diffusers")
    adapterhub.load(first).save(kohya, format="kohya")
    adapterhub.load(kohya).save(again, format="diffusers")
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and any(k.endswith(MAGNITUDE) for k in a)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # and the diffusers file reads back (adapterhub.load) to the source's merge
    assert_same_weights(ours_merged("tiny-sd1", [(first, 1.0)]), ours_merged("tiny-sd1", [(source, 1.0)]),
                        original=weights(parts("tiny-sd1")), atol=ATOL)


# ---------------------------------------------------------------------------------------------
# refusals: one line naming the file, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def _refused(source, out, capsys, *words) -> str:
    capsys.readouterr()
    rc = _convert(source, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error" in err[0] and source.name in err[0], err
    assert "Traceback" not in err[0] and not out.exists()
    assert all(w in err[0] for w in words), err[0]
    return err[0]


def test_a_magnitude_per_input_channel_is_refused_in_one_line(tmp_path, capsys):
    """LyCORIS ``wd_on_out=False`` / OneTrainer: ``(1, in)`` has no ``lora_magnitude_vector`` form."""
    source = tmp_path / "columns.safetensors"
    names = _kohya_dora(source, "tiny-sd1", wd_on_out=False)
    line = _refused(source, tmp_path / "d.safetensors", capsys, "DoRA", "input channel", "diffusers")
    assert any(name in line for name in names)  # the module


def test_dora_and_plain_modules_in_one_component_are_refused_in_one_line(tmp_path, capsys):
    """PEFT's ``use_dora`` is one flag per model: diffusers would give the plain module a magnitude of its own."""
    source = tmp_path / "mix.safetensors"
    _kohya_dora(source, "tiny-sd1", plain=("proj_in",))
    _refused(source, tmp_path / "d.safetensors", capsys, "DoRA", "unet")


# ---------------------------------------------------------------------------------------------
# Flux and SD3: the transformer (a fused BFL module's parts each with their own rows) and the text encoders
# ---------------------------------------------------------------------------------------------
def _fused_by_diffusers(pipe, path, components) -> dict:
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="oracle")
    ref.fuse_lora(components=list(components), lora_scale=1.0)
    ref.unload_lora_weights()
    return _state(ref, components)


def _ours(pipe, path, components) -> dict:
    mine = copy.deepcopy(pipe)
    adapterhub.load(path).merge_into(mine, 1.0)
    return _state(mine, components)


def _state(pipe, components) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c in components for k, v in getattr(pipe, c).state_dict().items()}


def _lycoris_flux(path, pipe) -> None:
    """LyCORIS' wrapper names on four transformer modules and sd-scripts' ``lora_te1_`` on two CLIP modules (an
    attention projection among them: diffusers' text-encoder loader infers its key form from one)."""
    tensors = {}
    modules = [("transformer", t, "lycoris_" + t.replace(".", "_")) for t in FLUX_TARGETS]
    modules += [("text_encoder", f"encoder.layers.0.{m}", f"lora_te1_text_model_encoder_layers_0_{m.replace('.', '_')}")
                for m in ("self_attn.q_proj", "mlp.fc1")]
    for i, (component, module_path, key) in enumerate(modules):
        module = dict(getattr(pipe, component).named_modules())[module_path]
        lyco = _lycoris_module("lora", key, module, wd_on_out=True, seed=30 + i)
        tensors.update({f"{key}.{k}": v.detach().clone().contiguous() for k, v in lyco.state_dict().items()})
    save_file(tensors, str(path))


@pytest.mark.parametrize("source_kind", ["lycoris", "fused-qkv"])
def test_flux_dora_to_diffusers_is_fused_by_diffusers_as_we_merge(source_kind, tiny_flux, tmp_path):
    source, out = tmp_path / "dora.safetensors", tmp_path / "diffusers.safetensors"
    if source_kind == "lycoris":
        _lycoris_flux(source, tiny_flux)
        components = ("transformer", "text_encoder")
    else:  # sd-scripts' fused img_attn_qkv, magnitude (3 * width, 1): each diffusers part gets its own rows
        _fused_qkv_file(source, tiny_flux.transformer, per_row=True)
        components = ("transformer",)
    assert _convert(source, out) == 0
    written = _magnitude_modules(out)
    if source_kind == "fused-qkv":
        assert written == {f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    before = _state(tiny_flux, components)
    oracle, ours = _fused_by_diffusers(tiny_flux, out, components), _ours(tiny_flux, source, components)
    assert_same_weights(ours, oracle, original=before, atol=ATOL)
    assert_same_weights(_ours(tiny_flux, out, components), ours, original=before, atol=ATOL)  # read back by us


def test_sd3_peft_dora_to_diffusers_is_fused_by_diffusers_as_we_merge(tiny_sd3, tmp_path):
    _peft_dora(tiny_sd3.transformer, tmp_path / "peft" / "transformer", SD3_TARGETS, 8, 2)
    out = tmp_path / "diffusers.safetensors"
    assert _convert(tmp_path / "peft", out) == 0
    assert len(_magnitude_modules(out)) == len(SD3_TARGETS)
    before = _state(tiny_sd3, ("transformer",))
    oracle = _fused_by_diffusers(tiny_sd3, out, ("transformer",))
    assert_same_weights(_ours(tiny_sd3, tmp_path / "peft", ("transformer",)), oracle, original=before, atol=ATOL)


def test_a_flux_magnitude_per_input_channel_is_refused_in_one_line(tiny_flux, tmp_path, capsys):
    """OneTrainer's Flux DoRA (``(1, in)`` on every module)."""
    from test_dora import _onetrainer_file

    source, _ = _onetrainer_file(tmp_path / "onetrainer.safetensors", tiny_flux)
    _refused(source, tmp_path / "d.safetensors", capsys, "DoRA", "input channel")


def test_a_dora_on_one_part_of_a_fused_flux_module_goes_to_diffusers_not_kohya(tiny_flux, tmp_path, capsys):
    """PEFT DoRA on ``to_q`` alone: sd-scripts' fused ``img_attn_qkv`` would need ``to_k`` / ``to_v``'s norms, so kohya
    refuses and says which layouts carry it; diffusers keeps the modules apart and takes it (its loader the oracle)."""
    _peft_dora(tiny_flux.transformer, tmp_path / "peft" / "transformer", ["transformer_blocks.0.attn.to_q"], 4, 5)
    capsys.readouterr()
    assert _convert(tmp_path / "peft", tmp_path / "k.safetensors", to="kohya") == 2
    line = capsys.readouterr().err.strip()
    assert "to_k" in line and "diffusers" in line and "\n" not in line and not (tmp_path / "k.safetensors").exists()
    out = tmp_path / "diffusers.safetensors"
    assert _convert(tmp_path / "peft", out) == 0
    before = _state(tiny_flux, ("transformer",))
    oracle = _fused_by_diffusers(tiny_flux, out, ("transformer",))
    assert_same_weights(_ours(tiny_flux, tmp_path / "peft", ("transformer",)), oracle, original=before, atol=ATOL)
