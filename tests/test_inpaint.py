"""Inpainting (img2img with a mask) on a normal 4-channel UNet.

The oracle of the denoising is diffusers' ``StableDiffusionInpaintPipeline``, which with a 4-channel UNet blends
each step's latents with the init latents noised to the next timestep outside the mask: given the same latent mask,
scheduler, seeds, strength and embeddings its latents must equal ours. The mask's preparation follows the webui
(binarised, inverted, blurred, its latent mask rounded from a bicubic resize), and the final image keeps the original
pixels outside the mask (the webui's overlay).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from inpaint_helpers import SIZE, init_image  # noqa: F401 (init_image: a fixture)
from inpaint_helpers import embeds as _embeds, mask as _mask, request as _request


@pytest.fixture(scope="module")
def gen(tiny_sd1):
    from adapterhub.sample.generator import Generator

    return Generator(tiny_sd1, model_name="tiny-sd1", model_hash="0123456789")


def _diffusers_inpaint(pipe, sampler, latents, latent_mask, steps, strength, seeds):
    """diffusers' inpainting with our init latents as its image and our latent mask (upsampled nearest: its own
    binarise and nearest downsample give it back exactly)."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from adapterhub.sample.samplers import make_scheduler, resolve_sampler

    components = {**pipe.components, "scheduler": make_scheduler(*resolve_sampler(sampler), pipe.scheduler.config)}
    inpaint = StableDiffusionInpaintPipeline(**components)
    inpaint.set_progress_bar_config(disable=True)
    up = latent_mask[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1)
    mask_image = Image.fromarray((up.numpy() * 255).astype(np.uint8), "L")
    batch = len(seeds)
    return inpaint(image=latents, mask_image=mask_image, masked_image_latents=latents,
                   prompt_embeds=_embeds(pipe, "a red house").repeat(batch, 1, 1),
                   negative_prompt_embeds=_embeds(pipe, "blurry").repeat(batch, 1, 1), height=SIZE, width=SIZE,
                   num_inference_steps=steps, strength=strength, guidance_scale=7.0,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_masked_img2img_equals_diffusers_inpaint_pipeline(gen, init_image, sampler):
    from adapterhub.sample.images import latent_mask, prepare_mask

    request = _request(mask=_mask(), init_image=init_image, sampler=sampler, batch=2)
    result = gen.generate(request, output="latent")
    prepared = prepare_mask(_mask(), SIZE, SIZE, blur=0)
    mask = latent_mask(prepared.mask, SIZE // 8, SIZE // 8)
    assert mask.sum() > 0 and (1 - mask).sum() > 0  # both parts present
    latents = gen.encode_image(init_image.resize((SIZE, SIZE)))
    # our 0.5 runs int(0.5 x 4) + 1 = 3 steps (the webui's); diffusers' strength 3/4 runs the same 3
    want = _diffusers_inpaint(gen.pipe, sampler, latents, mask, 4, 3 / 4, [11, 12])
    assert torch.equal(result.latents, want)
    # outside the mask the final latents are the init latents themselves
    outside = (mask == 0).expand_as(result.latents)
    assert torch.equal(result.latents[outside], latents.expand_as(result.latents)[outside])
    plain = gen.generate(_request(init_image=init_image, sampler=sampler, batch=2), output="latent")
    assert not torch.allclose(plain.latents, result.latents)  # the mask changed the run


def test_the_final_image_keeps_the_original_pixels_outside_the_mask(gen, init_image):
    result = gen.generate(_request(mask=_mask(), init_image=init_image, mask_blur=4))
    got = np.asarray(result.images[0].convert("RGB"), dtype=int)
    original = np.asarray(init_image, dtype=int)
    decoded = np.asarray(gen.decode(gen.generate(_request(mask=_mask(), init_image=init_image, mask_blur=4),
                                                  output="latent").latents)[0], dtype=int)
    # the overlay's mask is the blurred mask doubled (the webui's mask_for_overlay): zero a blur radius away
    far = np.ones((SIZE, SIZE), bool)
    far[16 - 12:, :40 + 12] = False
    assert np.array_equal(got[far], original[far])
    inside = np.zeros((SIZE, SIZE), bool)
    inside[24:48, 16:32] = True  # well inside: only the generated pixels
    assert np.array_equal(got[inside], decoded[inside])
    assert not np.array_equal(got[inside], original[inside])
    assert "Mask blur: 4" in result.infotexts[0]


def test_mask_preparation_follows_the_webui():
    from PIL import Image

    from adapterhub.sample.images import blur_mask, latent_mask, prepare_mask

    soft = Image.fromarray(np.array([[0, 128, 129, 255]] * 4, dtype=np.uint8), "L")
    assert np.asarray(prepare_mask(soft, 4, 4, blur=0).mask)[0].tolist() == [0, 0, 255, 255]  # > 128 is white
    inverted = prepare_mask(soft, 4, 4, blur=0, invert=True).mask
    assert np.asarray(inverted)[0].tolist() == [255, 255, 0, 0]
    # the webui's Gaussian kernel: size 2 x int(2.5 sigma + 0.5) + 1, sigma = blur, edges mirrored (cv2's default)
    line = np.zeros((1, 21), np.uint8)
    line[0, 10] = 255
    blurred = np.asarray(blur_mask(Image.fromarray(line, "L"), 2, 0), dtype=float)[0]
    x = np.arange(-5, 6)
    kernel = np.exp(-x ** 2 / 8.0)
    kernel /= kernel.sum()
    assert np.abs(blurred[5:16] - 255 * kernel).max() <= 0.5 and blurred[:5].sum() == 0
    # each axis its own sigma (the webui API's mask_blur_x / mask_blur_y): along y only, the same kernel
    column = np.asarray(blur_mask(Image.fromarray(line.T.copy(), "L"), 0, 2), dtype=float)[:, 0]
    assert np.array_equal(column, blurred)
    spot = np.zeros((21, 21), np.uint8)
    spot[10, 10] = 255
    apart = prepare_mask(Image.fromarray(spot, "L"), 21, 21, blur=1, blur_y=3).mask
    assert np.array_equal(np.asarray(apart), np.asarray(blur_mask(Image.fromarray(spot, "L"), 1, 3)))
    assert not np.array_equal(np.asarray(apart), np.asarray(prepare_mask(Image.fromarray(spot, "L"), 21, 21, blur=1).mask))
    # a size mismatch is resized, as the webui does; the latent mask is the bicubic resize, rounded
    prepared = prepare_mask(_mask(size=32), SIZE, SIZE, blur=0)
    assert prepared.mask.size == (SIZE, SIZE)
    mask = latent_mask(prepared.mask, 8, 8)
    want = np.round(np.asarray(prepared.mask.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC),
                               dtype=np.float32)[..., 0] / 255)
    assert mask.shape == (1, 1, 8, 8) and np.array_equal(mask[0, 0].numpy(), want)


def test_fill_paints_the_masked_pixels_from_their_surroundings(init_image):
    from adapterhub.sample.images import prepare_mask

    original = prepare_mask(_mask(), SIZE, SIZE, blur=0, init=init_image, fill=1)
    filled = prepare_mask(_mask(), SIZE, SIZE, blur=0, init=init_image, fill=0)
    assert np.array_equal(np.asarray(original.init), np.asarray(init_image))
    got, before = np.asarray(filled.init, dtype=int), np.asarray(init_image, dtype=int)
    masked = np.asarray(filled.mask) == 255
    assert np.array_equal(got[~masked], before[~masked])  # unmasked pixels kept
    inside = got[masked]
    assert np.abs(inside - before[~masked].mean(0)).max() < 40  # smooth colours of the surroundings
    assert inside.std(0).max() < before.std(0).min() / 2


@pytest.mark.parametrize("fill", [2, 3])
def test_inpainting_fill_changes_only_the_masked_start(gen, init_image, fill):
    from adapterhub.sample.images import latent_mask, prepare_mask

    base = gen.generate(_request(mask=_mask(), init_image=init_image), output="latent").latents
    filled = gen.generate(_request(mask=_mask(), init_image=init_image, inpainting_fill=fill), output="latent").latents
    mask = latent_mask(prepare_mask(_mask(), SIZE, SIZE, blur=0).mask, 8, 8).expand_as(base)
    assert torch.equal(base[mask == 0], filled[mask == 0])
    assert not torch.allclose(base[mask == 1], filled[mask == 1])


def test_full_res_inpainting_crops_the_masked_region_and_pastes_it_back(gen, init_image):
    big = init_image.resize((128, 128))
    mask = _mask((40, 48, 72, 80), size=128)
    result = gen.generate(_request(mask=mask, init_image=big, inpaint_full_res=True, inpaint_full_res_padding=8))
    image = result.images[0]
    assert image.size == (128, 128)  # the original's size: the region pasted back
    got, original = np.asarray(image, dtype=int), np.asarray(big, dtype=int)
    outside = np.ones((128, 128), bool)
    outside[48 - 8:80 + 8, 40 - 8:72 + 8] = False
    assert np.array_equal(got[outside], original[outside])
    assert not np.array_equal(got[52:76, 44:68], original[52:76, 44:68])
    assert "Inpaint area: Only masked" in result.infotexts[0] and "Masked area padding: 8" in result.infotexts[0]


def test_bad_masks_are_one_line(gen, tmp_path):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.generator import check_request

    broken = tmp_path / "mask.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(AdapterhubError, match=r"mask .*mask.png: cannot read it as an image"):
        check_request(_request(mask=broken, init_image=_mask()))
    from PIL import Image

    wide = tmp_path / "wide.tif"
    Image.new("F", (SIZE, SIZE)).save(wide)
    with pytest.raises(AdapterhubError, match=r"^mask .*wide.tif: mode F is not a mask"):
        check_request(_request(mask=wide, init_image=_mask()))
    with pytest.raises(AdapterhubError, match="mask: give an init image"):
        check_request(_request(mask=_mask()))
    with pytest.raises(AdapterhubError, match="inpainting fill 7"):
        check_request(_request(mask=_mask(), init_image=_mask(), inpainting_fill=7))
    with pytest.raises(AdapterhubError, match="DPM fast: no masks"):
        check_request(_request(mask=_mask(), init_image=_mask(), sampler="DPM fast"))


def test_initial_noise_multiplier_scales_the_initial_noise_only(gen, init_image, monkeypatch):
    """The webui's img2img ``initial_noise_multiplier``: the first noise drawn, times the multiplier (the later
    draws of an ancestral sampler are not scaled); recorded as ``Noise multiplier``."""
    from adapterhub.sample import rng

    scaled = gen.generate(_request(init_image=init_image, mask=_mask(), initial_noise_multiplier=0.6))
    original = rng.initial_noise

    def smaller(*args, **kwargs):
        noise, generators = original(*args, **kwargs)
        return noise * 0.6, generators

    monkeypatch.setattr(rng, "initial_noise", smaller)
    by_hand = gen.generate(_request(init_image=init_image, mask=_mask()))
    monkeypatch.undo()
    assert np.array_equal(np.asarray(scaled.images[0]), np.asarray(by_hand.images[0]))
    plain = gen.generate(_request(init_image=init_image, mask=_mask()))
    assert not np.array_equal(np.asarray(scaled.images[0]), np.asarray(plain.images[0]))
    assert "Noise multiplier: 0.6" in scaled.infotexts[0] and "Noise multiplier" not in plain.infotexts[0]


def test_only_masked_region_is_padded_and_grown_to_the_sizes_aspect_ratio():
    from adapterhub.sample.images import crop_region

    mask = _mask((40, 48, 72, 80), size=128)
    assert crop_region(mask, 8, 64, 64) == (32, 40, 80, 88)  # padded; already square
    assert crop_region(mask, 8, 128, 64) == (8, 40, 104, 88)  # grown evenly along x to 2:1
    assert crop_region(_mask((0, 48, 32, 80), size=128), 0, 128, 64) == (0, 48, 64, 80)  # shifted back inside
    from PIL import Image

    assert crop_region(Image.new("L", (128, 128)), 8, 64, 64) == (0, 0, 128, 128)  # nothing masked
    assert crop_region(_mask((8, 0, 24, 128), size=128), 0, 128, 64) == (0, 0, 128, 128)  # clamped to the image
