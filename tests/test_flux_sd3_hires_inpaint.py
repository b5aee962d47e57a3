"""The hires fix and inpainting on Flux and SD3 (#21), against diffusers' own pipelines built from the same tiny
components (fp32 CPU).

Hires fix: the first pass is our txt2img pass (tested against FluxPipeline / StableDiffusion3Pipeline elsewhere);
its latents, upscaled here test-side (torch's interpolation, or the VAE's decode, 8 bits, PIL and the img2img
pipelines' own encoding), are handed to FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline with the webui's
fixed step count (``hr_steps`` steps of an ``int(hr_steps / d)``-step schedule) and fresh noise from the same
seeds: the final latents must be equal bit for bit.

Inpainting: FluxInpaintPipeline / StableDiffusion3InpaintPipeline given the init image's latents, the latent mask
(as a mask image it reads back exactly) and the strength that runs the webui's step count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_helpers import flow_generator as _generator, quiet_pipe
from flux_helpers import cli as _cli

SIZE, STEPS = 64, 3
SMALL = 32  # SD3 at 32 px: the tiny SD3 embeds positions up to 64 px, where its hires passes land
HR_STEPS, HR_DENOISE = 3, 0.6  # the webui's hires pass: 3 steps of an int(3 / 0.6) = 5-step schedule
HR_LENGTH = 5


def _request(prompt, size=SIZE, **kwargs):
    from adapterhub.sample import FlowRequest

    return FlowRequest(prompt, **{"steps": STEPS, "width": size, "height": size, **kwargs})


def _family(pipe) -> str:
    return "Flux" if type(pipe).__name__.startswith("Flux") else "StableDiffusion3"


def _pipeline(pipe, kind):
    import diffusers

    other = getattr(diffusers, f"{_family(pipe)}{kind}Pipeline")(**pipe.components)
    other.set_progress_bar_config(disable=True)
    return other


def _unpacked(pipe, latents, size):
    if _family(pipe) == "Flux":
        return pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    return latents


def _image_latents(pipe, image):
    """An image as the img2img pipelines encode it, with the posterior's mean (diffusers' ``argmax``)."""
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    with torch.no_grad():
        z = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def _img2img_oracle(pipe, latents, prompt, seeds, size, **kwargs):
    """The img2img pipeline from ``latents`` at ``size``: HR_STEPS of a HR_LENGTH-step schedule (strength 3 / 5)."""
    out = _pipeline(pipe, "Img2Img")(prompt, image=latents, height=size, width=size, strength=HR_STEPS / HR_LENGTH,
                                     num_inference_steps=HR_LENGTH, num_images_per_prompt=len(seeds),
                                     generator=[torch.Generator().manual_seed(s) for s in seeds],
                                     output_type="latent", **kwargs).images
    return _unpacked(pipe, out, size)


def _eight_bit(pipe, latents):
    """Latents decoded as the webui makes its 8-bit images (clamped, times 255, truncated), test-side."""
    from PIL import Image

    vae = pipe.vae
    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    x = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)
    return [Image.fromarray((255.0 * np.moveaxis(i.numpy(), 0, 2)).astype(np.uint8)) for i in x]


# -- the hires fix ------------------------------------------------------------------------------------------------
def test_flux_hires_latent_equals_txt2img_then_the_img2img_pipeline(tiny_flux):
    gen = _generator(tiny_flux)
    first = gen.generate(gen.request(_request("a red cat", seed=5, batch=2, cfg=1.0)), output="latent").latents
    result = gen.generate(gen.request(_request("a red cat", seed=5, batch=2, cfg=1.0, hr_scale=2.0,
                                               hr_steps=HR_STEPS, hr_denoise=HR_DENOISE)), output="latent")
    upscaled = torch.nn.functional.interpolate(first, scale_factor=2, mode="bilinear")
    theirs = _img2img_oracle(tiny_flux, upscaled, "a red cat", [5, 6], 2 * SIZE, guidance_scale=3.5)
    assert result.latents.shape == (2, 4, 64, 64) and torch.equal(result.latents, theirs)  # tiny VAE: 2 px
    text = result.infotexts[0]
    assert "Size: 64x64, Model: tiny, Denoising strength: 0.6, Hires upscale: 2, Hires steps: 3, " \
           "Hires upscaler: Latent, " in text
    assert "Seed: 6" in result.infotexts[1]


def test_sd3_hires_with_an_image_upscaler_equals_the_img2img_pipeline(adapterhub_cache):
    """On a VAE with SD3's own shift and scale (the tiny one has 0 and 1), so that both are undone and redone."""
    from PIL import Image

    from adapterhub.base import load_base

    tiny_sd3 = quiet_pipe(load_base("tiny-sd3"))
    tiny_sd3.vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    gen = _generator(tiny_sd3)
    common = {"seed": 7, "cfg": 5.0, "negative": "fog", "size": SMALL}
    first = gen.generate(gen.request(_request("a castle", **common)), output="latent").latents
    result = gen.generate(gen.request(_request("a castle", hr_scale=2.0, hr_steps=HR_STEPS, hr_denoise=HR_DENOISE,
                                               hr_upscaler="lanczos", **common)), output="latent")
    big = _eight_bit(tiny_sd3, first)[0].resize((2 * SMALL, 2 * SMALL), resample=Image.Resampling.LANCZOS)
    theirs = _img2img_oracle(tiny_sd3, _image_latents(tiny_sd3, big), "a castle", [7], 2 * SMALL,
                             guidance_scale=5.0, negative_prompt="fog")
    assert torch.equal(result.latents, theirs)
    assert "Hires upscaler: Lanczos" in result.infotexts[0]


def test_hires_steps_default_to_steps_and_progress_counts_both_passes(tiny_sd3):
    gen = _generator(tiny_sd3)
    seen = []
    result = gen.generate(gen.request(_request("a castle", SMALL, seed=1, hr_scale=1.5, hr_denoise=0.5)),
                          output="latent",
                          progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, 6) for n in range(1, 7)]  # 3 first-pass steps, then 3 (= steps) hires steps
    assert result.latents.shape[-2:] == (24, 24)  # 48 x 48 (the tiny VAE: 2 px a latent)
    assert "Hires steps" not in result.infotexts[0] and "Hires upscale: 1.5" in result.infotexts[0]


def test_flux_hires_size_is_a_multiple_of_the_token_grid(tiny_flux):
    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_request("a cat", seed=1, cfg=1.0, hr_scale=1.1, hr_steps=1)), output="latent")
    # int(64 x 1.1) = 70 px, 35 latents: Flux packs 2 x 2 latents into a token, so 68 px
    assert result.latents.shape[-2:] == (34, 34)


def test_hires_on_a_k_diffusion_sampler_runs_the_schedules_last_steps(tiny_sd3):
    """On a k-diffusion sampler the hires pass is the img2img loop from the upscaled latents over the last
    HR_STEPS sigmas of the HR_LENGTH-step schedule: k-diffusion's own sampler with the same denoiser and noise."""
    from test_sample_ksamplers import load_kdiffusion  # k-diffusion's sampling module without its training deps

    k_sampling = load_kdiffusion()
    if k_sampling is None:
        pytest.skip("the oracle k-diffusion is not installed")
    from adapterhub.sample import flow_samplers
    from adapterhub.sample.rng import initial_noise

    gen = _generator(tiny_sd3)
    common = {"seed": 3, "cfg": 4.0, "sampler": "DPM++ 2M", "schedule": "Simple", "size": SMALL}
    first = gen.generate(gen.request(_request("a tower", **common)), output="latent").latents
    result = gen.generate(gen.request(_request("a tower", hr_scale=2.0, hr_steps=HR_STEPS, hr_denoise=HR_DENOISE,
                                               **common)), output="latent")
    size = 2 * SMALL
    upscaled = torch.nn.functional.interpolate(first, scale_factor=2, mode="bilinear")
    table = flow_samplers.flow_table(tiny_sd3.scheduler.config, "sd3", size, size, tiny_sd3.vae_scale_factor,
                                     tiny_sd3.transformer.config.patch_size)
    sigmas = flow_samplers.flow_sigmas("Simple", HR_LENGTH, table, None, False)[-HR_STEPS - 1:]
    noise, _ = initial_noise("CPU", [3], tuple(upscaled.shape[1:]), "cpu")
    cond = flow_samplers.FlowDenoiser.encode(tiny_sd3, "sd3", "a tower", "", 1, 4.0)
    denoiser = flow_samplers.FlowDenoiser(tiny_sd3, "sd3", cond, 4.0, None, size, size)
    x = sigmas[0] * noise + (1 - sigmas[0]) * upscaled
    x = k_sampling.sampling.sample_dpmpp_2m(denoiser, x, sigmas, disable=True)
    assert torch.allclose(result.latents, x, atol=1e-5, rtol=0)


def test_cli_hires_on_flux_and_from_png_reruns_it(capsys, tmp_path, tiny_flux):
    from PIL import Image

    from adapterhub.sample import infotext

    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a red cat", "--steps", STEPS, "--seed", 5,
                      "--size", "64x64", "--hires", 2, "--hires-steps", HR_STEPS, "--hires-denoise", HR_DENOISE,
                      "--hires-upscaler", "Nearest", "--out", out, "--json")
    assert rc == 0, err
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        text, pixels = image.info["parameters"], np.asarray(image.convert("RGB"))
    assert pixels.shape == (128, 128, 3)
    params = infotext.parse(text)
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == ("2", "3", "Nearest")
    assert params["Denoising strength"] == "0.6" and params["Size"] == "64x64"
    gen = _generator(tiny_flux)
    ours = gen.generate(gen.request(_request("a red cat", seed=5, cfg=1.0, hr_scale=2.0, hr_steps=HR_STEPS,
                                             hr_denoise=HR_DENOISE, hr_upscaler="Nearest"))).images[0]
    assert np.array_equal(pixels, np.asarray(ours))
    again = tmp_path / "again"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--from-png", file, "--out", again, "--json")
    assert rc == 0, err
    (rerun,) = sorted(again.glob("*.png"))
    with Image.open(rerun) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
        assert image.info["parameters"] == text


def test_a_hires_size_beyond_sd3s_position_embeddings_is_refused_in_one_line(tiny_sd3):
    from adapterhub.errors import AdapterhubError

    gen = _generator(tiny_sd3)
    with pytest.raises(AdapterhubError, match=r"^hires size 128x128: this SD3 model places images up to 64 px a side"):
        gen.request(_request("a castle", hr_scale=2.0))
    with pytest.raises(AdapterhubError, match=r"^size 96x96: this SD3 model places images up to 64 px"):
        gen.request(_request("a castle", 96))


def test_cli_refuses_a_hires_size_sd3_cannot_place_in_one_line(capsys, tmp_path):
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a cat", "--steps", 2, "--size", "32x32",
                      "--hires", 4, "--out", out)
    assert rc == 2 and "hires size 128x128: this SD3 model places images up to 64 px" in err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    assert not out.exists() or not any(out.iterdir())


# -- inpainting ---------------------------------------------------------------------------------------------------
INPAINT_STEPS, DENOISE, STRENGTH = 4, 0.5, 0.75  # the webui runs int(0.5 x 4) + 1 = 3 of 4 steps: strength 0.75


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask_image():
    """White (repaint) on a block off the centre, black elsewhere."""
    from PIL import Image

    rows = np.zeros((SIZE, SIZE), dtype=np.uint8)
    rows[10:40, 20:56] = 255
    return Image.fromarray(rows, "L")


def _inpaint_request(prompt, image, mask, **kwargs):
    return _request(prompt, **{"steps": INPAINT_STEPS, "init_image": image, "mask": mask,
                               "denoising_strength": DENOISE, **kwargs})


def _latent_mask(pipe, mask, blur=4):
    """The latent mask as the Stable Diffusion path makes it (its own tests hold it to the webui's)."""
    from adapterhub.sample.images import latent_mask, prepare_mask

    scale = pipe.vae_scale_factor
    return latent_mask(prepare_mask(mask, SIZE, SIZE, blur).mask, SIZE // scale, SIZE // scale)


def _inpaint_oracle(pipe, image, mask, prompt, seeds, latents=None, scheduler=None, **kwargs):
    """diffusers' inpainting pipeline handed the init image's latents (the posterior's mean, as the webui encodes)
    (or ``latents``) and a mask image it reads back to exactly our latent mask (each latent a block of its
    pixels)."""
    import copy

    from PIL import Image

    latents = _image_latents(pipe, image) if latents is None else latents
    small = _latent_mask(pipe, mask)
    scale = pipe.vae_scale_factor
    big = Image.fromarray((small[0, 0].numpy() * 255).astype(np.uint8), "L").resize((SIZE, SIZE), Image.NEAREST)
    components = dict(pipe.components)
    if _family(pipe) == "StableDiffusion3":  # its pipeline blends only for a 16-channel transformer (the tiny: 4)
        components["transformer"] = copy.deepcopy(pipe.transformer)
        components["transformer"].register_to_config(in_channels=16)
    import diffusers

    inpaint = getattr(diffusers, f"{_family(pipe)}InpaintPipeline")(**components)
    inpaint.set_progress_bar_config(disable=True)
    inpaint._encode_vae_image = lambda image, generator: latents  # the mean, not a draw from the generators
    if scheduler is not None:
        inpaint.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    assert scale * small.shape[-1] == SIZE
    out = inpaint(prompt, image=image, mask_image=big, height=SIZE, width=SIZE, strength=STRENGTH,
                  num_inference_steps=INPAINT_STEPS, num_images_per_prompt=len(seeds),
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent", **kwargs).images
    return _unpacked(pipe, out, SIZE), latents, small


def test_flux_inpainting_equals_the_inpaint_pipeline_bitwise(tiny_flux, init_image, mask_image):
    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_inpaint_request("a red cat", init_image, mask_image, seed=5, batch=2,
                                                       cfg=1.0)), output="latent")
    theirs, init, mask = _inpaint_oracle(tiny_flux, init_image, mask_image, "a red cat", [5, 6], guidance_scale=3.5)
    assert torch.equal(result.latents, theirs)
    assert torch.equal((result.latents * (1 - mask)), (init * (1 - mask)).expand(2, -1, -1, -1))  # kept: the image
    assert "Denoising strength: 0.5" in result.infotexts[0] and "Mask blur: 4, Version" in result.infotexts[0]


@pytest.mark.parametrize("sampler, scheduler", [("Euler", None), ("Heun", "FlowMatchHeunDiscreteScheduler")])
def test_sd3_inpainting_equals_the_inpaint_pipeline_bitwise(tiny_sd3, init_image, mask_image, sampler, scheduler):
    gen = _generator(tiny_sd3)
    result = gen.generate(gen.request(_inpaint_request("a castle", init_image, mask_image, seed=7, cfg=6.0,
                                                       negative="fog", sampler=sampler)), output="latent")
    theirs, _, _ = _inpaint_oracle(tiny_sd3, init_image, mask_image, "a castle", [7], scheduler=scheduler,
                                   guidance_scale=6.0, negative_prompt="fog")
    assert torch.equal(result.latents, theirs)


def test_the_inpainted_image_keeps_the_original_outside_the_overlay(tiny_flux, init_image, mask_image):
    from adapterhub.sample.images import prepare_mask

    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_inpaint_request("a red cat", init_image, mask_image, seed=5, cfg=1.0)))
    pixels, original = np.asarray(result.images[0]), np.asarray(init_image)
    overlay = np.asarray(prepare_mask(mask_image, SIZE, SIZE, 4).overlay)
    assert np.array_equal(pixels[overlay == 0], original[overlay == 0])
    assert not np.array_equal(pixels[overlay == 255], original[overlay == 255])


def test_k_diffusion_inpainting_blends_the_denoised_latents(tiny_sd3, init_image, mask_image):
    """A k-diffusion sampler runs its own loop: the denoised latents outside the mask are the init latents (the
    webui's and Forge's blend), then the final latents too. Written out with k-diffusion's own sampler."""
    from test_sample_ksamplers import load_kdiffusion

    from adapterhub.sample import flow_samplers
    from adapterhub.sample.rng import initial_noise

    k_sampling = load_kdiffusion()
    if k_sampling is None:
        pytest.skip("the oracle k-diffusion is not installed")
    gen = _generator(tiny_sd3)
    result = gen.generate(gen.request(_inpaint_request("a tower", init_image, mask_image, seed=3, cfg=4.0,
                                                       sampler="DPM++ 2M", schedule="Simple")), output="latent")
    init, mask = _image_latents(tiny_sd3, init_image), _latent_mask(tiny_sd3, mask_image)
    table = flow_samplers.flow_table(tiny_sd3.scheduler.config, "sd3", SIZE, SIZE, tiny_sd3.vae_scale_factor,
                                     tiny_sd3.transformer.config.patch_size)
    sigmas = flow_samplers.flow_sigmas("Simple", INPAINT_STEPS, table, None, False)[-4:]  # 3 of 4 steps
    noise, _ = initial_noise("CPU", [3], tuple(init.shape[1:]), "cpu")
    cond = flow_samplers.FlowDenoiser.encode(tiny_sd3, "sd3", "a tower", "", 1, 4.0)
    denoiser = flow_samplers.FlowDenoiser(tiny_sd3, "sd3", cond, 4.0, None, SIZE, SIZE)
    x = sigmas[0] * noise + (1 - sigmas[0]) * init
    x = k_sampling.sampling.sample_dpmpp_2m(lambda x, s: init * (1 - mask) + mask * denoiser(x, s), x, sigmas,
                                            disable=True)
    x = init * (1 - mask) + mask * x
    assert torch.allclose(result.latents, x, atol=1e-5, rtol=0)
    assert torch.equal(result.latents * (1 - mask), init * (1 - mask))


@pytest.mark.parametrize("fill", [2, 3])
def test_latent_noise_and_latent_nothing_start_the_masked_area(tiny_flux, init_image, mask_image, fill):
    """The webui's "latent noise" (the image's own noise) and "latent nothing" (zeros) inside the mask: the oracle
    is the inpainting pipeline from the init latents so changed (pixels "fill" and "original" are the SD path's)."""
    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_inpaint_request("a red cat", init_image, mask_image, seed=5, cfg=1.0,
                                                       inpainting_fill=fill)), output="latent")
    from adapterhub.sample.rng import initial_noise

    latents, mask = _image_latents(tiny_flux, init_image), _latent_mask(tiny_flux, mask_image)
    noise, _ = initial_noise("CPU", [5], latents.shape[1:], "cpu")
    changed = latents * (1 - mask) + (noise * mask if fill == 2 else 0)
    plain = gen.generate(gen.request(_inpaint_request("a red cat", init_image, mask_image, seed=5, cfg=1.0)),
                         output="latent")
    assert not torch.equal(result.latents, plain.latents)
    theirs, _, _ = _inpaint_oracle(tiny_flux, init_image, mask_image, "a red cat", [5], changed, guidance_scale=3.5)
    assert torch.equal(result.latents, theirs)


def test_cli_inpaints_on_flux_only_masked_and_inverted(capsys, tmp_path, tiny_flux, init_image, mask_image):
    from PIL import Image

    init_image.save(tmp_path / "init.png")
    mask_image.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a red cat", "--steps", INPAINT_STEPS,
                      "--seed", 5, "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                      "--denoise", DENOISE, "--inpaint-full-res", "--invert-mask", "--mask-blur", 2,
                      "--inpainting-fill", "latent-noise", "--out", out, "--json")
    assert rc == 0, err
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        text, pixels = image.info["parameters"], np.asarray(image.convert("RGB"))
    assert pixels.shape == (SIZE, SIZE, 3)
    assert "Denoising strength: 0.5" in text and "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 32" \
        in text
    gen = _generator(tiny_flux)
    ours = gen.generate(gen.request(_inpaint_request("a red cat", init_image, mask_image, seed=5, cfg=1.0,
                                                     inpaint_full_res=True, inpainting_mask_invert=True,
                                                     mask_blur=2, inpainting_fill=2))).images[0]
    assert np.array_equal(pixels, np.asarray(ours))


def test_a_sampler_the_sd_path_refuses_a_mask_is_refused_alike(tiny_flux, init_image, mask_image, capsys, tmp_path):
    """DPM++ 2S a inpaints on neither family here: one line from the generator, and from the command line before a
    model loads (exit 2, nothing written)."""
    from adapterhub.errors import AdapterhubError

    gen = _generator(tiny_flux)
    with pytest.raises(AdapterhubError, match=r"^DPM\+\+ 2S a: no masks \(inpainting\) with this sampler here"):
        gen.request(_inpaint_request("a cat", init_image, mask_image, sampler="DPM++ 2S a"))
    init_image.save(tmp_path / "init.png")
    mask_image.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a cat", "--steps", 2, "--sampler",
                      "DPM++ 2S a", "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--out", out)
    assert rc == 2 and "DPM++ 2S a: no masks (inpainting)" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_inpainting_on_a_flux_control_model_is_refused_before_a_model_loads():
    """A FLUX.1 control model takes img2img and the hires fix (tests/test_flux_control_passes.py), not a mask."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow import FlowRequest
    from adapterhub.sample.flow_control import check_control_request

    with pytest.raises(AdapterhubError, match=r"^inpainting on a FLUX.1 control model is not supported"):
        check_control_request(FlowRequest("a cat", sampler="Euler", cfg=1.0, init_image="a.png", mask="m.png"))
    check_control_request(FlowRequest("a cat", sampler="Euler", cfg=1.0, hr_scale=2.0))
