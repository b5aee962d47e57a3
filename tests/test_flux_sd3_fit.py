"""SD3 / FLUX.1 (issue #21): a merge refuses an adapter that cannot fit its base before building the base.

A real Flux base is 12 B parameters (minutes and tens of GiB to build); what the files say (the adapter's
family and hidden width, the base's preset recipe, diffusers folder config or checkpoint header) decides
first, in one line naming the file, exit 2. ``load_base`` is replaced by a tripwire in every refusal
test: the refusal must come without it.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from flux_helpers import cli as _cli


@pytest.fixture
def no_base_loading(monkeypatch):
    """Fails the test if anything builds or loads a base."""
    import adapterhub.base
    import adapterhub.transformer_bases

    def tripwire(*args, **kwargs):
        raise AssertionError(f"a base was loaded: {args}")

    monkeypatch.setattr(adapterhub.base, "load_base", tripwire)
    monkeypatch.setattr(adapterhub.transformer_bases, "build_transformer_base", tripwire)


def _lora(path, modules, metadata=None):
    """A rank-1 LoRA with ``{module name: (out, in)}`` (diffusers names get lora_A / lora_B)."""
    sd = {}
    for name, (out_f, in_f) in modules.items():
        down, up = ((".lora_A.weight", ".lora_B.weight") if name.startswith("transformer.")
                    else (".lora_down.weight", ".lora_up.weight"))
        sd[name + down], sd[name + up] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
    save_file(sd, str(path), metadata=metadata)
    return path


TINY_SD3_LORA = {"transformer.transformer_blocks.0.attn.to_q": (48, 48)}
TINY_FLUX_LORA = {"transformer.single_transformer_blocks.0.attn.to_q": (32, 32)}
FLUX_LORA = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}
SD35_LARGE_LORA = {"transformer.transformer_blocks.0.attn.to_k": (2432, 2432)}
SD1_LORA = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}

# (adapter modules, base, words the one line must hold)
REFUSED = [
    (TINY_SD3_LORA, "flux-dev", ["sd3 adapter", "flux-dev is a flux model"]),
    (FLUX_LORA, "sd3.5-large", ["flux adapter", "sd3.5-large is an sd3 model"]),
    (SD1_LORA, "flux-schnell", ["Stable Diffusion adapter", "flux-schnell is a flux model"]),
    (TINY_FLUX_LORA, "flux-dev", ["hidden width 32", "hidden width 3072"]),
    (SD35_LARGE_LORA, "sd3.5-medium", ["hidden width 2432", "hidden width 1536"]),
    (FLUX_LORA, "tiny-sd1", ["flux adapter", "tiny-sd1 is a Stable Diffusion model"]),
]


@pytest.mark.parametrize("modules,base,words", REFUSED)
def test_merge_refuses_a_misfit_before_loading_the_base(tmp_path, capsys, no_base_loading, modules, base, words):
    path = _lora(tmp_path / "style.safetensors", modules)
    rc, out, err = _cli(capsys, "merge", str(path), "--base", base, "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(path) in errors[0] and all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "out").exists()


def test_reported_bases_are_family_names_users_know(tmp_path, capsys, no_base_loading):
    """The line names the adapter's family and width, not a made-up preset ("sd3-medium")."""
    path = _lora(tmp_path / "m.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (1536, 1536)})
    rc, _, err = _cli(capsys, "merge", str(path), "--base", "flux-dev", "--out", str(tmp_path / "out"))
    assert rc == 2 and "sd3-medium" not in err and "sd3 adapter" in err


def _folder(tmp_path, pipeline, transformer_class, heads, head_dim):
    """A diffusers folder as far as the early check reads it: model_index.json and the transformer config."""
    folder = tmp_path / "base"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                         "transformer": ["diffusers", transformer_class]}))
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": transformer_class, "num_attention_heads": heads, "attention_head_dim": head_dim}))
    return folder


def test_diffusers_folder_is_told_by_its_config(tmp_path, capsys, no_base_loading):
    folder = _folder(tmp_path, "FluxPipeline", "FluxTransformer2DModel", 24, 128)
    path = _lora(tmp_path / "sd3.safetensors", SD35_LARGE_LORA)
    rc, _, err = _cli(capsys, "merge", str(path), "--base", str(folder), "--out", str(tmp_path / "out"))
    assert rc == 2 and "sd3 adapter" in err and "is a flux model" in err, err


@pytest.mark.parametrize("keys,family", [
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (96, 32)}, "a flux"),
    ({"joint_blocks.0.x_block.attn.qkv.weight": (144, 48)}, "an sd3"),
])
def test_single_file_checkpoint_is_told_by_its_header(tmp_path, capsys, no_base_loading, keys, family):
    """Only the header is read: the original (BFL / SD3 reference) key names tell the family."""
    ckpt = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape, dtype=torch.int8) for k, shape in keys.items()}, str(ckpt))
    path = _lora(tmp_path / "sd1.safetensors", SD1_LORA)
    rc, _, err = _cli(capsys, "merge", str(path), "--base", str(ckpt), "--out", str(tmp_path / "out"))
    assert rc == 2 and f"model.safetensors is {family} model" in err, err


def test_matching_bases_pass_the_early_check(tmp_path):
    """The check passes whatever fits (tiny-flux for a tiny-flux adapter; a family-only adapter), so the
    real shape checks after loading still decide."""
    import adapterhub
    from adapterhub.merge import check_fits_base

    check_fits_base("tiny-flux", [adapterhub.load(_lora(tmp_path / "a.safetensors", TINY_FLUX_LORA))])
    check_fits_base("flux-dev", [adapterhub.load(_lora(tmp_path / "b.safetensors", FLUX_LORA))])
    check_fits_base("sd3.5-large", [adapterhub.load(_lora(tmp_path / "c.safetensors", SD35_LARGE_LORA))])
    unknown_width = _lora(tmp_path / "d.safetensors", {"transformer.context_embedder": (1536, 4096)},
                          metadata={"modelspec.architecture": "stable-diffusion-3.5-medium/lora"})
    check_fits_base("sd3.5-medium", [adapterhub.load(unknown_width)])


def test_hub_id_in_the_local_cache_is_told_by_its_cached_config(tmp_path, capsys, no_base_loading, monkeypatch):
    """``--base black-forest-labs/FLUX.1-dev`` (a hub id in the local Hugging Face cache): its cached
    ``model_index.json`` / ``transformer/config.json`` decide, before 12 B parameters are loaded."""
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "0123abcd"
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (snapshot / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", "num_attention_heads": 24, "attention_head_dim": 128}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = _lora(tmp_path / "sd35.safetensors", SD35_LARGE_LORA)
    rc, _, err = _cli(capsys, "merge", str(path), "--base", "black-forest-labs/FLUX.1-dev", "--out",
                      str(tmp_path / "out"))
    assert rc == 2 and "sd3 adapter" in err and "FLUX.1-dev is a flux model" in err, err
