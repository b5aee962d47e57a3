"""Base models: the CLIP tokenizer, the tiny bases, the presets, loading and saving checkpoints."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from adapterhub import base, checkpoint
from adapterhub.errors import AdapterhubError
from adapterhub.io import read_safetensors_header
from adapterhub.tokenizer import PAD_OPENCLIP, PAD_SD1, VOCAB_SIZE, clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "Masterpiece, best quality, 1girl, (red hair:1.2), <lora:style:0.8>, looking at viewer",
    "  hello   World... it's 2024 -- café naïve 日本語 emoji 🙂",
    "",
    "a very long prompt " * 30,
]


def assert_same_tensors(a: dict, b: dict, cast=None):
    assert set(a) == set(b)
    for key, value in a.items():
        expected = value.to(cast) if cast is not None and value.is_floating_point() else value
        assert b[key].dtype == expected.dtype, key
        assert torch.equal(b[key], expected), key


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def test_tokenizer_ids_match_open_clip(tmp_path):
    import open_clip

    sd1, openclip_pad = clip_tokenizer(PAD_SD1, cache=tmp_path), clip_tokenizer(PAD_OPENCLIP, cache=tmp_path)
    assert (tmp_path / "tokenizers" / "clip-bpe" / "vocab.json").is_file()
    assert len(sd1) == VOCAB_SIZE and sd1.model_max_length == 77
    assert (sd1.pad_token_id, openclip_pad.pad_token_id) == (49407, 0)
    reference = open_clip.tokenize(PROMPTS).tolist()  # pads with 0, as "!" pads
    for prompt, expected in zip(PROMPTS, reference):
        ids = openclip_pad(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == expected, prompt
        end = expected.index(49407) + 1
        padded_with_eot = sd1(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert padded_with_eot == expected[:end] + [49407] * (77 - end), prompt


def test_tokenizers_are_independent_objects():
    first, second = clip_tokenizer(), clip_tokenizer()
    first.add_tokens(["<my-embedding>"])  # what textual inversion does
    assert len(first) == VOCAB_SIZE + 1 and len(second) == VOCAB_SIZE


# --------------------------------------------------------------------------------------------
# tiny bases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", base.TINY_BASES)
def test_tiny_base_is_deterministic_and_cached(name, tmp_path, monkeypatch, request):
    session_pipe = request.getfixturevalue(name.replace("-", "_"))  # built in the session cache
    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path))
    rng = torch.get_rng_state()
    pipe = base.load_base(name)
    assert torch.equal(torch.get_rng_state(), rng), "building a base must not disturb the caller's RNG"
    assert (tmp_path / "bases" / name / base.MARKER_FILE).is_file()
    assert type(pipe) is type(session_pipe)
    assert base.detect_architecture(pipe) == name
    assert_same_tensors(checkpoint.component_tensors(session_pipe), checkpoint.component_tensors(pipe))
    if name == "tiny-sd1":  # the second load comes from the cache
        monkeypatch.setattr(base, "build_preset", _must_not_build)
        assert base.detect_architecture(base.load_base(name)) == name


def _must_not_build(*args, **kwargs):
    raise AssertionError("built again")


def test_tiny_sd1_shape(tiny_sd1):
    unet = tiny_sd1.unet.config
    assert unet.layers_per_block == 2 and unet.cross_attention_dim == 64 and not unet.use_linear_projection
    assert tiny_sd1.unet.down_blocks[0].attentions[0].proj_in.weight.ndim == 4  # SD1's 1x1 conv
    assert tiny_sd1.vae_scale_factor == 8 and unet.sample_size * tiny_sd1.vae_scale_factor == 256
    assert tiny_sd1.safety_checker is None and tiny_sd1.tokenizer.pad_token == PAD_SD1


def test_tiny_sdxl_generates(tiny_sdxl):
    assert tiny_sdxl.tokenizer.pad_token == PAD_SD1 and tiny_sdxl.tokenizer_2.pad_token == PAD_OPENCLIP
    assert tiny_sdxl.unet.down_blocks[1].attentions[0].proj_in.weight.ndim == 2  # SDXL's linear projection
    latents = tiny_sdxl("a cat", num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all()


def test_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "build_preset", crash)
    with pytest.raises(KeyboardInterrupt):
        base.load_base("tiny-sd1")
    assert list((tmp_path / "bases").iterdir()) == []


def test_subset_build_matches_full_build(tiny_sd1):
    parts = base.build_preset("tiny-sd1", device="cpu", components=("text_encoder",), seed=base.TINY_SEED)
    assert isinstance(parts, base.BaseComponents) and parts.unet is None
    assert_same_tensors(tiny_sd1.text_encoder.state_dict(), parts.text_encoder.state_dict())


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
VAE_PARAMS = 83_653_863
PRESET_PARAMS = {  # published parameter counts
    "sd1": {"unet": 859_520_964, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_on_meta_has_real_parameter_counts(name):
    parts = base.build_preset(name, device="meta", dtype=torch.float16)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.components.items()
              if isinstance(m, torch.nn.Module)}
    assert counts == {**PRESET_PARAMS[name], "vae": VAE_PARAMS}
    assert parts.unet.device.type == "meta" and parts.unet.dtype == torch.float16
    assert base.detect_architecture(parts) == name
    shapes = {k: tuple(v.shape) for k, v in checkpoint.original_state_dict(parts).items()}
    assert base.checkpoint_architecture(shapes, {}) == name  # detected from ldm/sgm shapes alone


def test_preset_component_errors():
    with pytest.raises(AdapterhubError, match="text_encoder_2"):
        base.build_preset("sd1", components=("text_encoder_2",))
    with pytest.raises(AdapterhubError, match="unknown base architecture"):
        base.build_preset("sd3")


def test_config_skeleton_is_complete(adapterhub_cache):
    folder = base.config_folder("sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for name in ("unet/config.json", "vae/config.json", "text_encoder_2/config.json",
                 "scheduler/scheduler_config.json", "tokenizer_2/tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.rglob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# detect_architecture
# --------------------------------------------------------------------------------------------
def test_detect_architecture_from_pipelines_and_state_dicts(tiny_sd1, tiny_sdxl):
    assert base.detect_architecture(tiny_sd1) == "tiny-sd1"
    assert base.detect_architecture(tiny_sdxl.unet) == "tiny-sdxl"
    assert base.detect_architecture(tiny_sdxl.unet.state_dict()) == "tiny-sdxl"
    assert base.detect_architecture(checkpoint.original_state_dict(tiny_sd1)) == "tiny-sd1"
    te2 = {f"text_encoder_2.{k}": v for k, v in tiny_sdxl.text_encoder_2.state_dict().items()}
    assert base.detect_architecture(te2) == "tiny-sdxl"
    assert base.detect_architecture({"conditioner.embedders.1.model.token_embedding.weight":
                                     torch.empty(49408, 1280, device="meta")}) == "sdxl"
    assert base.detect_architecture({}) == "unknown"
    assert base.detect_architecture(object()) == "unknown"


# --------------------------------------------------------------------------------------------
# saving and loading back
# --------------------------------------------------------------------------------------------
def test_diffusers_folder_round_trip(tiny_sd1, tmp_path):
    out = checkpoint.save_pipeline(tiny_sd1, tmp_path / "sd1-folder")
    assert (out / "model_index.json").is_file()
    again = base.load_base(str(out))
    assert_same_tensors(checkpoint.component_tensors(tiny_sd1), checkpoint.component_tensors(again))
    half = checkpoint.save_pipeline(tiny_sd1, tmp_path / "sd1-half", dtype=torch.float16)
    assert tiny_sd1.unet.dtype == torch.float32  # the pipeline itself is not cast
    for weights in half.rglob("*.safetensors"):
        header, _, _ = read_safetensors_header(weights)
        assert {entry["dtype"] for entry in header.values()} <= {"F16", "I64"}, weights


@pytest.mark.parametrize("name", base.TINY_BASES)
def test_single_file_round_trip(name, tmp_path, request):
    pipe = request.getfixturevalue(name.replace("-", "_"))
    out = checkpoint.save_pipeline(pipe, tmp_path / f"{name}.safetensors")
    header, metadata, _ = read_safetensors_header(out)
    assert metadata[base.METADATA_KEY] == name
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in header)
    again = base.load_base(str(out))
    assert type(again) is type(pipe)
    assert_same_tensors(checkpoint.component_tensors(pipe), checkpoint.component_tensors(again))
    assert again.scheduler.__class__ is pipe.scheduler.__class__


def test_sd2_layout_round_trip(tmp_path, monkeypatch):
    """SD2's OpenCLIP text-encoder layout, on an SD2-shaped tiny recipe made for this test."""
    tiny_sd2 = base.Recipe(base.SD_PIPELINE, {**base.TINY_UNET_SD1, "use_linear_projection": True}, base.TINY_VAE,
                           (("CLIPTextModel", base.TINY_BIGG),), (PAD_OPENCLIP,), base.DDIM_SD2_V)
    monkeypatch.setitem(base.PRESETS, "tiny-sd2", tiny_sd2)
    monkeypatch.setitem(checkpoint.FAMILY, "tiny-sd2", "sd2")
    pipe = base.build_preset("tiny-sd2", device="cpu", seed=1)
    state = checkpoint.original_state_dict(pipe, "tiny-sd2")
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    out = tmp_path / "sd2.safetensors"
    from adapterhub.io import save_safetensors

    save_safetensors(state, out, {base.METADATA_KEY: "tiny-sd2"})
    again = base.load_base(str(out))
    assert_same_tensors(checkpoint.component_tensors(pipe), checkpoint.component_tensors(again))
    assert again.scheduler.config.prediction_type == "v_prediction"


def test_ckpt_without_metadata_loads(tiny_sd1, tmp_path):
    ckpt = tmp_path / "model.ckpt"  # a pickle has no metadata: the architecture comes from shapes
    torch.save({"state_dict": checkpoint.original_state_dict(tiny_sd1), "global_step": 1}, ckpt)
    again = base.load_base(str(ckpt))
    assert_same_tensors(checkpoint.component_tensors(tiny_sd1), checkpoint.component_tensors(again))


def test_single_file_dtype(tiny_sdxl, tmp_path):
    out = checkpoint.save_pipeline(tiny_sdxl, tmp_path / "half.safetensors", dtype=torch.float16)
    header, _, _ = read_safetensors_header(out)
    assert {entry["dtype"] for entry in header.values()} == {"F16"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Evil()}, protocol=2))
    with pytest.raises(AdapterhubError, match="refused|pickle"):
        base.load_base(str(path))


def test_failed_saves_leave_nothing(tiny_sd1, tmp_path, monkeypatch):
    def half_write(folder, **kwargs):
        (folder / "partial.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(tiny_sd1, "save_pretrained", half_write)
    with pytest.raises(OSError):
        checkpoint.save_pipeline(tiny_sd1, tmp_path / "folder")
    def half_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", half_save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_pipeline(tiny_sd1, tmp_path / "one.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_meta_models_cannot_be_saved(tmp_path):
    parts = base.build_preset("sd1", components=("unet",))
    with pytest.raises(AdapterhubError, match="meta"):
        checkpoint.save_pipeline(parts, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------------------------
# bad specs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["missing.safetensors", "./missing-folder", "not a model id", "{folder}"])
def test_bad_spec_is_one_line_error(spec, tmp_path):
    spec = spec.format(folder=tmp_path)  # an existing folder that is not a pipeline
    with pytest.raises(AdapterhubError) as info:
        base.load_base(spec)
    message = str(info.value)
    assert "\n" not in message and spec in message
