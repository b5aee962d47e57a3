"""Inpainting models (a UNet of 9 input channels: latents, mask, masked image's latents, as sd-v1-5-inpainting).

The oracle is diffusers' ``StableDiffusionInpaintPipeline`` with that UNet: every call takes the mask (downsampled
nearest) and the masked image's latents after the scaled latents, and no step blends the unmasked latents back. Its
masked image is computed here the way the pipeline does (``image x (mask < 0.5)``, preprocessed by its image
processor) and handed to it as latents (its own encode would sample the VAE posterior with the image's generator).
Without a mask (txt2img, img2img) the model gets the webui's conditioning: an all-ones mask and a mid-grey image.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from inpaint_helpers import SIZE, init_image  # noqa: F401 (init_image: a fixture)
from inpaint_helpers import embeds as _embeds, mask as _mask, request as _request


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_sd1):
    """``tiny-sd1`` with a UNet of 9 input channels (the same config otherwise, seeded weights)."""
    from diffusers import UNet2DConditionModel

    from adapterhub.base import TINY_UNET_SD1

    torch.manual_seed(19)
    unet = UNet2DConditionModel(**{**TINY_UNET_SD1, "in_channels": 9}).eval()
    components = {**tiny_sd1.components, "unet": unet}
    pipe = type(tiny_sd1)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen(inpaint_pipe):
    from adapterhub.sample.generator import Generator

    return Generator(inpaint_pipe, model_name="tiny-sd1-inpainting", model_hash="0123456789")


def _pipeline_masked_latents(pipe, image, mask):
    """The masked image's latents as diffusers' inpainting pipeline computes them (its preprocessing and binarised
    mask), the VAE posterior's mean."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE).float()
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    condition = masks.preprocess(mask, height=SIZE, width=SIZE)
    with torch.no_grad():
        z = pipe.vae.encode(pixels * (condition < 0.5)).latent_dist.mean
    return z * pipe.vae.config.scaling_factor


def _diffusers(pipe, sampler, image_latents, mask_image, masked_latents, steps, strength, seeds):
    from diffusers import StableDiffusionInpaintPipeline

    from adapterhub.sample.samplers import make_scheduler, resolve_sampler

    components = {**pipe.components, "scheduler": make_scheduler(*resolve_sampler(sampler), pipe.scheduler.config)}
    inpaint = StableDiffusionInpaintPipeline(**components)
    inpaint.set_progress_bar_config(disable=True)
    batch = len(seeds)
    return inpaint(image=image_latents, mask_image=mask_image, masked_image_latents=masked_latents,
                   prompt_embeds=_embeds(pipe, "a red house").repeat(batch, 1, 1),
                   negative_prompt_embeds=_embeds(pipe, "blurry").repeat(batch, 1, 1), height=SIZE, width=SIZE,
                   num_inference_steps=steps, strength=strength, guidance_scale=7.0,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_masked_img2img_on_an_inpainting_model_equals_diffusers(gen, init_image, sampler):
    request = _request(mask=_mask(), init_image=init_image, sampler=sampler, batch=2)
    result = gen.generate(request, output="latent")
    latents = gen.encode_image(init_image)
    masked = _pipeline_masked_latents(gen.pipe, init_image, _mask())
    # our 0.5 runs int(0.5 x 4) + 1 = 3 steps (the webui's); diffusers' strength 3/4 runs the same 3
    want = _diffusers(gen.pipe, sampler, latents, _mask(), masked, 4, 3 / 4, [11, 12])
    assert result.latents.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0)
    # no blend: outside the mask the latents are the model's, not the init latents
    assert not torch.allclose(result.latents[:, :, 0], latents.expand_as(result.latents)[:, :, 0])


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_txt2img_on_an_inpainting_model_gets_an_all_ones_mask_and_a_grey_image(gen, sampler):
    from PIL import Image

    result = gen.generate(_request(sampler=sampler, batch=2), output="latent")
    white = Image.new("L", (SIZE, SIZE), 255)
    want = _diffusers(gen.pipe, sampler, torch.zeros(1, 4, 8, 8), white, _grey(gen.pipe), 4, 1.0, [11, 12])
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0)


def _grey(pipe):
    """The latents of a mid-grey image (zeros in [-1, 1]): the pipeline's masked image under an all-white mask."""
    with torch.no_grad():
        return pipe.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mean * pipe.vae.config.scaling_factor


def test_img2img_without_a_mask_gets_the_txt2img_conditioning(gen, init_image):
    from PIL import Image

    result = gen.generate(_request(init_image=init_image, sampler="DDIM", batch=1), output="latent")
    latents = gen.encode_image(init_image)
    white = Image.new("L", (SIZE, SIZE), 255)
    # the webui's image x (1 - all-ones mask): the pipeline with an all-white mask, its masked image all zeros
    want = _diffusers(gen.pipe, "DDIM", latents, white, _grey(gen.pipe), 4, 3 / 4, [11])
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0)


def test_the_final_image_of_an_inpainting_model_keeps_the_original_outside_the_mask(gen, init_image):
    result = gen.generate(_request(mask=_mask(), init_image=init_image, mask_blur=0))
    got = np.asarray(result.images[0].convert("RGB"), dtype=int)
    original = np.asarray(init_image, dtype=int)
    outside = np.ones((SIZE, SIZE), bool)
    outside[16:56, 8:40] = False
    assert np.array_equal(got[outside], original[outside])
    assert not np.array_equal(got[~outside], original[~outside])


def test_the_hires_fix_on_an_inpainting_model_runs_at_the_hires_size(gen):
    result = gen.generate(_request(steps=2, hr_scale=1.5, hr_denoise=0.5), output="latent")
    assert result.latents.shape == (1, 4, 12, 12)


def test_the_compiled_backend_runs_an_inpainting_model_as_eager_does(inpaint_pipe, gen, init_image, monkeypatch):
    import torch._dynamo

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")  # inductor's capture without its code generation
    compiled = Generator(copy.deepcopy(inpaint_pipe), backend="compiled", hash_model=False)
    try:
        request = _request(mask=_mask(), init_image=init_image, sampler="DDIM", steps=2, denoising_strength=1.0)
        got = compiled.generate(request, output="latent").latents
    finally:
        compiled.close()
        torch._dynamo.reset()
    want = gen.generate(request, output="latent").latents
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_normal_models_controlnet_on_an_inpainting_model_is_refused_in_one_line(gen, tiny_sd1, init_image,
                                                                                    tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError
    from adapterhub.plugins import adapter_type

    folder = adapter_type("controlnet").example(tiny_sd1, tmp_path / "cn", seed=1)  # 4 input channels
    with pytest.raises(AdapterError, match=r"cn: .* latent channels 4 here, 9 in the UNet") as refused:
        adapterhub.load(folder).attach(gen.pipe, 0.8, image=init_image)
    assert "\n" not in str(refused.value)
    assert not gen.pipe.unet._forward_pre_hooks  # nothing attached: the model samples as before


@pytest.mark.parametrize("masked", [True, False])
def test_the_inpainting_mask_weight_hides_part_of_the_masked_image(gen, init_image, masked):
    from PIL import Image

    mask = _mask() if masked else Image.new("L", (SIZE, SIZE), 255)
    request = _request(mask=_mask() if masked else None, init_image=init_image, sampler="DDIM",
                       inpainting_mask_weight=0.25)
    result = gen.generate(request, output="latent")
    # the webui's lerp(image, image x (1 - mask), weight) = image x (1 - weight x mask), handed to the pipeline
    pixels = gen.pipe.image_processor.preprocess(init_image, height=SIZE, width=SIZE).float()
    hidden = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    with torch.no_grad():
        masked_latents = gen.pipe.vae.encode(pixels * (1 - 0.25 * hidden)).latent_dist.mean
    want = _diffusers(gen.pipe, "DDIM", gen.encode_image(init_image), mask,
                      masked_latents * gen.pipe.vae.config.scaling_factor, 4, 3 / 4, [11])
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0)
    full = gen.generate(_request(mask=_mask() if masked else None, init_image=init_image, sampler="DDIM"),
                        output="latent")
    assert not torch.allclose(result.latents, full.latents)


def test_a_bad_inpainting_mask_weight_is_one_line():
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.request import normalized

    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(AdapterhubError, match=r"^inpainting mask weight .*: must be a number from 0 to 1$"):
            normalized(_request(inpainting_mask_weight=bad), 64)


def test_a_single_file_inpainting_checkpoint_loads_with_its_9_channels(inpaint_pipe, tmp_path, init_image):
    from adapterhub.base import load_base
    from adapterhub.checkpoint import save_pipeline

    path = save_pipeline(inpaint_pipe, tmp_path / "tiny-inpainting.safetensors")  # the ldm layout
    loaded = load_base(str(path))
    assert loaded.unet.config.in_channels == 9
    want = inpaint_pipe.unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.unet.state_dict().items())


def test_the_infotext_records_the_conditional_mask_weight_as_the_webui(gen, tiny_sd1, init_image):
    from adapterhub.sample.generator import Generator

    masked = gen.generate(_request(mask=_mask(), init_image=init_image, steps=1, inpainting_mask_weight=0.25),
                          output="latent").infotexts[0]
    assert "Denoising strength: 0.5, Conditional mask weight: 0.25," in masked
    txt2img = gen.generate(_request(steps=1), output="latent").infotexts[0]
    assert "Size: 64x64, Model hash: 0123456789, Model: tiny-sd1-inpainting, Conditional mask weight: 1.0" in txt2img
    normal = Generator(tiny_sd1, model_name="tiny-sd1", model_hash="0123456789")
    assert "Conditional mask weight" not in normal.generate(_request(mask=_mask(), init_image=init_image, steps=1),
                                                            output="latent").infotexts[0]


def test_an_sdxl_inpainting_model_equals_diffusers_xl_inpaint_pipeline(tiny_sdxl, init_image):
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from adapterhub.base import TINY_UNET_SDXL
    from adapterhub.sample.generator import Generator
    from adapterhub.sample.samplers import make_scheduler, resolve_sampler

    torch.manual_seed(23)
    unet = UNet2DConditionModel(**{**TINY_UNET_SDXL, "in_channels": 9}).eval()
    pipe = type(tiny_sdxl)(**{**tiny_sdxl.components, "unet": unet})
    gen = Generator(pipe, model_name="tiny-sdxl-inpainting", hash_model=False)
    result = gen.generate(_request(mask=_mask(), init_image=init_image, sampler="DPM++ 2M"), output="latent")
    cond, uncond = gen.encode("a red house", "blurry")
    components = {**pipe.components, "scheduler": make_scheduler(*resolve_sampler("DPM++ 2M"), pipe.scheduler.config)}
    inpaint = StableDiffusionXLInpaintPipeline(**{k: v for k, v in components.items()
                                                   if k not in ("image_encoder", "feature_extractor")})
    inpaint.set_progress_bar_config(disable=True)
    want = inpaint(image=gen.encode_image(init_image), mask_image=_mask(),
                   masked_image_latents=_pipeline_masked_latents(pipe, init_image, _mask()),
                   prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds,
                   pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled,
                   height=SIZE, width=SIZE, num_inference_steps=4, strength=3 / 4, guidance_scale=7.0,
                   generator=[torch.Generator().manual_seed(11)], output_type="latent").images
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0)
