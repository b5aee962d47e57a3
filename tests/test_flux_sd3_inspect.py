"""inspect and the catalog on Flux / SD3 LoRAs: the layout names users know (``xlabs``, ``comfyui``) and the
base as a preset name (``flux-dev`` / ``flux-schnell`` by the guidance embedder or the modelspec,
``sd3.5-medium`` / ``sd3.5-large`` by widths), recorded and filtered by the catalog.

Files are header-sized LoRAs (rank 1, zeros) at the widths that matter: nothing is built.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from flux_helpers import cli as _cli


def _file(path, modules, suffixes=(".lora_down.weight", ".lora_up.weight"), metadata=None):
    """A rank-1 LoRA with ``{module name: (out, in)}`` widths, its keys ``name + suffixes``."""
    sd = {}
    for name, (out_f, in_f) in modules.items():
        sd[name + suffixes[0]], sd[name + suffixes[1]] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
    save_file(sd, str(path), metadata=metadata)
    return path


def _inspect(capsys, path):
    rc, out, err = _cli(capsys, "inspect", "--json", "--no-hash", str(path))
    assert rc == 0, err
    return json.loads(out)


XLABS = {"double_blocks.0.processor.qkv_lora1": (96, 32), "double_blocks.0.processor.proj_lora2": (32, 32),
         "single_blocks.1.processor.qkv_lora": (96, 32)}
COMFY = {"diffusion_model.double_blocks.0.img_attn.qkv": (96, 32),
         "diffusion_model.single_blocks.1.linear2": (32, 160)}

LAYOUTS = [
    (XLABS, (".down.weight", ".up.weight"), "xlabs"),
    (COMFY, (".lora_down.weight", ".lora_up.weight"), "comfyui"),
    (COMFY, (".lora_A.weight", ".lora_B.weight"), "comfyui"),
    # the neighbours keep theirs: sd-scripts' BFL names, ai-toolkit's diffusers paths under ComfyUI's prefix
    ({"lora_unet_double_blocks_0_img_attn_qkv": (96, 32)}, (".lora_down.weight", ".lora_up.weight"), "kohya"),
    ({"diffusion_model.transformer_blocks.0.attn.to_q": (32, 32)}, (".lora_A.weight", ".lora_B.weight"), "diffusers"),
]


@pytest.mark.parametrize("modules,suffixes,layout", LAYOUTS)
def test_inspect_names_the_flux_layout(tmp_path, capsys, modules, suffixes, layout):
    facts = _inspect(capsys, _file(tmp_path / "a.safetensors", modules, suffixes))
    assert (facts["type"], facts["format"], facts["family"], facts["base"]) == ("lora", layout, "flux", "tiny-flux")


def test_comfyui_file_with_text_encoder_names_is_comfyui(tmp_path, capsys):
    modules = {**COMFY, "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (32, 32)}
    facts = _inspect(capsys, _file(tmp_path / "a.safetensors", modules))
    assert facts["format"] == "comfyui"


def test_xlabs_and_comfyui_layouts_are_declared_and_convert_reports_them(tmp_path, capsys):
    """The layouts are the type's declared formats, and ``convert`` names the source layout as read."""
    import adapterhub
    from adapterhub.convert import convert
    from adapterhub_plugins.lora import LAYOUTS as DECLARED

    assert {"xlabs", "comfyui"} <= set(DECLARED)
    gen = torch.Generator().manual_seed(0)
    sd = {"double_blocks.0.processor.proj_lora1.down.weight": torch.randn(2, 32, generator=gen),
          "double_blocks.0.processor.proj_lora1.up.weight": torch.randn(32, 2, generator=gen)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    done = convert(tmp_path / "x.safetensors", "kohya", tmp_path / "k.safetensors")
    assert (done["from"], done["format"]) == ("xlabs", "kohya")
    assert adapterhub.load(tmp_path / "x.safetensors").format == "xlabs"


REAL = 3072
GUIDANCE = {"lora_unet_guidance_in_in_layer": (REAL, 256), "lora_unet_double_blocks_0_img_attn_proj": (REAL, REAL)}
PLAIN = {"lora_unet_double_blocks_0_img_attn_proj": (REAL, REAL)}

BASES = [
    # the guidance embedder exists in FLUX.1 dev only
    (GUIDANCE, None, "flux-dev"),
    ({"diffusion_model.guidance_in.out_layer": (REAL, REAL)}, None, "flux-dev"),
    ({"transformer.time_text_embed.guidance_embedder.linear_1": (REAL, 256)}, None, "flux-dev"),
    # no telling module: the modelspec (as sd-scripts and our trainer write it) decides, else the family's name
    (PLAIN, {"modelspec.architecture": "flux-1-schnell/lora"}, "flux-schnell"),
    (PLAIN, {"modelspec.architecture": "flux-1-dev/lora"}, "flux-dev"),
    (PLAIN, None, "flux"),
    # a schnell modelspec on a file that patches the guidance embedder: the shapes win
    (GUIDANCE, {"modelspec.architecture": "flux-1-schnell/lora"}, "flux-dev"),
]


@pytest.mark.parametrize("modules,metadata,base", BASES)
def test_inspect_names_flux_dev_or_schnell(tmp_path, capsys, modules, metadata, base):
    suffixes = (".lora_A.weight", ".lora_B.weight") if next(iter(modules)).startswith(("transformer.",
                                                                                        "diffusion_model.")) else \
        (".lora_down.weight", ".lora_up.weight")
    facts = _inspect(capsys, _file(tmp_path / "a.safetensors", modules, suffixes, metadata))
    assert (facts["family"], facts["base"]) == ("flux", base)


def test_a_flux_dev_lora_is_refused_on_a_base_of_another_width_before_loading(tmp_path):
    """The early check knows the preset names' widths: a flux-dev file (3072) on tiny-flux (32)."""
    import adapterhub
    from adapterhub.errors import AdapterError
    from adapterhub.merge import check_fits_base

    adapter = adapterhub.load(_file(tmp_path / "a.safetensors", GUIDANCE))
    assert adapter.base == "flux-dev"
    with pytest.raises(AdapterError, match="hidden width 3072.*hidden width 32"):
        check_fits_base("tiny-flux", [adapter])


def test_catalog_records_the_base_and_filters_by_it_or_by_family(tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    _file(lib / "dev.safetensors", GUIDANCE)
    _file(lib / "schnell.safetensors", PLAIN, metadata={"modelspec.architecture": "flux-1-schnell/lora"})
    _file(lib / "large.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_proj": (2432, 2432)})
    _file(lib / "xlabs.safetensors", XLABS, (".down.weight", ".up.weight"))
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    rc, _, err = _cli(capsys, "catalog", "--catalog", url, "scan", str(lib), "--jobs", "1")
    assert rc == 0, err

    def listed(*options):
        rc, out, err = _cli(capsys, "catalog", "--catalog", url, "list", "--json", *options)
        assert rc == 0, err
        return {e["name"]: (e["base"], e["format"]) for e in json.loads(out)}

    assert listed() == {"dev": ("flux-dev", "kohya"), "schnell": ("flux-schnell", "kohya"),
                        "large": ("sd3.5-large", "kohya"), "xlabs": ("tiny-flux", "xlabs")}
    assert set(listed("--base", "flux-dev")) == {"dev"}
    assert set(listed("--base", "flux")) == {"dev", "schnell", "xlabs"}  # the family: every Flux base
    assert set(listed("--base", "sd3")) == {"large"}
