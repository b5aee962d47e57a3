"""What adapterhub writes in the kohya / A1111 layout names every module as the other tools do (issue #15).

kohya's SDXL scripts (``sdxl_train_network.py``, ``networks/sdxl_merge_lora.py``, ``train_network.py
--network_weights``) and LyCORIS inside them build their module names from sd-scripts'
``SdxlUNet2DConditionModel``, whose modules carry the original sgm names (``input_blocks.4.1``); A1111
maps ``lora_unet_<name>`` onto its sgm model the same way, and ComfyUI accepts those names too. SD1/SD2
keep the diffusers block names sd-scripts writes for them.

Oracles, none of them our own tables:

* the sgm module names of a UNet: diffusers' single-file converter (``convert_ldm_unet_checkpoint``) maps
  each tagged tensor of an ldm/sgm state dict onto the diffusers parameter it belongs to; the kohya name
  of an sgm module is ``lora_unet_`` + its path with ``.`` -> ``_`` (sd-scripts ``create_modules``);
* diffusers' kohya loader (``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``)
  names the module each key reaches;
* diffusers ``load_lora_weights`` + ``fuse_lora`` of LoRA / LoCon files equals our merge (1e-5);
* lycoris-lora's kohya loader (``create_network_from_weights`` + ``merge_to``), given the UNet's own modules
  hung at their sgm paths under containers of the classes sd-scripts' SDXL UNet has there, builds every
  module of a LoRA / LoCon / LoHa / LoKr file and merges to our weights (1e-5);
* ComfyUI's key rules (restated from ``comfy/lora.py``) use every key of the diffusers layout.

Every type (LoRA, LoCon, LoHa, LoKr, full diff, norms) and every writer (save / convert, combine, resize,
extract, train) is checked on tiny-sd1 and tiny-sdxl; the naming rule is also checked on the real SDXL
and SD1 configurations, built on the meta device.
"""
from __future__ import annotations

import pytest
import torch
from lora_helpers import (ATOL, assert_same_weights, diffusers_fused, diffusers_kohya_names, ours_merged, parts,
                          quiet, snapshot)
from safetensors import safe_open

import adapterhub
from adapterhub.types import Adapter
from adapterhub_plugins.lora.patches import DiffPatch, LoHaPatch, LoKrPatch, LoRAPatch
from adapterhub_plugins.lora.save import kohya_tensors, save
from adapterhub_plugins.lora.targets import target_modules

quiet()
KINDS = ("lora", "locon", "loha", "lokr", "full", "norm")
SDXL_LIKE = ("sdxl", "tiny-sdxl")


# ---------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------
def _sgm_modules(unet) -> dict[str, str]:
    """sgm module path -> diffusers module path, as diffusers' single-file converter pairs them.

    The candidate sgm keys are ours (the checkpoint writer's); each carries a distinct tag, and only the
    pairs the converter itself makes (tag in, same tag out at a diffusers parameter) are kept."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from adapterhub.checkpoint import unet_to_ldm

    keys = list(unet_to_ldm(unet))  # model.diffusion_model.<sgm key>, as a single file holds them
    ldm = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == set(unet.state_dict()), "the converter must reach every diffusers parameter"
    pairs = {}
    for diffusers_key, tag in converted.items():
        sgm_key = keys[int(tag.item())].removeprefix("model.diffusion_model.")
        for suffix in (".weight", ".bias"):
            if sgm_key.endswith(suffix) and diffusers_key.endswith(suffix):
                pairs[sgm_key[: -len(suffix)]] = diffusers_key[: -len(suffix)]
    return pairs


_NAMES: dict[tuple[int, str], dict[str, str]] = {}  # per model object: the real SDXL takes seconds


def _kohya_module_names(model, arch: str) -> dict[str, str]:
    """Every kohya module name the tools accept for ``model`` -> the canonical target it means."""
    if (id(model), arch) not in _NAMES:
        _NAMES[(id(model), arch)] = _module_names(model, arch)
    return _NAMES[(id(model), arch)]


def _module_names(model, arch: str) -> dict[str, str]:
    sdxl = arch in SDXL_LIKE
    names = {}
    if sdxl:
        for sgm, path in _sgm_modules(model.unet).items():
            names["lora_unet_" + sgm.replace(".", "_")] = f"unet.{path}"
    else:
        for path, _ in model.unet.named_modules():
            if path:
                names["lora_unet_" + path.replace(".", "_")] = f"unet.{path}"
    prefixes = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    for comp, prefix in prefixes.items():
        encoder = getattr(model, comp, None)
        if encoder is None:
            continue
        for path, _ in encoder.named_modules():
            full = path if path.startswith("text_model.") or path.startswith("text_projection") else \
                f"text_model.{path}"  # sd-scripts names the transformers < 5 paths
            if path:
                names[f"{prefix}_{full.replace('.', '_')}"] = f"{comp}.{full}"
    return names


def _same_module(a: str, b: str) -> bool:
    flat = lambda p: p.replace(".text_model.", ".")  # noqa: E731 - transformers 5 flattens CLIPTextModel
    return flat(a) == flat(b)


def check_names(keys, patches_by_target, model, arch: str, loader: bool = True) -> int:
    """Every key's module name is one the tools derive from the real module tree, meaning the module we
    patched; with ``loader``, diffusers' kohya loader lands it on that module too (its converter has no
    rule for norm layers: ``in_layers_0``, ``conv_norm_out``, ``layer_norm1``). Returns the module count."""
    accepted = _kohya_module_names(model, arch)
    modules = {k.split(".", 1)[0] for k in keys}  # kohya module names hold no dots
    wrong = sorted(m for m in modules if m not in accepted)
    assert not wrong, f"{len(wrong)} of {len(modules)} names no tool maps, e.g. {wrong[:3]}"
    assert {accepted[m] for m in modules} == set(patches_by_target), "names must mean the patched modules"
    if arch in SDXL_LIKE:
        assert not any(m.startswith("lora_te_") for m in modules)
    if not loader:
        return len(modules)
    # diffusers' kohya converter is defined for the text encoders' attention and MLP layers only (it
    # cannot infer a state-dict type from LayerNorm names), and maps label_emb / add_embedding wrongly
    # (0.42.1: "unet.add.embedding.linear" for both)
    checked = {m for m in modules if ("label_emb" not in m and "add_embedding" not in m)
               and (m.startswith("lora_unet_") or "_self_attn_" in m or "_mlp_" in m)}
    reference = diffusers_kohya_names(checked, model.unet.config)
    missed = sorted(m for m in checked if not _same_module(reference.get(m, "?"), accepted[m]))
    assert not missed, f"diffusers' loader misplaces {len(missed)}, e.g. {missed[:3]}"
    return len(modules)


# ---------------------------------------------------------------------------------------------
# adapters of every type on every module the type targets
# ---------------------------------------------------------------------------------------------
def _rand(gen, *shape, device):
    if str(device) == "meta":  # the real configurations: shapes only
        return torch.empty(*shape, device="meta")
    return (torch.randn(*shape, generator=gen) * 0.05).to(device)


def _norm_modules(model):
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        root = getattr(model, comp, None)
        if root is None:
            continue
        for path, module in root.named_modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                prefix = "text_model." if comp != "unet" and not path.startswith("text_model.") else ""
                yield f"{comp}.{prefix}{path}", module


def build(kind: str, model, base: str, rank: int = 2, alpha: float = 1.0) -> Adapter:
    """A random adapter of ``kind`` on every module it targets (``full``: every Linear/Conv weight and
    bias; ``norm``: every GroupNorm/LayerNorm weight and bias)."""
    gen = torch.Generator().manual_seed(7)
    dev = next(model.unet.parameters()).device
    patches = {}
    if kind in ("full", "norm"):
        items = _norm_modules(model) if kind == "norm" else target_modules(model, conv=True).items()
        for target, module in items:
            patches[target] = DiffPatch(target, target, {"diff": _rand(gen, *module.weight.shape, device=dev)})
            if module.bias is not None:
                patches[target + "#bias"] = DiffPatch(target, target, {"diff": _rand(gen, *module.bias.shape,
                                                                                     device=dev)}, param="bias")
        return Adapter(type="lora", format="lycoris", patches=patches, base=base)
    for target, module in target_modules(model, conv=kind != "lora").items():
        w = module.weight
        out, fan_in, kernel = w.shape[0], w[0].numel(), tuple(w.shape[2:])
        if kind == "lora" and kernel not in ((), (1, 1)):
            continue
        if kind in ("lora", "locon"):
            tensors = {"down": _rand(gen, rank, w.shape[1], *kernel, device=dev),
                       "up": _rand(gen, out, rank, *(1,) * len(kernel), device=dev)}
            patches[target] = LoRAPatch(target, target, tensors, alpha=alpha)
        elif kind == "loha":
            tensors = {f"hada_w{i}_{ab}": _rand(gen, *((out, rank) if ab == "a" else (rank, fan_in)), device=dev)
                       for i in (1, 2) for ab in "ab"}
            patches[target] = LoHaPatch(target, target, tensors, alpha=alpha)
        else:  # LoKr with a 1x1 first factor: l = m = 1, the second factor low-rank
            tensors = {"lokr_w1": torch.ones(1, 1, device=dev), "lokr_w2_a": _rand(gen, out, rank, device=dev),
                       "lokr_w2_b": _rand(gen, rank, fan_in, device=dev)}
            patches[target] = LoKrPatch(target, target, tensors, alpha=alpha)
    adapter_type = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}[kind]
    return Adapter(type=adapter_type, format="kohya", patches=patches, base=base)


def _targets(adapter: Adapter) -> set[str]:
    return {p.target for p in adapter.patches.values()}


def file_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def meta_models():
    return {arch: parts(arch, device="meta") for arch in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def tiny_models():
    return {arch: parts(arch) for arch in ("tiny-sd1", "tiny-sdxl")}


# ---------------------------------------------------------------------------------------------
# the naming rule, on the real configurations (keys only, meta tensors)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["sdxl", "sd1"])
def test_real_architectures_every_type_named_as_kohya_names_them(arch, kind, meta_models):
    model = meta_models[arch]
    adapter = build(kind, model, arch)
    keys = kohya_tensors(adapter)
    n = check_names(keys, _targets(adapter), model, arch, loader=kind != "norm")
    if arch == "sdxl" and kind == "lora":
        # formats.md: 722 UNet modules (70 transformer blocks x 10 + 11 x proj_in/out), TE1 72, TE2 192
        unet = sum(k.startswith("lora_unet_") for k in {k.split(".")[0] for k in keys})
        assert (unet, n - unet) == (722, 72 + 192)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0.alpha" in keys
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight" in keys
        assert tuple(keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape) == \
            (2, 2048)  # formats.md's SDXL example key, with its shape
    if arch == "sdxl" and kind == "locon":
        for name in ("lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
                     "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_1_0_in_layers_2",
                     "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_8_0_skip_connection"):
            assert f"{name}.lora_down.weight" in keys, name
    if arch == "sd1":
        assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in keys)


# ---------------------------------------------------------------------------------------------
# files written by every writer, on the tiny bases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["tiny-sdxl", "tiny-sd1"])
def test_saved_files_every_type_named_as_kohya_names_them(arch, kind, tiny_models, tmp_path):
    model = tiny_models[arch]
    adapter = build(kind, model, arch)
    path = save(adapter, tmp_path / f"{kind}.safetensors", "kohya")
    check_names(file_keys(path), _targets(adapter), model, arch, loader=kind != "norm")
    again = adapterhub.load(path)  # reading takes the sgm names back to the same modules
    assert {(p.target, p.param) for p in again.patches.values()} == \
        {(p.target, p.param) for p in adapter.patches.values()}


@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("arch", ["tiny-sdxl", "tiny-sd1"])
def test_diffusers_loads_written_files_to_our_merge(arch, kind, tiny_models, tmp_path):
    adapter = build(kind, tiny_models[arch], arch)
    path = save(adapter, tmp_path / f"{kind}.safetensors", "kohya")
    original = snapshot(parts(arch))
    ours = ours_merged(arch, [(path, 0.8)])
    ref = diffusers_fused(arch, [(path, 0.8)])
    assert assert_same_weights(ours, ref, original, atol=ATOL) <= ATOL
    assert len(adapter.patches) > 50


def _example(arch, kind, tmp_path):
    from adapterhub_plugins.lora.save import write_example

    return write_example(kind, parts(arch), tmp_path / f"{arch}-{kind}-example.safetensors", rank=2)


@pytest.mark.parametrize("kind", ["lora", "locon", "loha"])
def test_write_example_sdxl_names(kind, tiny_models, tmp_path):
    path = _example("tiny-sdxl", kind, tmp_path)
    adapter = adapterhub.load(path)
    check_names(file_keys(path), _targets(adapter), tiny_models["tiny-sdxl"], "tiny-sdxl")


@pytest.mark.parametrize("to", ["kohya", "a1111"])
def test_convert_from_diffusers_layout_writes_sgm_names(to, tiny_models, tmp_path):
    from adapterhub.convert import convert

    adapter = build("locon", tiny_models["tiny-sdxl"], "tiny-sdxl")
    source = save(adapter, tmp_path / "src.safetensors", "diffusers")
    assert any(k.startswith("unet.down_blocks.") for k in file_keys(source))
    out = tmp_path / f"out-{to}.safetensors"
    convert(source, to, out)
    check_names(file_keys(out), _targets(adapter), tiny_models["tiny-sdxl"], "tiny-sdxl")


def test_combine_resize_extract_write_sgm_names(tiny_models, tmp_path):
    from adapterhub.algebra import combine_files, extract, resize_file

    model = tiny_models["tiny-sdxl"]
    a, b = _example("tiny-sdxl", "locon", tmp_path), tmp_path / "b.safetensors"
    save(build("locon", model, "tiny-sdxl"), b, "kohya")
    targets = _targets(adapterhub.load(a))
    for result in (combine_files([(a, 0.5), (b, 0.5)], tmp_path / "sum.safetensors"),
                   resize_file(a, tmp_path / "small.safetensors", rank=1, conv_rank=1)):
        check_names(file_keys(result.out), targets, model, "tiny-sdxl")
    tuned = parts("tiny-sdxl")
    adapterhub.load(a).merge_into(tuned, 1.0)
    result = extract(parts("tiny-sdxl"), tuned, rank=2, conv_rank=2, min_diff=0.0)
    out = result.save(tmp_path / "extracted.safetensors")
    check_names(file_keys(out), _targets(result.adapter), model, "tiny-sdxl")


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_trained_sdxl_files_use_sgm_names(kind, tmp_path):
    """The trainer's writer (no steps needed: the names come from the PEFT layers it made)."""
    from adapterhub.train import TrainConfig
    from adapterhub_plugins.lora.train import make_trainable

    model = parts("tiny-sdxl")
    config = TrainConfig(type=kind, rank=2, alpha=1, conv_rank=2, conv_alpha=1)
    trainable = make_trainable(kind, model, config)
    path = trainable.save(tmp_path / f"trained-{kind}.safetensors", {})
    adapter = adapterhub.load(path)
    assert adapter.base == "tiny-sdxl"
    check_names(file_keys(path), _targets(adapter), parts("tiny-sdxl", device="meta"), "tiny-sdxl")


# ---------------------------------------------------------------------------------------------
# the diffusers layout: read in full by diffusers and by ComfyUI
# ---------------------------------------------------------------------------------------------
COMFY_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), ("_lora.down.weight", "_lora.up.weight"),
                  (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                  (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
COMFY_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "self_attn.out_proj")


def comfy_module_names(model) -> dict[str, str]:
    """The diffusers-style module names ComfyUI's LoRA loader maps (comfy/lora.py, ``model_lora_keys_unet``
    / ``model_lora_keys_clip`` at 41444b5, restated from its rules): a UNet module by its diffusers path,
    bare or under ``unet.``, with every ``.to_`` written ``.processor.to_`` and a final ``.to_out.0`` as
    ``.to_out``; a text encoder's attention / MLP linears as
    ``text_encoder[_2].text_model.encoder.layers.N.<layer>``."""
    names = {}
    for path, module in model.unet.named_modules():
        if path and getattr(module, "weight", None) is not None:
            comfy = path.replace(".to_", ".processor.to_")
            comfy = comfy[:-2] if comfy.endswith(".to_out.0") else comfy
            names[comfy] = names["unet." + comfy] = f"unet.{path}"
    for comp in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model, comp, None)
        if encoder is None:
            continue
        layers = encoder.config.num_hidden_layers
        for b in range(layers):
            for layer in COMFY_CLIP_LAYERS:
                names[f"{comp}.text_model.encoder.layers.{b}.{layer}"] = f"{comp}.text_model.encoder.layers.{b}.{layer}"
    return names


def comfy_loaded(keys, model) -> tuple[set[str], list[str]]:
    """(the targets ComfyUI patches, the keys it reports "lora key not loaded")."""
    names, keys = comfy_module_names(model), set(keys)
    loaded, used = set(), set()
    for name, target in names.items():
        for down, up in COMFY_SUFFIXES:
            if name + up in keys and name + down in keys:
                loaded.add(target)
                used |= {name + up, name + down}
                break
        if name + ".alpha" in keys:
            used.add(name + ".alpha")
    return loaded, sorted(keys - used)


@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("arch", ["sdxl", "sd1"])
def test_diffusers_layout_every_module_loads_in_comfyui(arch, kind, meta_models):
    """The issue's count: 128 of 264 SD1 modules and 560 of 1,052 SDXL LoCon modules were lost."""
    from adapterhub_plugins.lora.save import diffusers_tensors

    model = meta_models[arch]
    adapter = build(kind, model, arch, alpha=2.0)  # alpha = rank: scale 1, nothing to bake on meta tensors
    keys = diffusers_tensors(adapter)
    loaded, not_loaded = comfy_loaded(keys, model)
    assert not not_loaded, f"{len(not_loaded)} keys not loaded, e.g. {not_loaded[:2]}"
    assert loaded == _targets(adapter)
    assert len(loaded) == {("sd1", "lora"): 264, ("sdxl", "locon"): 1052}.get((arch, kind), len(loaded))


@pytest.mark.parametrize("kind", ["lora", "locon"])
@pytest.mark.parametrize("arch", ["tiny-sdxl", "tiny-sd1"])
def test_diffusers_layout_loads_in_diffusers_to_our_merge_and_reads_back(arch, kind, tiny_models, tmp_path):
    model = tiny_models[arch]
    adapter = build(kind, model, arch)
    path = save(adapter, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    keys = file_keys(path)
    assert not comfy_loaded(keys, model)[1]
    again = adapterhub.load(path)
    assert (again.format, _targets(again)) == ("diffusers", _targets(adapter))
    original = snapshot(parts(arch))
    ours = ours_merged(arch, [(adapter, 0.8)])
    assert_same_weights(ours_merged(arch, [(path, 0.8)]), ours, original)
    assert assert_same_weights(ours, diffusers_fused(arch, [(path, 0.8)]), original) <= ATOL


# ---------------------------------------------------------------------------------------------
# LyCORIS, on the module tree kohya's SDXL scripts give it
# ---------------------------------------------------------------------------------------------
def sgm_tree(unet) -> torch.nn.Module:
    """``unet``'s own modules hung at their sgm paths (``input_blocks.4.1.proj_in`` is the very module at
    ``down_blocks.1.attentions.0.proj_in``); each block container is of a class named as the diffusers block
    it stands for (``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``: the names
    LyCORIS and sd-scripts select by). A LyCORIS merge through it changes ``unet`` itself."""
    root = torch.nn.Module()
    for sgm, path in _sgm_modules(unet).items():
        parts_ = sgm.split(".")
        depth = 2 if parts_[0] == "middle_block" else 3
        if parts_[0] not in ("input_blocks", "middle_block", "output_blocks") or len(parts_) <= depth:
            continue  # conv_in, time_embed, label_emb, out: outside every block LyCORIS targets
        block = ".".join(path.split(".")[: 3 if path.startswith("mid_block") else 4])
        node = root
        for i, name in enumerate(parts_[:-1]):
            if not hasattr(node, name):
                cls = torch.nn.Module
                if i == depth - 1:
                    cls = type(type(unet.get_submodule(block)).__name__, (torch.nn.Module,), {})
                node.add_module(name, cls())
            node = getattr(node, name)
        node.add_module(parts_[-1], unet.get_submodule(path))
    return root


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_lycoris_loads_every_sdxl_unet_module_by_name_and_merges_to_ours(kind, tiny_models, tmp_path):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # alpha = rank (scale 1): lycoris-lora 4.1.3 applies alpha / r twice to the modules of resnet blocks
    # when merging (formats.md: its merge bakes (alpha / r)^2; A1111, ComfyUI and PEFT apply it once)
    full = build(kind, tiny_models["tiny-sdxl"], "tiny-sdxl", alpha=2.0)
    unet_only = {t: p for t, p in full.patches.items() if t.startswith("unet.")}
    adapter = Adapter(type=full.type, format=full.format, patches=unet_only, base="tiny-sdxl")
    path = save(adapter, tmp_path / f"{kind}.safetensors", "kohya")
    model = parts("tiny-sdxl")
    original = snapshot(model)
    # lycoris-lora 4.1.3 also targets the class TimestepEmbedding, which has no sgm container here
    targets = LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [t for t in targets if t != "TimestepEmbedding"]
    try:
        net, sd = create_network_from_weights(1.0, str(path), None, None, sgm_tree(model.unet))
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = targets
    assert len(net.unet_loras) == len(adapter.patches) > 100
    net.merge_to(None, sgm_tree(model.unet), sd, torch.float32, "cpu")
    from lora_helpers import weights

    assert_same_weights(ours_merged("tiny-sdxl", [(adapter, 1.0)]), weights(model), original)


@pytest.mark.parametrize("layers_per_block", [1, 3])
def test_sgm_numbering_follows_the_unet_config(layers_per_block):
    """The block numbers come from the config (``layers_per_block``, which up blocks have attentions), not
    from SDXL's: diffusers' single-file converter takes every sgm key back to its own parameter."""
    from diffusers import UNet2DConditionModel

    from adapterhub.base import TINY_UNET_SDXL
    from adapterhub.keymaps import UNetLayout, diffusers_to_sgm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**TINY_UNET_SDXL, "layers_per_block": layers_per_block})
    pairs = _sgm_modules(unet)  # asserts the converter reaches every parameter
    layout = UNetLayout.of(unet.config)
    assert all(diffusers_to_sgm(path, layout) == sgm for sgm, path in pairs.items())
    n = layers_per_block
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", layout) == f"output_blocks.{n}.2.conv"
    assert diffusers_to_sgm("down_blocks.1.attentions.0.proj_in", layout) == f"input_blocks.{n + 2}.1.proj_in"


def test_unknown_base_sdxl_unet_only_is_named_by_its_shapes(tiny_models, tmp_path):
    """An adapter that does not say its base (built in code, or a file without metadata) and has no second
    text encoder is still an SDXL one when its cross-attention takes SDXL's context width."""
    model = tiny_models["tiny-sdxl"]
    full = build("locon", model, "unknown")
    adapter = Adapter(type="locon", format="kohya", base="unknown",
                      patches={t: p for t, p in full.patches.items() if t.startswith("unet.")})
    check_names(kohya_tensors(adapter), _targets(adapter), model, "tiny-sdxl")
