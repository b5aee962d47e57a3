"""img2img on Flux and SD3 (#21): our flow generator against diffusers' FluxImg2ImgPipeline /
StableDiffusion3Img2ImgPipeline built from the same tiny components.

The oracle is handed the init image's latents (the VAE posterior's mean, shifted and scaled as the pipelines
do; the webui encodes deterministically too), one CPU generator per image seeded ``seed + n``, and the strength
that runs the webui's step count: ``int(d x steps) + 1`` steps of a ``steps``-step schedule. fp32 on CPU, 64 px:
latents and images must be equal bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_helpers import flow_generator as _generator
from flux_helpers import cli as _cli

SIZE, STEPS = 64, 4
DENOISE, STRENGTH = 0.5, 0.75  # the webui runs int(0.5 x 4) + 1 = 3 of 4 steps; diffusers' strength for 3 of 4


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    rows = np.random.default_rng(3).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(rows)


def _request(prompt, image, **kwargs):
    from adapterhub.sample import FlowRequest

    return FlowRequest(prompt, **{"steps": STEPS, "width": SIZE, "height": SIZE, "init_image": image,
                                  "denoising_strength": DENOISE, **kwargs})


def _image_latents(pipe, image):
    """The init image as the img2img pipelines encode it, with the posterior's mean (diffusers' ``argmax``)."""
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    pixels = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE)
    with torch.no_grad():
        z = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def _oracle(pipe, image, prompt, seeds, output_type="latent", strength=STRENGTH, scheduler=None, **kwargs):
    import diffusers

    family = "Flux" if type(pipe).__name__.startswith("Flux") else "StableDiffusion3"
    img2img = getattr(diffusers, f"{family}Img2ImgPipeline")(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    if scheduler is not None:
        img2img.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    out = img2img(prompt, image=_image_latents(pipe, image), height=SIZE, width=SIZE, strength=strength,
                  num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  num_images_per_prompt=len(seeds), output_type=output_type, **kwargs).images
    if output_type == "latent" and family == "Flux":
        out = img2img._unpack_latents(out, SIZE, SIZE, img2img.vae_scale_factor)
    return out


def _same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_flux_img2img_equals_the_img2img_pipeline_bitwise(tiny_flux, init_image):
    gen = _generator(tiny_flux)
    req = gen.request(_request("a red cat", init_image, seed=5, batch=2, cfg=1.0))
    ours = gen.generate(req, output="latent").latents
    theirs = _oracle(tiny_flux, init_image, "a red cat", [5, 6], guidance_scale=3.5)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    # the strength counts: the webui's 3 of 4 steps, not diffusers' 2 of 4 for strength 0.5
    assert not torch.equal(ours, _oracle(tiny_flux, init_image, "a red cat", [5, 6], strength=DENOISE,
                                         guidance_scale=3.5))
    pictures = gen.generate(req)
    _same_images(pictures.images, _oracle(tiny_flux, init_image, "a red cat", [5, 6], output_type="pil",
                                          guidance_scale=3.5))


def test_flux_img2img_true_cfg_and_full_strength(tiny_flux, init_image):
    gen = _generator(tiny_flux)
    ours = gen.generate(gen.request(_request("a dog", init_image, seed=9, cfg=2.5, negative="blurry",
                                             distilled_cfg=5.0)), output="latent").latents
    theirs = _oracle(tiny_flux, init_image, "a dog", [9], guidance_scale=5.0, negative_prompt="blurry",
                     true_cfg_scale=2.5)
    assert torch.equal(ours, theirs)
    # strength 1: the webui runs every step (0.999 x 4 -> 3, + 1) from pure noise
    ours = gen.generate(gen.request(_request("a dog", init_image, seed=9, cfg=1.0, denoising_strength=1.0)),
                        output="latent").latents
    assert torch.equal(ours, _oracle(tiny_flux, init_image, "a dog", [9], strength=1.0, guidance_scale=3.5))


@pytest.mark.parametrize("sampler, scheduler", [("Euler", None), ("Heun", "FlowMatchHeunDiscreteScheduler")])
def test_sd3_img2img_equals_the_img2img_pipeline_bitwise(tiny_sd3, init_image, sampler, scheduler):
    gen = _generator(tiny_sd3)
    ours = gen.generate(gen.request(_request("a castle", init_image, seed=7, cfg=6.0, negative="fog",
                                             sampler=sampler)), output="latent").latents
    theirs = _oracle(tiny_sd3, init_image, "a castle", [7], scheduler=scheduler, guidance_scale=6.0,
                     negative_prompt="fog")
    assert torch.equal(ours, theirs)


def test_the_noise_multiplier_scales_the_init_images_noise(tiny_sd3, init_image):
    """The webui's initial noise multiplier: the init image's noise times m (m = 1 is the pipeline's, above);
    recorded as Forge does when not 1."""
    gen = _generator(tiny_sd3)
    half = gen.generate(gen.request(_request("a castle", init_image, seed=7, initial_noise_multiplier=0.5)),
                        output="latent")
    plain = gen.generate(gen.request(_request("a castle", init_image, seed=7)), output="latent")
    assert not torch.equal(half.latents, plain.latents)
    assert "Noise multiplier: 0.5, Version" in half.infotexts[0]
    assert "Noise multiplier" not in plain.infotexts[0]


def test_infotext_records_the_denoising_strength_as_forge(tiny_flux, init_image):
    from adapterhub.sample import infotext

    gen = _generator(tiny_flux)
    text = gen.generate(gen.request(_request("a cat", init_image, seed=5, cfg=1.0)), output="latent").infotexts[0]
    assert "CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 5, Size: 64x64, Model: tiny, Denoising strength: 0.5, " \
        in text
    assert float(infotext.parse(text)["Denoising strength"]) == 0.5
    txt2img = gen.generate(gen.request(_request("a cat", None, seed=5, cfg=1.0)), output="latent").infotexts[0]
    assert "Denoising strength" not in txt2img


def test_progress_counts_the_steps_img2img_runs(tiny_sd3, init_image):
    gen = _generator(tiny_sd3)
    seen = []
    gen.generate(gen.request(_request("a castle", init_image, seed=1, images=2)), output="latent",
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, 6) for n in range(1, 7)]  # 3 steps of 4, for each of 2 images


def test_a_mask_without_an_init_image_is_refused_in_one_line(tiny_flux, init_image):
    from adapterhub.errors import AdapterhubError

    gen = _generator(tiny_flux)
    with pytest.raises(AdapterhubError, match="mask: give an init image too"):
        gen.request(_request("a cat", None, mask=init_image.convert("L")))


def test_cli_img2img_on_tiny_flux_equals_the_pipeline(capsys, tmp_path, tiny_flux, init_image):
    from PIL import Image

    init_image.save(tmp_path / "init.png")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a red cat", "--steps", str(STEPS),
                      "--seed", "5", "--init-image", str(tmp_path / "init.png"), "--denoise", str(DENOISE),
                      "--out", str(out), "--json")
    assert rc == 0, err
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        text, pixels = image.info["parameters"], np.asarray(image.convert("RGB"))
    assert "Size: 64x64" in text and "Denoising strength: 0.5" in text  # the init image's size
    theirs = _oracle(tiny_flux, init_image, "a red cat", [5], output_type="pil", guidance_scale=3.5)[0]
    assert np.array_equal(pixels, np.asarray(theirs))


def test_cli_refuses_an_unreadable_mask_on_sd3_in_one_line(capsys, tmp_path, init_image):
    init_image.save(tmp_path / "init.png")
    (tmp_path / "mask.png").write_text("not an image")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a cat", "--steps", "2",
                      "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                      "--out", str(out))
    assert rc == 2 and "mask.png: cannot read it as an image" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists() or not any(out.iterdir())
