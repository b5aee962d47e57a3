"""Our merge against the reference implementations, layout by layout.

Every adapter here is made with a reference library (diffusers + PEFT, LyCORIS, PEFT) or written by
hand in the reference layout, with random non-zero factors, for the embedded tiny bases. The oracle is
always the reference's own merge: diffusers ``load_lora_weights`` + ``fuse_lora``, LyCORIS module
``merge_to``, PEFT ``merge_and_unload``. Float32 throughout; max abs error <= 1e-5.
"""
from __future__ import annotations

import json

import pytest
import torch

import adapterhub
from adapterhub.plugins import adapter_type
from adapterhub.weights import attach, merge

from lora_helpers import (
    assert_same_weights, diffusers_fused, diffusers_to_sgm, kohya_targets, kohya_te_name, ours_merged, parts,
    quiet, randomize_, safetensors_header_keys, snapshot, weights,
)

quiet()

LORA_TARGETS_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv_shortcut", "time_emb_proj"]
PEFT_TARGETS_UNET = ["to_q", "to_v", "proj_in", "ff.net.2", "conv1", "conv_shortcut"]


def _safe_open_keys_and_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata() or {}


# ---------------------------------------------------------------------------------------------
# diffusers (current) layout: PEFT adapters saved by the pipeline's save_lora_weights
# ---------------------------------------------------------------------------------------------
def _peft_adapter(module, config, seed):
    from peft.utils import get_peft_model_state_dict

    module.add_adapter(config)
    assert randomize_(module, seed, 0.1, only=("lora_A", "lora_B")) > 0
    return get_peft_model_state_dict(module), module.peft_config["default"].to_dict()


def _diffusers_layout_file(arch, tmp_path, seed=11, targets=tuple(LORA_TARGETS_UNET)):
    """A diffusers-layout file with rank != alpha, rank_pattern/alpha_pattern and rsLoRA on a TE."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from peft import LoraConfig

    base = parts(arch)
    original = snapshot(base)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                          rank_pattern={"to_k": 2, "^down_blocks.1.attentions.0.proj_in": 3},
                          alpha_pattern={"to_v": 3, "conv1": 16})
    te_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "out_proj", "fc1"],
                        init_lora_weights=False, use_rslora=True)
    te2_cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "fc2"], init_lora_weights=False)
    unet_sd, unet_meta = _peft_adapter(base.unet, unet_cfg, seed)
    te_sd, te_meta = _peft_adapter(base.text_encoder, te_cfg, seed + 1)
    kwargs = dict(unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                  unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta)
    if arch == "tiny-sdxl":
        te2_sd, te2_meta = _peft_adapter(base.text_encoder_2, te2_cfg, seed + 2)
        StableDiffusionXLLoraLoaderMixin.save_lora_weights(
            tmp_path, text_encoder_2_lora_layers=te2_sd, text_encoder_2_lora_adapter_metadata=te2_meta, **kwargs)
    else:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path, **kwargs)
    return tmp_path / "pytorch_lora_weights.safetensors", original


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_diffusers_layout_matches_diffusers_fuse(arch, tmp_path):
    path, original = _diffusers_layout_file(arch, tmp_path)
    keys, meta = _safe_open_keys_and_metadata(path)
    # diffusers writes one LoraConfig per component, each key prefixed by the component
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 8 and config["text_encoder.use_rslora"] is True
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)

    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("locon", "diffusers", arch)
    assert set(facts["ranks"]) == {2, 3, 4}
    assert {2.0, 3.0, 8.0, 16.0} <= set(facts["alphas"])  # per-component configs and alpha_pattern read

    ref = diffusers_fused(arch, [(path, 0.7)])
    ours = ours_merged(arch, [(path, 0.7)])
    assert_same_weights(ours, ref, original)


# ---------------------------------------------------------------------------------------------
# kohya layout (oracle: diffusers, which converts kohya files itself)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_kohya_written_by_us_matches_diffusers(kind, tmp_path):
    base = parts("tiny-sd1")
    path = adapter_type(kind).example(base, tmp_path / f"{kind}.safetensors", seed=5)
    keys = safetensors_header_keys(path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys), "kohya TE names keep text_model"
    if kind == "locon":
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    w = -0.6
    assert_same_weights(ours_merged("tiny-sd1", [(path, w)]), diffusers_fused("tiny-sd1", [(path, w)]),
                        weights(base))


ALPHA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kohya_module_tensors(module, rank, alpha, alpha_dtype, gen, dtype=torch.float32):
    w = module.weight
    r = min(rank, w.shape[0], w[0].numel())
    if w.dim() == 4:
        down = torch.randn(r, w.shape[1], *w.shape[2:], generator=gen) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], r, 1, 1, generator=gen) * 0.3
    else:
        down = torch.randn(r, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        up = torch.randn(w.shape[0], r, generator=gen) * 0.3
    out = {"lora_down.weight": down.to(dtype), "lora_up.weight": up.to(dtype)}
    if alpha is not None:
        out["alpha"] = torch.tensor(float(alpha)).to(alpha_dtype)
    return out


def _is_attention_or_text(comp, mod_path):
    return comp != "unet" or ".attn1." in mod_path or ".attn2." in mod_path


def uniform_alpha(i, comp, mod_path, rank):
    """One alpha value everywhere (3.0, exact in fp16/bf16); with per-module ranks, every module
    still has its own scale 3/r."""
    return 3.0


def varied_alpha(i, comp, mod_path, rank):
    """Alphas differing per module only where diffusers 0.42.1 honours them (see the test below)."""
    return 3.0 if _is_attention_or_text(comp, mod_path) else 0.5 + (i % 5) * 0.75


def _write_kohya(model, path, sdxl: bool, alpha_of, conv: bool = True, seed: int = 3, linear_only=False):
    """Hand-written kohya file: per-module ranks 1..4, alpha stored as fp32/fp16/bf16 (or absent when
    ``alpha_of`` returns None), some fp16 factors; SDXL UNet names in ldm/sgm form (``input_blocks_*``)
    with ``lora_te1_``/``lora_te2_``. Returns the path and {module key in the model: (name, alpha, r)}."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, written = {}, {}
    targets = kohya_targets(model, conv=conv)
    if sdxl:  # modules outside the blocks, in sgm names
        targets += [("unet", p, model.unet.get_submodule(p)) for p in
                    ("conv_in", "time_embedding.linear_1", "add_embedding.linear_2", "conv_out")]
    for i, (comp, mod_path, module) in enumerate(targets):
        if linear_only and not isinstance(module, torch.nn.Linear):
            continue
        if comp == "unet":
            name = "lora_unet_" + (diffusers_to_sgm(mod_path) if sdxl else mod_path).replace(".", "_")
        else:
            prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[comp]
            name = kohya_te_name(prefix, mod_path)
        rank = 1 + i % 4
        alpha = alpha_of(i, comp, mod_path, rank)
        dtype = torch.float16 if i % 7 == 3 else torch.float32
        made = _kohya_module_tensors(module, rank, alpha, ALPHA_DTYPES[i % 3], gen, dtype)
        for suffix, t in made.items():
            tensors[f"{name}.{suffix}"] = t.contiguous()
        written[f"{comp}.{mod_path}.weight"] = (name, alpha, made["lora_down.weight"].shape[0])
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "Dynamic"})
    return path, tensors, written


@pytest.mark.parametrize("alphas", ["uniform", "varied", "absent"])
def test_kohya_sd1_by_hand_conv_ranks_alpha_dtypes(alphas, tmp_path):
    alpha_of = {"uniform": uniform_alpha, "varied": varied_alpha, "absent": lambda *a: None}[alphas]
    base = parts("tiny-sd1")
    path, _, _ = _write_kohya(base, tmp_path / "kohya_sd1.safetensors", sdxl=False, alpha_of=alpha_of)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("locon", "kohya", "tiny-sd1")
    assert facts["ranks"] == [1, 2, 3, 4]
    ref = diffusers_fused("tiny-sd1", [(path, 0.8)])
    assert_same_weights(ours_merged("tiny-sd1", [(path, 0.8)]), ref, weights(base))


def test_kohya_sdxl_sgm_names_matches_diffusers(tmp_path):
    base = parts("tiny-sdxl")
    path, _, _ = _write_kohya(base, tmp_path / "kohya_sdxl.safetensors", sdxl=True, alpha_of=varied_alpha)
    keys = safetensors_header_keys(path)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in keys)  # an upsampler
    assert any(k.startswith("lora_unet_input_blocks_3_0_op.") for k in keys)  # a downsampler
    assert any(k.startswith("lora_unet_label_emb_0_2.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("locon", "kohya", "tiny-sdxl")
    ref = diffusers_fused("tiny-sdxl", [(path, 0.9)])
    assert_same_weights(ours_merged("tiny-sdxl", [(path, 0.9)]), ref, weights(base))


def test_kohya_per_module_alpha_follows_kohya_not_diffusers(tmp_path):
    """Different alphas on attention / text-encoder modules, and alpha missing on some modules.

    kohya (``LoRAModule``: scale = alpha / lora_dim, alpha missing -> alpha = lora_dim), A1111 and
    ComfyUI scale each module by its own alpha / r; so do we (checked against that formula here).
    diffusers 0.42.1 does not: its ``alpha_pattern`` for attention modules keeps the old
    ``…processor.to_k_lora.down.weight`` names and its text-encoder patterns keep ``text_model.`` on a
    flattened CLIPTextModel, so PEFT ignores them ("alpha_pattern keys did not match any targeted
    module"), and a module without alpha gets the most common alpha instead of scale 1.
    """
    base = parts("tiny-sd1")
    original = weights(base)

    def alpha_of(i, comp, mod_path, rank):
        return None if i % 5 == 0 else 0.5 + (i % 4) * 1.25

    path, tensors, written = _write_kohya(base, tmp_path / "alphas.safetensors", sdxl=False, alpha_of=alpha_of,
                                          conv=False, linear_only=True)
    m = 0.75
    ours = ours_merged("tiny-sd1", [(path, m)])
    for key, (name, alpha, r) in written.items():
        up = tensors[f"{name}.lora_up.weight"].float()
        down = tensors[f"{name}.lora_down.weight"].float()
        scale = 1.0 if alpha is None else tensors[f"{name}.alpha"].float().item() / r
        expected = original[key] + m * scale * (up @ down)
        assert torch.allclose(ours[key], expected, atol=1e-5, rtol=0), key
    ref = diffusers_fused("tiny-sd1", [(path, m)])
    off = [k for k in written if not torch.allclose(ref[k], ours[k], atol=1e-5, rtol=0)]
    assert off, "diffusers now honours per-module alphas: turn this into an oracle comparison"


# ---------------------------------------------------------------------------------------------
# old diffusers attention-processor layout
# ---------------------------------------------------------------------------------------------
def _attnproc_file(model, path, unet_prefix: bool, text: bool, seed=7):
    """``…attn1.processor.to_q_lora.down.weight`` (+ old TE ``…q_proj.lora_linear_layer.down.weight``)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    tensors = {}
    for name, module in model.unet.named_modules():
        m = next((p for p in proc if name.endswith((".attn1." + p, ".attn2." + p))), None)
        if m is None:
            continue
        block = name[: -len(m) - 1]
        key = ("unet." if unet_prefix else "") + f"{block}.processor.{proc[m]}"
        r = 3
        tensors[f"{key}.down.weight"] = torch.randn(r, module.weight.shape[1], generator=gen) * 0.2
        tensors[f"{key}.up.weight"] = torch.randn(module.weight.shape[0], r, generator=gen) * 0.2
    if text:
        for name, module in model.text_encoder.named_modules():
            if name.endswith(("q_proj", "v_proj", "out_proj")):
                key = f"text_encoder.text_model.{name}.lora_linear_layer"
                tensors[f"{key}.down.weight"] = torch.randn(2, module.weight.shape[1], generator=gen) * 0.2
                tensors[f"{key}.up.weight"] = torch.randn(module.weight.shape[0], 2, generator=gen) * 0.2
    save_file(tensors, str(path))
    return path


def test_attnproc_with_unet_prefix_matches_diffusers(tmp_path):
    # oracle: diffusers 0.42 still converts this layout in load_lora_weights (convert_unet_state_dict_to_peft)
    base = parts("tiny-sd1")
    path = _attnproc_file(base, tmp_path / "attnproc.safetensors", unet_prefix=True, text=True)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("lora", "diffusers-attnproc", "tiny-sd1")
    ref = diffusers_fused("tiny-sd1", [(path, 0.5)])
    assert_same_weights(ours_merged("tiny-sd1", [(path, 0.5)]), ref, weights(base))


def test_attnproc_without_prefix_matches_diffusers_unet_loader(tmp_path):
    # The pipeline loader only reads ``unet.``-prefixed keys; diffusers' own model-level loader
    # (UNet2DConditionModel.load_lora_adapter with prefix=None, then fuse_lora) reads this layout:
    # it is the oracle here.
    base = parts("tiny-sd1")
    path = _attnproc_file(base, tmp_path / "attnproc_noprefix.safetensors", unet_prefix=False, text=False)
    assert adapterhub.inspect(path, with_hash=False)["format"] == "diffusers-attnproc"
    ref = parts("tiny-sd1")
    ref.unet.load_lora_adapter(str(path), prefix=None, adapter_name="a")
    ref.unet.fuse_lora(lora_scale=-0.8)
    ref.unet.unload_lora()
    assert_same_weights(ours_merged("tiny-sd1", [(path, -0.8)]), weights(ref), weights(base))


# ---------------------------------------------------------------------------------------------
# LyCORIS (oracle: each LyCORIS module's own merge_to)
# ---------------------------------------------------------------------------------------------
PRESET_TOML = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# LyCORIS' "full" preset also lists the class TimestepEmbedding (for Anima) next to the names
# time_embedding.linear_1/2, which makes lycoris 4.1.3 assert "duplicated lora name" on an SD UNet.
# This preset is "full" for SD without that entry.


def _lycoris_network(model, tmp_path, seed, **kwargs):
    from lycoris.kohya import create_network

    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET_TOML)
    encoders = model.text_encoder if getattr(model, "text_encoder_2", None) is None else \
        [model.text_encoder, model.text_encoder_2]
    dim, alpha = kwargs.pop("dim", 4), kwargs.pop("alpha", 4)
    net = create_network(1.0, dim, alpha, None, encoders, model.unet, preset=str(preset), **kwargs)
    net.apply_to(encoders, model.unet, True, True)
    assert randomize_(net, seed, 0.1) > 0
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return net, path


LYCORIS_CASES = {
    # name: (arch, create_network kwargs, a key suffix that must appear, expected type)
    "lora-conv": ("tiny-sd1", dict(algo="lora", dim=4, alpha=2, conv_dim=3, conv_alpha=1.5), ".lora_down.weight",
                  "locon"),
    "locon-tucker": ("tiny-sd1", dict(algo="locon", dim=4, alpha=4, conv_dim=3, conv_alpha=6, use_tucker=True),
                     ".lora_mid.weight", "locon"),
    "loha": ("tiny-sd1", dict(algo="loha", dim=4, alpha=4, conv_dim=3, conv_alpha=3), ".hada_w1_a", "loha"),
    "loha-tucker": ("tiny-sd1", dict(algo="loha", dim=3, alpha=3, conv_dim=3, conv_alpha=3, use_tucker=True),
                    ".hada_t1", "loha"),
    "lokr": ("tiny-sd1", dict(algo="lokr", dim=4, alpha=4, conv_dim=4, conv_alpha=4), ".lokr_w2_a", "lokr"),
    "lokr-tucker": ("tiny-sd1", dict(algo="lokr", dim=2, alpha=2, conv_dim=2, conv_alpha=2, factor=4,
                                     decompose_both=True, use_tucker=True), ".lokr_t2", "lokr"),
    "lokr-full": ("tiny-sd1", dict(algo="lokr", dim=4, alpha=4, conv_dim=4, conv_alpha=4, full_matrix=True),
                  ".lokr_w2", "lokr"),
    "locon-sdxl": ("tiny-sdxl", dict(algo="locon", dim=4, alpha=1, conv_dim=2, conv_alpha=2), ".lora_up.weight",
                   "locon"),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_matches_lycoris_merge(case, tmp_path):
    arch, kwargs, must_have, expected_type = LYCORIS_CASES[case]
    model = parts(arch)
    original = snapshot(model)
    net, path = _lycoris_network(model, tmp_path, seed=21, **kwargs)
    keys = safetensors_header_keys(path)
    assert any(k.endswith(must_have) for k in keys), must_have
    if arch == "tiny-sdxl":
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == (expected_type, "lycoris", arch)
    assert facts["targets"] == len(net.unet_loras) + len(net.text_encoder_loras)

    for module in net.text_encoder_loras + net.unet_loras:
        module.merge_to(0.7)
    assert_same_weights(ours_merged(arch, [(path, 0.7)]), weights(model), original)


def test_lycoris_wrapper_prefix_matches_lycoris_merge(tmp_path):
    """``lycoris.create_lycoris`` (SimpleTuner-style ``lycoris_<path>`` names) on the UNet."""
    from lycoris import create_lycoris

    model = parts("tiny-sd1")
    original = snapshot(model)
    net = create_lycoris(model.unet, 1.0, linear_dim=4, linear_alpha=4, algo="lokr", factor=8)
    net.apply_to()
    randomize_(net, 5, 0.1)
    path = tmp_path / "wrapper.safetensors"
    net.save_weights(str(path), torch.float32, None)
    assert all(k.startswith("lycoris_") for k in safetensors_header_keys(path))
    for module in net.loras:
        module.merge_to(0.6)
    assert_same_weights(ours_merged("tiny-sd1", [(path, 0.6)]), weights(model), original)


def _formula_delta(module) -> torch.Tensor:
    """ΔW of one LyCORIS LoHa/LoKr module from formats.md §2.2/§2.3, unscaled (factors only)."""
    p = dict(module.named_parameters())
    if "hada_w1_a" in p:
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        d = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    return d.detach().float()


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_alpha_not_rank_scale_applied_once(algo, tmp_path):
    """alpha != rank: we apply alpha/rank once (A1111, ComfyUI, PEFT); lycoris-lora 4.1.3's own
    merge applies it twice (formats.md §2.10), shown here as the documented difference."""
    model = parts("tiny-sd1")
    original = snapshot(model)
    rank, alpha, m = 4, 2.0, 0.9
    net, path = _lycoris_network(model, tmp_path, seed=8, algo=algo, dim=rank, alpha=alpha, conv_dim=rank,
                                 conv_alpha=alpha)
    paths = {id(mod): f"{comp}.{name}" for comp in ("unet", "text_encoder")
             for name, mod in getattr(model, comp).named_modules()}
    expected_once, expected_twice = {}, {}
    for module in net.text_encoder_loras + net.unet_loras:
        key = paths[id(module.org_module[0])] + ".weight"
        w0 = original[key]
        # alpha / rank; a LoKr module with both factors whole has no rank: scale 1 (LyCORIS, A1111, ComfyUI)
        s = 1.0 if algo == "lokr" and not any("_b" in n for n, _ in module.named_parameters()) else alpha / rank
        assert module.scale == s
        delta = _formula_delta(module).reshape(w0.shape)
        expected_once[key] = w0 + m * s * delta
        expected_twice[key] = w0 + m * s * s * delta
        module.merge_to(m)
    assert any(module.scale != 1.0 for module in net.unet_loras)
    ours = ours_merged("tiny-sd1", [(path, m)])
    lycoris_merged = weights(model)
    for key in expected_once:
        assert torch.allclose(ours[key], expected_once[key], atol=1e-5, rtol=0), key
        assert torch.allclose(lycoris_merged[key], expected_twice[key], atol=1e-5, rtol=0), key


# ---------------------------------------------------------------------------------------------
# PEFT save_pretrained (oracle: PeftModel.from_pretrained(...).merge_and_unload())
# ---------------------------------------------------------------------------------------------
def _peft_configs():
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    tm = PEFT_TARGETS_UNET
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=tm, rank_pattern={"to_v": 2}, alpha_pattern={"conv1": 3}),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=tm),
        "loha-cp": LoHaConfig(r=3, alpha=2, target_modules=tm, use_effective_conv2d=True),
        "lokr": LoKrConfig(r=4, alpha=6, target_modules=tm),
        "lokr-whole": LoKrConfig(r=64, alpha=8, target_modules=["to_q", "to_k", "ff.net.2"]),  # both factors whole
        "lokr-both": LoKrConfig(r=2, alpha=3, target_modules=tm, decompose_both=True, decompose_factor=4,
                                use_effective_conv2d=True),
    }


PEFT_TYPES = {"lora": "locon", "loha": "loha", "loha-cp": "loha", "lokr": "lokr", "lokr-whole": "lokr",
              "lokr-both": "lokr"}


def _peft_reference(folder, seed=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(parts("tiny-sd1").unet, str(folder)).merge_and_unload()


def _unet_only(w):
    return {k: v for k, v in w.items() if k.startswith("unet.")}


@pytest.mark.parametrize("case", list(PEFT_TYPES))
def test_peft_save_pretrained_matches_merge_and_unload(case, tmp_path):
    from peft import get_peft_model

    config = _peft_configs()[case]
    base = parts("tiny-sd1")
    original = _unet_only(snapshot(base))
    pm = get_peft_model(base.unet, config)
    assert randomize_(pm, 31, 0.2, only=("lora_", "hada_", "lokr_")) > 0
    folder = tmp_path / case
    pm.save_pretrained(str(folder))
    assert any(k.startswith("base_model.model.down_blocks.")
               for k in safetensors_header_keys(folder / "adapter_model.safetensors"))
    facts = adapterhub.inspect(folder, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == (PEFT_TYPES[case], "peft", "tiny-sd1")

    ref = {f"unet.{k}": v for k, v in _peft_reference(folder).state_dict().items()}
    assert_same_weights(_unet_only(ours_merged("tiny-sd1", [(folder, 1.0)])), ref, original)


def _adalora_model(mask: bool):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, total_step=4, tinit=0, tfinal=0, deltaT=1,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"])
    base = parts("tiny-sd1")
    pm = get_peft_model(base.unet, config)
    assert randomize_(pm, 41, 0.2, only=("lora_A", "lora_B", "lora_E")) > 0
    if mask:  # PEFT's own rank allocator decides the rank_pattern from (random) sensitivities
        gen = torch.Generator().manual_seed(42)
        for step in range(1, 5):
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.grad = torch.randn(p.shape, generator=gen)
            pm.base_model.update_and_allocate(step)
    return pm


@pytest.mark.parametrize("mask", [False, True], ids=["full-rank", "rank-masked"])
def test_adalora_matches_peft(mask, tmp_path):
    pm = _adalora_model(mask)
    pm.save_pretrained(str(tmp_path / "ada"))
    config = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    keys = safetensors_header_keys(tmp_path / "ada" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_E") for k in keys)
    if mask:
        assert config["rank_pattern"], "the allocator should have masked ranks"
    facts = adapterhub.inspect(tmp_path / "ada", with_hash=False)
    assert (facts["type"], facts["format"]) == ("adalora", "peft")
    ref = {f"unet.{k}": v for k, v in _peft_reference(tmp_path / "ada").state_dict().items()}
    assert_same_weights(_unet_only(ours_merged("tiny-sd1", [(tmp_path / "ada", 1.0)])), ref)


def test_adalora_written_by_us_loads_in_peft(tmp_path):
    base = parts("tiny-sd1")
    folder = adapter_type("adalora").example(base, tmp_path / "ada_ours", seed=3)
    ref = {f"unet.{k}": v for k, v in _peft_reference(folder).state_dict().items()}
    assert_same_weights(_unet_only(ours_merged("tiny-sd1", [(folder, 1.0)])), ref, _unet_only(weights(base)))


# ---------------------------------------------------------------------------------------------
# several adapters at once; attach / set_weight / detach
# ---------------------------------------------------------------------------------------------
def test_two_adapters_merged_at_once_match_diffusers(tmp_path):
    base = parts("tiny-sd1")
    kohya = adapter_type("locon").example(base, tmp_path / "kohya.safetensors", seed=1)
    diff, _ = _diffusers_layout_file("tiny-sd1", tmp_path, targets=("to_k", "to_v", "proj_out", "conv2"))
    pairs = [(kohya, 0.6), (diff, -0.4)]
    assert_same_weights(ours_merged("tiny-sd1", pairs), diffusers_fused("tiny-sd1", pairs), weights(base))


def _merged_copy(arch, pairs, dtype):
    pipe = parts(arch, dtype=dtype)
    merge(pipe, pairs)
    return weights(pipe)


def _assert_bitwise(a: dict, b: dict):
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[0]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attach_set_weight_detach_exact(dtype, tmp_path):
    base = parts("tiny-sd1")
    a = adapterhub.load(adapter_type("locon").example(base, tmp_path / "a.safetensors", seed=1))
    b = adapterhub.load(adapter_type("loha").example(base, tmp_path / "b.safetensors", seed=2, text=False))
    pipe = parts("tiny-sd1", dtype=dtype)
    original = snapshot(pipe)
    assert all(v.dtype == dtype for k, v in original.items() if v.is_floating_point())

    ha = attach(pipe, a, 0.8)
    _assert_bitwise(weights(pipe), _merged_copy("tiny-sd1", [(a, 0.8)], dtype))
    ha.set_weight(-0.3)
    _assert_bitwise(weights(pipe), _merged_copy("tiny-sd1", [(a, -0.3)], dtype))
    hb = b.attach(pipe, 0.5)
    _assert_bitwise(weights(pipe), _merged_copy("tiny-sd1", [(a, -0.3), (b, 0.5)], dtype))
    ha.detach()
    _assert_bitwise(weights(pipe), _merged_copy("tiny-sd1", [(b, 0.5)], dtype))
    hb.set_weight(0.0)
    hb.detach()
    _assert_bitwise(weights(pipe), original)
    with pytest.raises(RuntimeError):
        hb.set_weight(1.0)

    with a.attach(pipe, 1.3):  # the handle is a context manager
        _assert_bitwise(weights(pipe), _merged_copy("tiny-sd1", [(a, 1.3)], dtype))
    _assert_bitwise(weights(pipe), original)


def test_attach_tensors_stay_the_same_objects(tmp_path):
    """In-place writes only: parameters keep their identity and storage (compiled graphs stay valid)."""
    base = parts("tiny-sd1")
    a = adapterhub.load(adapter_type("locon").example(base, tmp_path / "a.safetensors", seed=1))
    pipe = parts("tiny-sd1")
    before = {k: (id(p), p.data_ptr()) for k, p in pipe.unet.named_parameters()}
    handle = a.attach(pipe, 0.7)
    a2 = _merged_copy("tiny-sd1", [(a, 0.7)], torch.float32)
    assert_same_weights(weights(pipe), a2, atol=0)
    handle.detach()
    after = {k: (id(p), p.data_ptr()) for k, p in pipe.unet.named_parameters()}
    assert before == after
