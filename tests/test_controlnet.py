"""ControlNet: our UNet hook against diffusers' own ControlNet pipelines, same components, same seed.

The oracle is ``StableDiffusion[XL]ControlNetPipeline`` / ``MultiControlNetModel`` built from the tiny
base's components and a ``ControlNetModel.from_pretrained`` of the same folder; the latents must be
identical, bit for bit. Original (lllyasviel) checkpoints are written here from a diffusers model by
inverting the key mapping, so the conversion is checked against an independent spelling of it.
"""
from __future__ import annotations

import copy
import inspect
import json
import re

import numpy as np
import pytest
import torch

import adapterhub
from adapterhub.errors import AdapterError

PROMPT = "a lighthouse on a cliff"
SIZE = 128  # 16x16 latents: every step is cheap, every block still sees a 2x2 map or larger


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    """A module-private copy of the tiny SD1 base (hooks come and go on it)."""
    return copy.deepcopy(tiny_sd1)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return copy.deepcopy(tiny_sdxl)


@pytest.fixture(autouse=True)
def no_hooks_left(request):
    """Every test leaves the UNets as it found them: no forward pre-hook survives a test."""
    yield
    for name in ("sd1", "sdxl"):
        if name in request.fixturenames:
            unet = request.getfixturevalue(name).unet
            left = dict(unet._forward_pre_hooks)
            unet._forward_pre_hooks.clear()
            assert not left, f"{name}: a hook was left attached"


def image(seed: int, size: int = SIZE):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def latents(pipe, steps: int = 2, seed: int = 0, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


def diffusers_pipeline(cls, pipe, **extra):
    accepted = inspect.signature(cls.__init__).parameters
    made = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, **extra)
    made.set_progress_bar_config(disable=True)
    return made


def controlnet_type():
    from adapterhub.plugins import adapter_type

    return adapter_type("controlnet")


@pytest.fixture(scope="module")
def folders(sd1, sdxl, tmp_path_factory):
    """Example ControlNets (diffusers folders): two for tiny-sd1, one for tiny-sdxl."""
    root = tmp_path_factory.mktemp("controlnets")
    plugin = controlnet_type()
    return {"a": plugin.example(sd1, root / "cn_a", seed=1), "b": plugin.example(sd1, root / "cn_b", seed=2),
            "xl": plugin.example(sdxl, root / "cn_xl", seed=3)}


def reference_model(folder):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(str(folder), local_files_only=True).eval()


# --------------------------------------------------------------------------------------------
# original (lllyasviel) layout, spelled out independently of the plugin: diffusers -> ldm names
# --------------------------------------------------------------------------------------------
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
          "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        rest = rest.replace(new, old)
    return rest


def ldm_name(key: str, layers: int) -> str:
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (layers + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    module, param = key.rsplit(".", 1)
    return f"{_FIXED[module]}.{param}"


def write_original(folder, path, prefix: str = "control_model.", extra: dict | None = None):
    """The folder's ControlNet as an original single-file checkpoint (.safetensors or .pth)."""
    model = reference_model(folder)
    state = {f"{prefix}{ldm_name(k, model.config.layers_per_block)}": v.contiguous()
             for k, v in model.state_dict().items()}
    state.update(extra or {})
    if path.suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    return model


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------
def test_inspect_diffusers_folders(folders):
    facts = adapterhub.inspect(folders["a"], with_hash=False)
    assert facts["type"] == "controlnet" and facts["format"] == "diffusers"
    assert facts["base"] == "tiny-sd1" and facts["conditioning_channels"] == 3
    assert facts["variant"] == "standard" and facts["down_residuals"] == 9 and facts["targets"] == 0
    xl = adapterhub.inspect(folders["xl"], with_hash=False)
    assert (xl["base"], xl["variant"], xl["cross_attention_dim"]) == ("tiny-sdxl", "xl-large", 96)


def test_inspect_names_the_control_from_the_config(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["a"], tmp_path / "canny")
    config = json.loads((folder / "config.json").read_text())
    config.update(_name_or_path="lllyasviel/control_v11p_sd15_canny", conditioning_channels=3,
                  global_pool_conditions=True)
    (folder / "config.json").write_text(json.dumps(config))
    facts = adapterhub.inspect(folder, with_hash=False)
    assert facts["control"] == "canny" and facts["global_pool_conditions"] is True


@pytest.mark.parametrize("suffix,prefix", [(".safetensors", "control_model."), (".pth", "control_model."),
                                           (".safetensors", "")])
def test_original_checkpoints_convert_exactly(folders, tmp_path, suffix, prefix):
    path = tmp_path / f"control_sd15_tiny{suffix}"
    # a v1.0 file bundles the whole SD model beside the ControlNet: only control_model.* is read
    bundled = {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)} if prefix else {}
    model = write_original(folders["a"], path, prefix, bundled)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("controlnet", "ldm", "tiny-sd1")
    assert facts["conditioning_channels"] == 3 and facts["variant"] == "standard"
    adapter = adapterhub.load(path)
    from adapterhub_plugins.controlnet.formats import load_model

    loaded = load_model(adapter).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert adapter.extra["config"]["conditioning_embedding_out_channels"] == list(
        model.config.conditioning_embedding_out_channels)


def test_original_sdxl_checkpoint_keeps_its_added_conditioning(folders, tmp_path):
    path = tmp_path / "control_xl.safetensors"
    model = write_original(folders["xl"], path)
    adapter = adapterhub.load(path)
    assert (adapter.format, adapter.base) == ("ldm", "tiny-sdxl")
    from adapterhub_plugins.controlnet.formats import load_model

    loaded = load_model(adapter)
    assert torch.equal(loaded.add_embedding.linear_1.weight, model.add_embedding.linear_1.weight)


def test_save_writes_a_diffusers_folder(folders, tmp_path):
    path = tmp_path / "orig.safetensors"
    model = write_original(folders["a"], path)
    saved = adapterhub.load(path).save(tmp_path / "converted")
    facts = adapterhub.inspect(saved, with_hash=False)
    assert (facts["format"], facts["base"]) == ("diffusers", "tiny-sd1")
    again = reference_model(saved).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# the oracle: diffusers' ControlNet pipelines
# --------------------------------------------------------------------------------------------
def test_one_controlnet_equals_the_controlnet_pipeline(sd1, folders):
    from diffusers import StableDiffusionControlNetPipeline

    base = latents(sd1)
    cn_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, sd1, controlnet=reference_model(folders["a"]))
    oracle = latents(cn_pipe, image=image(0), controlnet_conditioning_scale=0.8)
    adapter = adapterhub.load(folders["a"])
    with adapter.attach(sd1, 0.8, image=image(0)) as handle:
        ours = latents(sd1)
        handle.set_weight(0.0)  # weight 0 adds nothing: the base, bit for bit
        assert torch.equal(latents(sd1), base)
    assert torch.equal(ours, oracle)
    assert (ours - base).abs().max() > 1e-3  # the control does act
    assert torch.equal(latents(sd1), base)  # detached: exactly the base again


def test_guidance_start_end_gate_steps_like_the_pipeline(sd1, folders):
    from diffusers import StableDiffusionControlNetPipeline

    cn_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, sd1, controlnet=reference_model(folders["a"]))
    oracle = latents(cn_pipe, steps=3, image=image(0, size=200), controlnet_conditioning_scale=1.2,
                     control_guidance_start=0.3, control_guidance_end=0.7)  # the middle step of three only
    adapter = adapterhub.load(folders["a"])
    with adapter.attach(sd1, 1.2, image=image(0, size=200), start=0.3, end=0.7) as handle:
        gated = latents(sd1, steps=3)
        handle.set_guidance(0.0, 1.0)
        full = latents(sd1, steps=3)
    assert torch.equal(gated, oracle)
    assert not torch.equal(gated, full) and not torch.equal(gated, latents(sd1, steps=3))


def test_two_controlnets_sum_like_multicontrolnet(sd1, folders):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    multi = MultiControlNetModel([reference_model(folders["a"]), reference_model(folders["b"])])
    oracle = latents(diffusers_pipeline(StableDiffusionControlNetPipeline, sd1, controlnet=multi),
                     image=[image(0), image(1)], controlnet_conditioning_scale=[0.8, 0.5],
                     control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 1.0])
    a, b = adapterhub.load(folders["a"]), adapterhub.load(folders["b"])
    with a.attach(sd1, 0.8, image=image(0)), b.attach(sd1, 0.5, image=image(1), start=0.3):
        ours = latents(sd1)
    assert torch.equal(ours, oracle)


def test_guess_mode_runs_on_the_conditional_half(sd1, folders):
    from diffusers import StableDiffusionControlNetPipeline

    cn_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, sd1, controlnet=reference_model(folders["b"]))
    oracle = latents(cn_pipe, image=image(2), controlnet_conditioning_scale=0.9, guess_mode=True)
    adapter = adapterhub.load(folders["b"])
    with adapter.attach(sd1, 0.9, image=image(2), guess_mode=True):
        assert torch.equal(latents(sd1), oracle)


def test_sdxl_controlnet_equals_the_xl_pipeline(sdxl, folders):
    from diffusers import StableDiffusionXLControlNetPipeline

    cn_pipe = diffusers_pipeline(StableDiffusionXLControlNetPipeline, sdxl, controlnet=reference_model(folders["xl"]))
    oracle = latents(cn_pipe, image=image(3), controlnet_conditioning_scale=0.7, control_guidance_end=0.5)
    adapter = adapterhub.load(folders["xl"])
    with adapter.attach(sdxl, 0.7, image=image(3), end=0.5):
        assert torch.equal(latents(sdxl, ), oracle)


def test_tensor_images_and_one_image_per_prompt(sd1, folders):
    from diffusers import StableDiffusionControlNetPipeline

    tensor = torch.from_numpy(np.asarray(image(4), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    cn_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, sd1, controlnet=reference_model(folders["a"]))
    with torch.no_grad():
        oracle = cn_pipe([PROMPT, "a boat"], image=[image(4), image(5)], num_inference_steps=1, height=SIZE,
                         width=SIZE, generator=torch.Generator().manual_seed(0), output_type="latent").images
    adapter = adapterhub.load(folders["a"])
    with adapter.attach(sd1, 1.0, image=[image(4), image(5)]):
        with torch.no_grad():
            ours = sd1([PROMPT, "a boat"], num_inference_steps=1, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(ours, oracle)
    oracle = latents(cn_pipe, image=tensor)
    with adapter.attach(sd1, 1.0, image=tensor):
        assert torch.equal(latents(sd1), oracle)


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file, the pipeline untouched
# --------------------------------------------------------------------------------------------
def _untouched(pipe, before: dict) -> None:
    assert not pipe.unet._forward_pre_hooks
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_input_leaves_the_pipeline_untouched(sd1, folders, tmp_path):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    xl = adapterhub.load(folders["xl"])
    with pytest.raises(AdapterError) as err:
        xl.attach(sd1, 1.0, image=image(0))
    message = str(err.value)
    assert str(folders["xl"]) in message and "tiny-sdxl" in message and "tiny-sd1" in message and "\n" not in message
    a = adapterhub.load(folders["a"])
    for options, words in [({}, "conditioning image"), ({"image": "not an image"}, "conditioning image"),
                           ({"image": image(0), "start": 0.6, "end": 0.4}, "start"),
                           ({"image": image(0), "strength": 2}, "unknown ControlNet option"),
                           ({"image": torch.rand(1, 1, SIZE, SIZE)}, "channels")]:
        with pytest.raises(AdapterError, match=words) as err:
            a.attach(sd1, 1.0, **options)
        assert str(folders["a"]) in str(err.value)
    with pytest.raises(AdapterError, match="cannot be merged"):
        a.merge_into(sd1, 1.0)
    _untouched(sd1, before)


def test_broken_original_checkpoint_names_the_key(folders, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken.safetensors"
    write_original(folders["a"], path)
    state = load_file(str(path))
    del state["control_model.zero_convs.4.0.weight"]
    save_file(state, str(path))
    with pytest.raises(AdapterError, match="missing tensor controlnet_down_blocks.4.weight"):
        adapterhub.load(path)  # named as diffusers names it: the file cannot name what it lacks
    state["control_model.zero_convs.4.0.weight"] = torch.zeros(32, 64, 1, 1)  # the wrong width
    save_file(state, str(path))
    from adapterhub.cli import main

    assert main(["inspect", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "key control_model.zero_convs.4.0.weight" in lines[0]
