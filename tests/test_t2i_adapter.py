"""T2I-Adapter: our UNet hook against diffusers' own adapter pipelines, same components, same seed.

The oracle is ``StableDiffusion[XL]AdapterPipeline`` (and ``MultiAdapter``) built from the tiny base's
components and a ``T2IAdapter.from_pretrained`` of the same folder; the latents must be identical, bit
for bit. TencentARC's original layout is written here from a diffusers adapter by inverting the key
mapping (the flat ``body.{k}`` list), independently of the plugin.

Composition: several adapters SUM, ``sum_i w_i F_i``, which is ``MultiAdapter`` with
``adapter_conditioning_scale=[w_1, ...]``; ``MultiAdapter``'s default weights average, so ``1/N`` each
here reproduces that default.
"""
from __future__ import annotations

import copy
import inspect
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


def image(seed: int, size: int = SIZE, mode: str = "RGB"):
    from PIL import Image

    picture = Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))
    return picture.convert(mode)


def latents(pipe, steps: int = 2, seed: int = 0, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


def diffusers_pipeline(cls, pipe, **extra):
    accepted = inspect.signature(cls.__init__).parameters
    made = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, **extra)
    made.set_progress_bar_config(disable=True)
    return made


def plugin(name: str = "t2i_adapter"):
    from adapterhub.plugins import adapter_type

    return adapter_type(name)


@pytest.fixture(scope="module")
def folders(sd1, sdxl, tmp_path_factory):
    """Example adapters (diffusers folders): two for tiny-sd1, one for tiny-sdxl, one ControlNet."""
    root = tmp_path_factory.mktemp("t2i")
    return {"a": plugin().example(sd1, root / "t2i_a", seed=1), "b": plugin().example(sd1, root / "t2i_b", seed=2),
            "xl": plugin().example(sdxl, root / "t2i_xl", seed=3),
            "cn": plugin("controlnet").example(sd1, root / "cn", seed=4)}


def reference_model(folder):
    from diffusers import T2IAdapter

    return T2IAdapter.from_pretrained(str(folder), local_files_only=True).eval()


def light_adapter(seed: int = 5):
    """A diffusers light adapter whose four feature maps fit tiny-sd1 (32@1/8, 64@1/16, 64@1/32 + mid)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, adapter_type="light_adapter").eval()


# --------------------------------------------------------------------------------------------
# TencentARC's original layout, spelled out independently of the plugin: diffusers -> original
# --------------------------------------------------------------------------------------------
def tencentarc_name(key: str, res_blocks: int, light: bool) -> str:
    if light:
        if m := re.fullmatch(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"body.{m[1]}.body.{m[2]}.{m[3]}"
        return key.removeprefix("adapter.")
    if m := re.fullmatch(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"body.{int(m[1]) * res_blocks + int(m[2])}.{m[3]}"
    if m := re.fullmatch(r"adapter\.body\.(\d+)\.in_conv\.(.+)", key):
        return f"body.{int(m[1]) * res_blocks}.in_conv.{m[2]}"
    return key.removeprefix("adapter.")


def write_tencentarc(model, path, extra: dict | None = None):
    light = model.config.adapter_type == "light_adapter"
    state = {tencentarc_name(k, model.config.num_res_blocks, light): v for k, v in model.state_dict().items()}
    state.update(extra or {})
    torch.save(state, path)
    return state


# --------------------------------------------------------------------------------------------
# inspect and conversion
# --------------------------------------------------------------------------------------------
def test_inspect_diffusers_folders(folders):
    facts = adapterhub.inspect(folders["a"], with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("t2i_adapter", "diffusers", "tiny-sd1")
    assert facts["conditioning_channels"] == 3 and facts["variant"] == "full_adapter" and facts["targets"] == 0
    assert facts["channels"] == [32, 64, 64] and facts["feature_maps"] == 3
    xl = adapterhub.inspect(folders["xl"], with_hash=False)
    assert (xl["base"], xl["variant"], xl["downscale_factor"], xl["feature_maps"]) == (
        "tiny-sdxl", "full_adapter_xl", 16, 4)


@pytest.mark.parametrize("kind", ["full", "light", "gray"])
def test_tencentarc_pth_converts_exactly(folders, tmp_path, kind):
    from diffusers import T2IAdapter

    if kind == "full":
        model = reference_model(folders["a"])
    elif kind == "light":
        model = light_adapter()
    else:  # a sketch adapter: one input channel
        torch.manual_seed(6)
        model = T2IAdapter(in_channels=1, channels=[32, 64, 64], num_res_blocks=3).eval()
    path = tmp_path / f"t2iadapter_{kind}_sd14v1.pth"
    write_tencentarc(model, path)
    facts = adapterhub.inspect(path, with_hash=False)
    assert (facts["type"], facts["format"], facts["base"]) == ("t2i_adapter", "tencentarc", "tiny-sd1")
    assert facts["variant"] == model.config.adapter_type
    assert facts["conditioning_channels"] == model.config.in_channels
    assert facts["num_res_blocks"] == model.config.num_res_blocks
    from adapterhub_plugins.t2i_adapter.formats import load_model

    loaded = load_model(adapterhub.load(path)).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_save_writes_a_diffusers_folder(tmp_path):
    model = light_adapter()
    write_tencentarc(model, tmp_path / "color.pth")
    saved = adapterhub.load(tmp_path / "color.pth").save(tmp_path / "color")
    facts = adapterhub.inspect(saved, with_hash=False)
    assert (facts["format"], facts["variant"], facts["base"]) == ("diffusers", "light_adapter", "tiny-sd1")
    again = reference_model(saved).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# the oracle: diffusers' adapter pipelines
# --------------------------------------------------------------------------------------------
def test_one_adapter_equals_the_adapter_pipeline(sd1, folders):
    from diffusers import StableDiffusionAdapterPipeline

    base = latents(sd1, steps=1)
    oracle = latents(diffusers_pipeline(StableDiffusionAdapterPipeline, sd1, adapter=reference_model(folders["a"])),
                     image=image(0), adapter_conditioning_scale=0.7)
    adapter = adapterhub.load(folders["a"])
    with adapter.attach(sd1, 0.7, image=image(0)):
        ours = latents(sd1)
        assert not torch.equal(latents(sd1, steps=1), base)
    assert torch.equal(ours, oracle)
    assert torch.equal(latents(sd1, steps=1), base)  # detached: exactly the base again


@pytest.mark.parametrize("weights", [(0.8, 0.5), (0.5, 0.5)], ids=["weighted", "multiadapter-default-average"])
def test_two_adapters_sum_like_multiadapter(sd1, folders, weights):
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline

    multi = MultiAdapter([reference_model(folders["a"]), reference_model(folders["b"])])
    if weights == (0.5, 0.5):  # MultiAdapter's own default (adapter_weights=None) is this average
        xs = [torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        assert all(torch.equal(x, y) for x, y in zip(multi(xs), multi(xs, [0.5, 0.5])))
    oracle = latents(diffusers_pipeline(StableDiffusionAdapterPipeline, sd1, adapter=multi),
                     image=[image(0), image(1)], adapter_conditioning_scale=list(weights))
    a, b = adapterhub.load(folders["a"]), adapterhub.load(folders["b"])
    with a.attach(sd1, weights[0], image=image(0)), b.attach(sd1, weights[1], image=image(1)):
        assert torch.equal(latents(sd1), oracle)


def test_sdxl_adapter_end_is_the_conditioning_factor(sdxl, folders):
    from diffusers import StableDiffusionXLAdapterPipeline

    oracle = latents(diffusers_pipeline(StableDiffusionXLAdapterPipeline, sdxl, adapter=reference_model(folders["xl"])),
                     image=image(3), adapter_conditioning_scale=0.9, adapter_conditioning_factor=0.5)
    adapter = adapterhub.load(folders["xl"])
    with adapter.attach(sdxl, 0.9, image=image(3), end=0.5) as handle:
        assert torch.equal(latents(sdxl, ), oracle)
        handle.set_guidance(0.0, 1.0)
        assert not torch.equal(latents(sdxl, ), oracle)


def test_light_adapter_equals_the_pipeline(sd1):
    from diffusers import StableDiffusionAdapterPipeline

    model = light_adapter()
    oracle = latents(diffusers_pipeline(StableDiffusionAdapterPipeline, sd1, adapter=model), image=image(2),
                     adapter_conditioning_scale=0.6)
    from adapterhub.io import open_adapter_file  # via a loose safetensors in diffusers layout (no config)
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "light.safetensors"
        save_file(model.state_dict(), str(path))
        assert open_adapter_file(path).config is None
        adapter = adapterhub.load(path)
        assert adapter.extra["config"]["adapter_type"] == "light_adapter"
        with adapter.attach(sd1, 0.6, image=image(2)):
            assert torch.equal(latents(sd1), oracle)


def test_controlnet_and_adapter_compose(sd1, folders):
    """Both kinds at once: our T2I-Adapter on diffusers' ControlNet pipeline equals both of ours on the
    plain pipeline (and our ControlNet on diffusers' adapter pipeline)."""
    from diffusers import ControlNetModel, StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline

    t2i, cn = adapterhub.load(folders["a"]), adapterhub.load(folders["cn"])
    cn_pipe = diffusers_pipeline(StableDiffusionControlNetPipeline, sd1,
                                 controlnet=ControlNetModel.from_pretrained(str(folders["cn"])).eval())
    with t2i.attach(sd1, 0.7, image=image(0)):
        oracle = latents(cn_pipe, image=image(1), controlnet_conditioning_scale=0.9)
    ad_pipe = diffusers_pipeline(StableDiffusionAdapterPipeline, sd1, adapter=reference_model(folders["a"]))
    with cn.attach(sd1, 0.9, image=image(1)):
        other = latents(ad_pipe, image=image(0), adapter_conditioning_scale=0.7)
    with t2i.attach(sd1, 0.7, image=image(0)), cn.attach(sd1, 0.9, image=image(1)):
        ours = latents(sd1)
    assert torch.equal(ours, oracle) and torch.equal(ours, other)


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file, the pipeline untouched
# --------------------------------------------------------------------------------------------
def test_bad_input_leaves_the_pipeline_untouched(sd1, folders, tmp_path):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    xl = adapterhub.load(folders["xl"])
    with pytest.raises(AdapterError) as err:
        xl.attach(sd1, 1.0, image=image(0))
    message = str(err.value)
    assert str(folders["xl"]) in message and "tiny-sdxl" in message and "tiny-sd1" in message and "\n" not in message
    a = adapterhub.load(folders["a"])
    for options, words in [({}, "conditioning image"), ({"image": 42}, "conditioning image"),
                           ({"image": image(0, mode="L")}, "1 channels"),
                           ({"image": image(0), "start": 1.0}, "start"),
                           ({"image": image(0), "guess_mode": True}, "unknown T2I-Adapter option")]:
        with pytest.raises(AdapterError, match=words) as err:
            a.attach(sd1, 1.0, **options)
        assert str(folders["a"]) in str(err.value)
    with pytest.raises(AdapterError, match="cannot be merged"):
        a.merge_into(sd1, 1.0)
    assert not sd1.unet._forward_pre_hooks
    after = sd1.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unknown_key_in_an_original_file_is_named(folders, tmp_path, capsys):
    path = tmp_path / "odd.pth"
    write_tencentarc(reference_model(folders["a"]), path, {"body.0.skep.weight": torch.zeros(32, 32, 3, 3)})
    with pytest.raises(AdapterError, match="not understood") as err:
        adapterhub.load(path)
    assert err.value.key == "body.0.skep.weight"
    from adapterhub.cli import main

    assert main(["inspect", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "body.0.skep.weight" in lines[0]
