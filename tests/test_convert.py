"""``adapterhub convert``: every layout a type has, with the reference readers as the oracles.

* Round trips kohya -> diffusers -> kohya and kohya -> peft -> kohya keep every module's delta within
  1e-6 (a LoRA with its text encoder on tiny-sd1, one with both text encoders on tiny-sdxl, a LoCon with
  3x3 convs; per-module ranks 1..4 and alphas that are not powers of two), and keep the metadata.
* The diffusers output, loaded by diffusers' ``load_lora_weights`` + ``fuse_lora``, equals our merge of
  the kohya source; the peft output, loaded per component by ``PeftModel.from_pretrained(...,
  subfolder=...)`` + ``merge_and_unload``, too (1e-5). LyCORIS-made LoCon-Tucker (the CP core folded)
  and LoHa-Tucker (PEFT ``use_effective_conv2d``) files the same way.
* Textual inversion a1111 <-> diffusers, loaded by diffusers' ``load_textual_inversion``; ControlNet and
  T2I-Adapter diffusers <-> single file, loaded by ``from_pretrained``; real files from
  shared/wild-adapters; the refusals and the CLI's one-line errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapterhub
from adapterhub.api import sha256_file
from adapterhub.cli import main
from adapterhub.convert import CONVERTED_FROM, CONVERTED_FROM_SHA256, convert
from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.plugins import adapter_type

from conftest import WILD_ADAPTERS as WILD
from lora_helpers import assert_same_weights, diffusers_fused, ours_merged, parts, quiet, randomize_, weights

quiet()
ROUND_TRIP_ATOL = 1e-6
ALPHAS = (0.7, 3.0, 1.3, 5.0, 0.45)  # scales alpha / r that are not powers of two
META = {"ss_network_module": "networks.lora", "ss_output_name": "style", "modelspec.title": "Style",
        "ss_tag_frequency": json.dumps({"1_style": {"cat": 3}})}
CASES = {"lora-sd1": ("tiny-sd1", "lora"), "lora-sdxl": ("tiny-sdxl", "lora"), "locon-sd1": ("tiny-sd1", "locon")}
COMPONENTS = {"tiny-sd1": {"unet", "text_encoder"}, "tiny-sdxl": {"unet", "text_encoder", "text_encoder_2"}}


# --------------------------------------------------------------------------------------------
# sources and comparisons
# --------------------------------------------------------------------------------------------
def _varied_source(arch: str, kind: str, folder: Path, seed: int = 3) -> Path:
    """A kohya file from our example writer, cut to per-module ranks 1..4 with per-module alphas."""
    example = adapterhub.load(adapter_type(kind).example(parts(arch), folder / "example.safetensors", seed=seed))
    factors = {}
    for i, (target, patch) in enumerate(sorted(example.patches.items())):
        r = min(1 + i % 4, patch.rank)
        factors[target] = (patch.tensors["up"][:, :r].clone(), patch.tensors["down"][:r].clone(), ALPHAS[i % 5])
    adapter = adapter_type(kind).from_factors(factors, metadata=META, base=arch)
    return adapter.save(folder / f"{kind}_{arch}.safetensors", "kohya")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    made = {}

    def get(case: str) -> Path:
        if case not in made:
            arch, kind = CASES[case]
            (folder / case).mkdir()
            made[case] = _varied_source(arch, kind, folder / case)
        return made[case]

    return get


def _shape(patch) -> tuple[int, ...]:
    """The weight shape a delta is computed for; LoHa / LoKr without a CP core: out x (in * kh * kw)."""
    if patch.expected_shape() is not None:
        return tuple(patch.expected_shape())
    if hasattr(patch, "_factor_dims"):
        (l, m), (k, n) = patch._factor_dims()
        return (l * k, m * n)
    return (patch.out_features, patch.in_features)


def deltas(path) -> dict[str, torch.Tensor]:
    adapter = adapterhub.load(path)
    return {t: p.delta(torch.zeros(_shape(p))) for t, p in adapter.patches.items()}


def assert_same_deltas(a: dict, b: dict, atol: float = ROUND_TRIP_ATOL) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max delta error {worst:.3g}"
    assert any(x.abs().max() > 1e-3 for x in a.values()), "deltas are ~zero: the comparison would be vacuous"
    return worst


def header(path: Path) -> tuple[list[str], dict]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata() or {}


# --------------------------------------------------------------------------------------------
# LoRA family: round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["diffusers", "peft"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_every_delta_and_the_metadata(case, via, sources, tmp_path):
    arch, kind = CASES[case]
    src = sources(case)
    source = adapterhub.load(src)
    assert (source.type, source.format) == (kind, "kohya") and len({p.rank for p in source.patches.values()}) > 1
    mid = tmp_path / ("mid.safetensors" if via == "diffusers" else "mid")
    done = convert(src, via, mid)
    assert (done["type"], done["from"], done["to"], done["format"]) == (kind, "kohya", via, via)
    assert done["read_back_type"] == kind and done["metadata_kept"] and done["source_sha256"] == sha256_file(src)

    if via == "diffusers":
        keys, meta = header(mid)
        assert {k.split(".")[0] for k in keys} == COMPONENTS[arch]
        # UNet attention projections in the attention-processor form, other UNet modules LoRACompatible-named,
        # text encoders PEFT-named: the forms diffusers and ComfyUI both read (test_interop_sdxl.py)
        unet = [k for k in keys if k.startswith("unet.")]
        assert all(k.endswith(("_lora.down.weight", "_lora.up.weight", ".lora.down.weight", ".lora.up.weight"))
                   for k in unet) and any(".processor.to_q_lora." in k for k in unet)
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys if not k.startswith("unet."))
        assert "lora_adapter_metadata" not in meta  # scales are baked: diffusers must not rescale
    else:
        assert {p.name for p in mid.iterdir()} == COMPONENTS[arch]
        config = json.loads((mid / "unet" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["rank_pattern"] and config["alpha_pattern"]
        keys, meta = header(mid / "unet" / "adapter_model.safetensors")
        assert all(k.startswith("base_model.model.") for k in keys)
    assert {k: meta[k] for k in META} == META
    assert (meta[CONVERTED_FROM], meta[CONVERTED_FROM_SHA256]) == ("kohya", sha256_file(src))

    back = tmp_path / "back.safetensors"
    again = convert(mid, "kohya", back)
    assert (again["from"], again["format"], again["read_back_type"]) == (via, "kohya", kind)
    original = deltas(src)
    assert_same_deltas(deltas(mid), original)
    assert_same_deltas(deltas(back), original)
    _, meta = header(back)
    assert {k: meta[k] for k in META} == META
    assert (meta[CONVERTED_FROM], meta[CONVERTED_FROM_SHA256]) == (via, sha256_file(mid))


# --------------------------------------------------------------------------------------------
# LoRA family: the reference loaders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["locon-sd1", "lora-sdxl"])
def test_diffusers_output_fused_by_diffusers_equals_our_merge(case, sources, tmp_path):
    arch, _ = CASES[case]
    src = sources(case)
    out = Path(convert(src, "diffusers", tmp_path / "pytorch_lora_weights.safetensors")["out"])
    assert_same_weights(ours_merged(arch, [(src, 0.8)]), diffusers_fused(arch, [(out, 0.8)]), weights(parts(arch)))


def _peft_merged(arch: str, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own loader and merge, one component at a time."""
    from peft import PeftModel

    model, merged = parts(arch), {}
    for component in sorted(p.name for p in folder.iterdir()):
        module = PeftModel.from_pretrained(getattr(model, component), str(folder), subfolder=component)
        merged.update({f"{component}.{k}": v for k, v in module.merge_and_unload().state_dict().items()})
    return merged


@pytest.mark.parametrize("case", ["locon-sd1", "lora-sdxl"])
def test_peft_output_merged_by_peft_equals_our_merge(case, sources, tmp_path):
    arch, _ = CASES[case]
    src = sources(case)
    folder = Path(convert(src, "peft", tmp_path / "peft")["out"])
    ref = _peft_merged(arch, folder)
    assert ref.keys() == weights(parts(arch)).keys()
    assert_same_weights(ours_merged(arch, [(src, 1.0)]), ref, weights(parts(arch)))


LYCORIS_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _lycoris_file(folder: Path, **kwargs) -> Path:
    """A LyCORIS network made by lycoris-lora itself on tiny-sd1, random non-zero weights."""
    from lycoris.kohya import create_network

    model = parts("tiny-sd1")
    (folder / "preset.toml").write_text(LYCORIS_PRESET)
    dim, alpha = kwargs.pop("dim"), kwargs.pop("alpha")
    net = create_network(1.0, dim, alpha, None, model.text_encoder, model.unet, preset=str(folder / "preset.toml"),
                         **kwargs)
    net.apply_to(model.text_encoder, model.unet, True, True)
    assert randomize_(net, 17, 0.1) > 0
    path = folder / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path


def test_lycoris_locon_tucker_core_is_folded_for_diffusers(tmp_path):
    src = _lycoris_file(tmp_path, algo="locon", dim=4, alpha=3, conv_dim=3, conv_alpha=5, use_tucker=True)
    assert any(k.endswith(".lora_mid.weight") for k in header(src)[0])
    out = Path(convert(src, "diffusers", tmp_path / "folded.safetensors")["out"])
    assert not any(".lora_mid" in k for k in header(out)[0])
    assert_same_deltas(deltas(out), deltas(src))
    assert_same_weights(ours_merged("tiny-sd1", [(src, 1.0)]), diffusers_fused("tiny-sd1", [(out, 1.0)]),
                        weights(parts("tiny-sd1")))


def test_lycoris_loha_tucker_to_peft_loha(tmp_path):
    src = _lycoris_file(tmp_path, algo="loha", dim=3, alpha=2, conv_dim=3, conv_alpha=5, use_tucker=True)
    folder = Path(convert(src, "peft", tmp_path / "peft")["out"])
    config = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["use_effective_conv2d"]
    assert adapterhub.inspect(folder, with_hash=False)["type"] == "loha"
    assert_same_deltas(deltas(folder), deltas(src))
    assert_same_weights(ours_merged("tiny-sd1", [(src, 1.0)]), _peft_merged("tiny-sd1", folder),
                        weights(parts("tiny-sd1")))


def test_adalora_is_peft_adalora_or_written_as_the_lora_it_equals(tmp_path):
    src = adapter_type("adalora").example(parts("tiny-sd1"), tmp_path / "adalora", seed=6)
    original = deltas(src)
    for to, name, again in (("peft", "peft", "adalora"), ("diffusers", "d.safetensors", "lora"),
                            ("kohya", "k.safetensors", "lora")):
        done = convert(src, to, tmp_path / name)
        assert (done["type"], done["from"], done["read_back_type"]) == ("adalora", "peft", again)
        assert_same_deltas(deltas(tmp_path / name), original)


def test_layouts_that_do_not_exist_are_refused_by_name(tmp_path):
    lokr = WILD / "lycoris_repo_smart_falcon_8_lokr_oldimpl.safetensors"
    hyper = adapter_type("hypernetwork").example(parts("tiny-sd1"), tmp_path / "hyper.pt", seed=1)
    loha = adapter_type("loha").example(parts("tiny-sd1"), tmp_path / "loha.safetensors", seed=1)
    cases = [(hyper, "diffusers", "a hypernetwork has no diffusers layout; layouts for it: a1111"),
             (loha, "diffusers", "a loha has no diffusers layout; layouts for it: kohya, a1111, peft")]
    if lokr.exists():
        cases += [(lokr, "diffusers", "a lokr has no diffusers layout; layouts for it: kohya, a1111"),
                  (lokr, "peft", "a lokr has no peft layout; layouts for it: kohya, a1111")]
    for src, to, message in cases:
        with pytest.raises(AdapterError, match=message):
            convert(src, to, tmp_path / "refused")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".refused", "refused"))]


# --------------------------------------------------------------------------------------------
# textual inversion
# --------------------------------------------------------------------------------------------
def _reference_ti(arch: str):
    """An object with diffusers' TextualInversionLoaderMixin over tiny-* text encoders and the real
    CLIP tokenizers, so ``load_textual_inversion`` runs exactly as on a pipeline."""
    from diffusers.loaders import TextualInversionLoaderMixin

    from adapterhub.base import cache_dir
    from adapterhub.tokenizer import clip_tokenizer

    class Reference(TextualInversionLoaderMixin):
        hf_device_map = None

        @property
        def components(self):  # nothing offloaded
            return {}

    ref, built = Reference(), parts(arch)
    ref.tokenizer, ref.text_encoder = clip_tokenizer("<|endoftext|>", cache=cache_dir()), built.text_encoder
    if arch == "tiny-sdxl":
        ref.tokenizer_2, ref.text_encoder_2 = clip_tokenizer("!", cache=cache_dir()), built.text_encoder_2
    return ref


def _rows(tokenizer, encoder, tokens) -> torch.Tensor:
    return encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)].detach()


def test_textual_inversion_a1111_to_diffusers_and_back(tmp_path):
    src = adapter_type("textual_inversion").example(parts("tiny-sd1"), tmp_path / "stylized.safetensors", seed=4)
    vectors = next(iter(adapterhub.load(src).patches.values())).vectors
    assert adapterhub.load(src).format == "a1111-safetensors" and vectors.shape[0] == 2

    done = convert(src, "diffusers", tmp_path / "learned_embeds.safetensors")
    assert done["format"] == "diffusers" and done["metadata_kept"]
    keys, meta = header(tmp_path / "learned_embeds.safetensors")
    assert keys == ["stylized"] and meta[CONVERTED_FROM] == "a1111-safetensors"  # the webui's prompt name
    ref = _reference_ti("tiny-sd1")
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    assert torch.equal(_rows(ref.tokenizer, ref.text_encoder, ["stylized", "stylized_1"]), vectors)

    for name, layout in (("back.pt", "a1111-pt"), ("back.safetensors", "a1111-safetensors")):
        done = convert(tmp_path / "learned_embeds.safetensors", "a1111", tmp_path / name)
        again = adapterhub.load(tmp_path / name)
        assert (done["format"], again.format) == (layout, layout)
        assert torch.equal(next(iter(again.patches.values())).vectors, vectors)
        assert again.metadata[CONVERTED_FROM] == "diffusers" and again.metadata["adapterhub.example"]


def test_textual_inversion_sdxl_loads_in_diffusers_per_encoder(tmp_path):
    from safetensors.torch import load_file

    src = adapter_type("textual_inversion").example(parts("tiny-sdxl"), tmp_path / "xl.safetensors", seed=5)
    done = convert(src, "diffusers", tmp_path / "xl_diffusers.safetensors")
    assert (done["from"], done["format"]) == ("sdxl", "sdxl")  # diffusers loads clip_l / clip_g one by one
    state = load_file(str(tmp_path / "xl_diffusers.safetensors"))
    ref = _reference_ti("tiny-sdxl")
    token = "<xl-style>"
    ref.load_textual_inversion(state["clip_l"], token=token, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=token, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours = {p.encoder: p.vectors for p in adapterhub.load(src).patches.values()}
    tokens = [token] + [f"{token}_{i}" for i in range(1, ours["clip_l"].shape[0])]
    assert torch.equal(_rows(ref.tokenizer, ref.text_encoder, tokens), ours["clip_l"])
    assert torch.equal(_rows(ref.tokenizer_2, ref.text_encoder_2, tokens), ours["clip_g"])


# --------------------------------------------------------------------------------------------
# ControlNet and T2I-Adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_control_folder_to_single_file_and_back(kind, tmp_path):
    from diffusers import ControlNetModel, T2IAdapter

    cls = {"controlnet": ControlNetModel, "t2i_adapter": T2IAdapter}[kind]
    folder = adapter_type(kind).example(parts("tiny-sd1"), tmp_path / "example", seed=2)
    expected = cls.from_pretrained(str(folder)).state_dict()
    single = tmp_path / "single.safetensors"
    done = convert(folder, "a1111", single)
    keys, meta = header(single)
    if kind == "controlnet":  # the webui's ControlNet extension converts diffusers names itself
        assert done["format"] == "diffusers" and "controlnet_cond_embedding.conv_in.weight" in keys
    else:  # TencentARC's names, what the extension's T2I-Adapter loader reads
        assert done["format"] == "tencentarc" and "conv_in.weight" in keys and "body.0.block1.weight" in keys
    assert meta[CONVERTED_FROM] == "diffusers" and meta["adapterhub.base"] == "tiny-sd1"

    back = tmp_path / "back"
    assert convert(single, "diffusers", back)["format"] == "diffusers"
    loaded = cls.from_pretrained(str(back)).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_sdxl_t2i_adapter_has_no_tencentarc_layout(tmp_path):
    folder = adapter_type("t2i_adapter").example(parts("tiny-sdxl"), tmp_path / "xl", seed=2)
    with pytest.raises(AdapterError, match=r"out\.safetensors: an SDXL T2I-Adapter has no TencentARC"):
        convert(folder, "a1111", tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xl"]


# --------------------------------------------------------------------------------------------
# real files
# --------------------------------------------------------------------------------------------
def _wild(name: str) -> Path:
    path = WILD / name
    if not path.exists():
        pytest.skip("shared/wild-adapters is not available")
    return path


def test_wild_diffusers_lora_with_alpha_config_to_kohya_and_back(tmp_path):
    """FaithSang's diffusers file scales by its lora_adapter_metadata (r=4, alpha=16): the kohya file gets
    alpha, the diffusers file written back has the scale baked in and no config."""
    src = _wild("faithsang_diffusers_peftnaming_lora.safetensors")
    assert {p.scale for p in adapterhub.load(src).patches.values()} == {4.0}
    assert convert(src, "kohya", tmp_path / "kohya.safetensors")["format"] == "kohya"
    done = convert(tmp_path / "kohya.safetensors", "diffusers", tmp_path / "diffusers.safetensors")
    # to_q/k/v only: every key in the attention-processor form (what ComfyUI reads), so it reads back as that
    assert done["format"] == "diffusers-attnproc"
    assert "lora_adapter_metadata" not in header(tmp_path / "diffusers.safetensors")[1]
    original = deltas(src)
    assert_same_deltas(deltas(tmp_path / "kohya.safetensors"), original)
    assert_same_deltas(deltas(tmp_path / "diffusers.safetensors"), original)


def test_wild_attnproc_lora_to_diffusers_and_kohya(tmp_path):
    src = _wild("haseebae_pytorch_lora_weights.safetensors")
    assert convert(src, "diffusers", tmp_path / "new.safetensors")["from"] == "diffusers-attnproc"
    assert convert(tmp_path / "new.safetensors", "a1111", tmp_path / "webui.safetensors")["format"] == "kohya"
    original = deltas(src)
    assert_same_deltas(deltas(tmp_path / "new.safetensors"), original)
    assert_same_deltas(deltas(tmp_path / "webui.safetensors"), original)


def test_wild_lokr_normalising_rewrite(tmp_path):
    src = _wild("lycoris_repo_smart_falcon_8_lokr_oldimpl.safetensors")
    done = convert(src, "kohya", tmp_path / "lokr.safetensors")
    assert (done["type"], done["format"]) == ("lokr", "lycoris")
    meta = header(tmp_path / "lokr.safetensors")[1]
    assert meta["ss_network_module"] == "lycoris.kohya" and meta[CONVERTED_FROM] == "lycoris"
    # the same factors bit for bit and the same scales: the same deltas (SD1-sized Kronecker products
    # are too slow to build here)
    before, after = adapterhub.load(src).patches, adapterhub.load(tmp_path / "lokr.safetensors").patches
    assert before.keys() == after.keys()
    for target, patch in before.items():
        assert after[target].scale == patch.scale
        assert after[target].tensors.keys() == patch.tensors.keys()
        assert all(torch.equal(after[target].tensors[k], t) for k, t in patch.tensors.items())


def test_wild_embedding_to_diffusers_and_back(tmp_path):
    src = _wild("fgjd_EasyNegativeV2.safetensors")
    vectors = next(iter(adapterhub.load(src).patches.values())).vectors
    convert(src, "diffusers", tmp_path / "learned_embeds.bin")
    assert list(torch.load(tmp_path / "learned_embeds.bin", weights_only=True)) == ["fgjd_EasyNegativeV2"]
    convert(tmp_path / "learned_embeds.bin", "a1111", tmp_path / "EasyNegativeV2.safetensors")
    again = adapterhub.load(tmp_path / "EasyNegativeV2.safetensors")
    assert again.format == "a1111-safetensors"
    assert torch.equal(next(iter(again.patches.values())).vectors, vectors)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_and_table(sources, tmp_path, capsys):
    src = sources("lora-sd1")
    rc, out, _ = _cli(capsys, src, "--to", "peft", "--out", tmp_path / "peft", "--json")
    data = json.loads(out)
    assert rc == 0 and (data["type"], data["from"], data["to"], data["format"]) == ("lora", "kohya", "peft", "peft")
    assert data["tensors"] == 2 * len(adapterhub.load(src).patches)
    rc, out, _ = _cli(capsys, src, "--to", "a1111", "--out", tmp_path / "webui.safetensors")
    assert rc == 0 and "lora: kohya -> a1111 (kohya)" in out and "metadata_kept" in out
    # --force replaces a file, and a folder as a whole
    rc, _, _ = _cli(capsys, src, "--to", "diffusers", "--out", tmp_path / "webui.safetensors", "--force")
    assert rc == 0 and adapterhub.inspect(tmp_path / "webui.safetensors", with_hash=False)["format"] == "diffusers"
    (tmp_path / "peft" / "stale.txt").write_text("old")
    rc, _, _ = _cli(capsys, tmp_path / "webui.safetensors", "--to", "peft", "--out", tmp_path / "peft", "--force")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft", "webui.safetensors"]


@pytest.mark.parametrize("problem", ["unreadable", "unknown-layout", "no-such-layout", "out-exists", "folder-name",
                                     "out-is-source", "missing"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(problem, sources, tmp_path, capsys):
    src = sources("lora-sd1")
    out = tmp_path / "out.safetensors"
    if problem == "unreadable":
        src = tmp_path / "junk.safetensors"
        src.write_bytes(b"\x00" * 64)
    elif problem == "no-such-layout":
        src = adapter_type("textual_inversion").example(parts("tiny-sd1"), tmp_path / "ti.pt")
    elif problem == "missing":
        src = tmp_path / "nope.safetensors"
    elif problem == "out-exists":
        out.write_bytes(b"keep me")
    args = {"unknown-layout": (src, "--to", "comfy", "--out", out),
            "out-exists": (src, "--to", "diffusers", "--out", out),
            "folder-name": (src, "--to", "kohya", "--out", tmp_path / "out"),
            "out-is-source": (src, "--to", "kohya", "--out", src, "--force"),
            }.get(problem, (src, "--to", "peft" if problem == "no-such-layout" else "kohya", "--out", out))
    before = sorted(p.name for p in tmp_path.iterdir())
    digest = sha256_file(src) if src.exists() else None
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    expected = {"unreadable": "junk.safetensors", "unknown-layout": "--to 'comfy'", "no-such-layout": "no peft layout",
                "out-exists": "already exists", "folder-name": "is a single file", "out-is-source": "is the file being",
                "missing": "nope.safetensors"}[problem]
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no staging leftovers
    assert digest is None or sha256_file(src) == digest
    if problem == "out-exists":
        assert out.read_bytes() == b"keep me"


def test_service_refuses_non_stable_diffusion_adapters(tmp_path):
    src = _wild("anirudhak_peft_gpt2_adapter_model.safetensors")
    with pytest.raises(AdapterhubError, match="only Stable Diffusion, Flux and SD3 adapters convert"):
        convert(src, "kohya", tmp_path / "gpt2.safetensors")
