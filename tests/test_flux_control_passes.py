"""img2img and the hires fix on a FLUX.1 control model (a base a Flux control LoRA was merged into; #21), against
diffusers' ``FluxControlImg2ImgPipeline`` built from the same modules (fp32 CPU).

The oracle is handed the noised latents its own loop starts from: the init image's latents (the posterior's mean,
as ours and the webui encode) noised with each image's noise at the first sigma of the truncated schedule the
pipeline itself sets (read back from its scheduler), as its ``prepare_latents`` noises them; everything after (the
webui's step count as the strength, the control image resized to the size and encoded with each image's generator,
the loop) is the pipeline's. The latents must be equal bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from flux_helpers import cli as _cli
from test_flux_control_lora import _control_image, control_file, control_model  # noqa: F401 (a fixture)

SIZE = 32


def _oracle(pipe, init, noise, control, prompt, seeds, size, steps, strength, guidance=3.5):
    """FluxControlImg2ImgPipeline from ``init`` (B, C, h, w latents) noised with ``noise`` at its first sigma."""
    from diffusers import FluxControlImg2ImgPipeline
    from PIL import Image

    parts = {k: getattr(pipe, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                           "tokenizer_2", "transformer")}
    ref = FluxControlImg2ImgPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    first = {}

    def sigma0(p, i, t, kwargs):  # the first step's sigma, as the scheduler holds it
        if i == 0:
            first["sigma"] = p.scheduler.sigmas[p.scheduler.step_index - 1]
        return {}

    def run(latents, seed, callback=None):
        out = ref(prompt, image=Image.new("RGB", (size, size)), control_image=control, height=size, width=size,
                  strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                  latents=ref._pack_latents(latents, *latents.shape), generator=torch.Generator().manual_seed(seed),
                  output_type="latent", callback_on_step_end=callback).images
        return ref._unpack_latents(out, size, size, ref.vae_scale_factor)

    run(torch.zeros_like(init[:1]), seeds[0], sigma0)
    sigma = first["sigma"]
    noised = sigma * noise + (1.0 - sigma) * init  # FlowMatchEulerDiscreteScheduler.scale_noise
    # one image a call, as ours runs them (a batch of two rounds the transformer's matmuls differently)
    return torch.cat([run(noised[i:i + 1], seed) for i, seed in enumerate(seeds)])


def _image_latents(pipe, image, size):
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    pixels = pipe.image_processor.preprocess(image, height=size, width=size)
    with torch.no_grad():
        z = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def test_img2img_on_a_control_model_equals_flux_control_img2img_pipeline(control_model):
    from adapterhub.sample.flow_control import FlowControlGenerator, FlowControlRequest

    gen = FlowControlGenerator(control_model)
    control, init_image = _control_image(), _control_image().transpose(0)  # another picture as the init image
    result = gen.generate(FlowControlRequest("a castle", seed=7, images=2, steps=4, width=SIZE, height=SIZE,
                                             cfg=1.0, control_image=control, init_image=init_image,
                                             denoising_strength=0.5), output="latent")
    init = _image_latents(control_model, init_image, SIZE).repeat(2, 1, 1, 1)
    noise = torch.cat([gen.noise([s], SIZE, SIZE) for s in (7, 8)])
    # the webui runs int(0.5 x 4) + 1 = 3 of 4 steps: diffusers' strength 3 / 4
    theirs = _oracle(control_model, init, noise, control, "a castle", [7, 8], SIZE, 4, 0.75)
    assert result.latents.shape == theirs.shape and torch.equal(result.latents, theirs)
    assert "Denoising strength: 0.5" in result.infotexts[0]
    plain = gen.generate(FlowControlRequest("a castle", seed=7, steps=4, width=SIZE, height=SIZE, cfg=1.0,
                                            control_image=control), output="latent")
    assert not torch.equal(plain.latents, result.latents[:1])  # the init image counts


def test_the_hires_fix_on_a_control_model_runs_its_second_pass_with_the_control_image_at_the_hires_size(
        control_model):
    from adapterhub.sample.flow_control import FlowControlGenerator, FlowControlRequest

    gen = FlowControlGenerator(control_model)
    control = _control_image()
    common = {"seed": 3, "steps": 3, "width": SIZE, "height": SIZE, "cfg": 1.0, "control_image": control}
    first = gen.generate(FlowControlRequest("a tower", **common), output="latent").latents
    result = gen.generate(FlowControlRequest("a tower", hr_scale=2.0, hr_steps=3, hr_denoise=0.6, **common),
                          output="latent")
    upscaled = torch.nn.functional.interpolate(first, scale_factor=2, mode="bilinear")  # the Latent upscaler
    noise = gen.noise([3], 2 * SIZE, 2 * SIZE)
    # the webui's hires pass: 3 steps of an int(3 / 0.6) = 5-step schedule
    theirs = _oracle(control_model, upscaled, noise, control, "a tower", [3], 2 * SIZE, 5, 3 / 5)
    assert result.latents.shape == (1, 4, 32, 32) and torch.equal(result.latents, theirs)
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in result.infotexts[0]


def test_inpainting_on_a_control_model_is_refused_in_one_line(control_model):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow_control import FlowControlGenerator

    gen = FlowControlGenerator(control_model)
    with pytest.raises(AdapterhubError, match="inpainting on a FLUX.1 control model is not supported"):
        gen("a castle", steps=1, width=SIZE, height=SIZE, control_image=_control_image(),
            init_image=_control_image(), mask=_control_image())


def test_cli_control_img2img(tiny_flux, tmp_path, capsys):
    """From the command line: merge the control LoRA, then sample the merged model with an init image."""
    lora = control_file(tmp_path / "flux1-depth-dev-lora.safetensors", tiny_flux.transformer)
    merged = tmp_path / "merged"
    rc, _, err = _cli(capsys, "merge", "--base", "tiny-flux", str(lora), "--out", str(merged))
    assert rc == 0, err
    _control_image().save(tmp_path / "depth.png")
    _control_image().transpose(0).save(tmp_path / "init.png")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", str(merged), "--prompt", "a room", "--steps", "2", "--size",
                      "32x32", "--control-image", str(tmp_path / "depth.png"), "--init-image",
                      str(tmp_path / "init.png"), "--denoise", "0.6", "--out", str(out))
    assert rc == 0, err
    (png,) = sorted(out.glob("*.png"))
    from PIL import Image

    with Image.open(png) as image:
        assert "Denoising strength: 0.6" in image.info["parameters"]
