"""``adapterhub sample --init-image … --mask …`` (inpainting) through the real console entry point: the images equal
the Generator's for the same request, and a bad mask is one line, exit 2, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from adapterhub import cli

SMALL = ["--base", "tiny-sd1", "--size", "64x64", "--steps", "3", "--sampler", "Euler a", "--seed", "9"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("inpaint_inputs")
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "init.png")
    mask = Image.new("L", (32, 32), 0)  # half the init image's size: resized, as the webui does
    ImageDraw.Draw(mask).rectangle((4, 8, 19, 25), fill=255)
    mask.save(folder / "mask.png")
    return folder


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("extra, request_fields", [
    ([], {}),
    (["--mask-blur", "2", "--inpainting-fill", "latent-noise", "--invert-mask"],
     {"mask_blur": 2, "inpainting_fill": 2, "inpainting_mask_invert": True}),
    (["--inpaint-full-res", "--inpaint-padding", "4", "--inpainting-fill", "fill", "--noise-multiplier", "0.8"],
     {"inpaint_full_res": True, "inpaint_full_res_padding": 4, "inpainting_fill": 0, "initial_noise_multiplier": 0.8}),
])
def test_sample_with_a_mask_equals_the_generator(capsys, tmp_path, pictures, tiny_sd1, extra, request_fields):
    from PIL import Image

    from adapterhub.sample.generator import Generator, Request

    rc, out, err = run(capsys, "sample", *SMALL, "--prompt", "a garden", "--init-image", pictures / "init.png",
                       "--denoise", "0.6", "--mask", pictures / "mask.png", *extra, "--out", tmp_path, "--json")
    assert rc == 0, err
    written = json.loads(out)["images"][0]["path"]
    with Image.open(written) as image:
        got, text = np.asarray(image.convert("RGB")), image.info["parameters"]
    gen = Generator(tiny_sd1, hash_model=False)
    want = gen.generate(Request("a garden", seed=9, steps=3, sampler="Euler a", width=64, height=64,
                                init_image=pictures / "init.png", denoising_strength=0.6, mask=pictures / "mask.png",
                                **request_fields))
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert f"Mask blur: {request_fields.get('mask_blur', 4)}" in text and "Denoising strength: 0.6" in text


@pytest.mark.parametrize("args, message", [
    (["--mask", "{broken}"], "mask {broken}: cannot read it as an image"),
    (["--mask", "{mask}", "--inpainting-fill", "5"], "Invalid value for '--inpainting-fill'"),
    (["--mask", "{mask}", "--mask-blur", "-1"], "mask blur -1: must be 0 or more"),
    (["--mask", "{mask}", "--sampler", "DPM fast"], "DPM fast: no masks"),
    (["--mask-blur", "3"], "--mask-blur and the other inpainting options need --mask"),
])
def test_bad_masks_are_one_line_exit_2_nothing_written(capsys, tmp_path, pictures, args, message):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    args = [a.format(broken=broken, mask=pictures / "mask.png") for a in args]
    rc, out, err = run(capsys, "sample", *SMALL[:-2], "--prompt", "a garden", "--init-image", pictures / "init.png",
                       *args, "--out", tmp_path / "out")
    assert rc == 2 and message.format(broken=broken) in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) <= 3
    assert not (tmp_path / "out").exists()
