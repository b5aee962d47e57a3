"""``/sdapi/v1/img2img`` with a mask (inpainting), through the real ``webuiapi`` client against a real server on
loopback: the images and infotexts equal what ``adapterhub sample --mask`` writes for the same request."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from adapterhub import cli  # noqa: E402
from adapterhub.sample import infotext  # noqa: E402
from serve_helpers import DEADLINE, running_server  # noqa: E402

SMALL = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 6.5, "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def served():
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    with running_server(Service(Generator("tiny-sd1"), catalog=False)) as port:
        yield port


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("serve_inpaint")
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    init.save(folder / "init.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((12, 20, 40, 44), fill=255)
    mask.save(folder / "mask.png")
    return {"folder": folder, "init": init, "mask": mask}


def sample_cli(tmp_path, *args):
    from PIL import Image

    out = tmp_path / "sampled"
    assert cli.main(["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "3", "--sampler", "Euler a",
                     "--cfg", "6.5", "--out", str(out), "--json", *map(str, args)]) == 0
    return [Image.open(p) for p in sorted(out.glob("0*.png"))]


@pytest.mark.parametrize("fields, options", [
    # the client's defaults: only masked, no padding, fill, blur 4
    ({}, ["--inpaint-full-res", "--inpaint-padding", 0, "--inpainting-fill", "fill"]),
    ({"inpaint_full_res": True, "inpaint_full_res_padding": 6, "inpainting_fill": 1, "mask_blur": 2,
      "initial_noise_multiplier": 0.9},
     ["--inpaint-full-res", "--inpaint-padding", 6, "--inpainting-fill", "original", "--mask-blur", 2,
      "--noise-multiplier", 0.9]),
    ({"inpaint_full_res": False, "inpainting_fill": 2, "inpainting_mask_invert": 1},
     ["--inpainting-fill", "latent-noise", "--invert-mask"]),
])
def test_img2img_with_a_mask_equals_adapterhub_sample(served, pictures, tmp_path, fields, options):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served)
    result = api.img2img(images=[pictures["init"]], mask_image=pictures["mask"], prompt="a pond", seed=21,
                         denoising_strength=0.7, **fields, **SMALL)
    folder = pictures["folder"]
    ours = sample_cli(tmp_path, "--prompt", "a pond", "--seed", 21, "--init-image", folder / "init.png",
                      "--denoise", 0.7, "--mask", folder / "mask.png", *options)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(ours[0].convert("RGB")))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert result.info["denoising_strength"] == 0.7 and result.parameters["mask"] is None
    assert "Mask blur:" in result.info["infotexts"][0]


def _post(port, **body):
    return requests.post(f"http://127.0.0.1:{port}/sdapi/v1/img2img", json=body, timeout=DEADLINE)


def _b64(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


@pytest.mark.parametrize("extra, status, detail", [
    ({"mask": "not an image"}, 422, "mask: invalid encoded image"),
    ({"latent_mask": "{mask}"}, 422, "latent_mask: a separate latent mask is not available here"),
    ({"mask": "{mask}", "inpainting_fill": 9}, 422, "inpainting fill 9"),
    ({"mask": "{mask}", "sampler_name": "DPM fast"}, 422, "DPM fast: no masks"),
])
def test_bad_mask_requests_are_refused_in_one_line(served, pictures, extra, status, detail):
    body = {**SMALL, "prompt": "a pond", "init_images": [_b64(pictures["init"])]}
    body.update({k: _b64(pictures["mask"]) if v == "{mask}" else v for k, v in extra.items()})
    response = _post(served, **body)
    assert response.status_code == status and detail in response.json()["detail"]
    assert _post(served, **{**SMALL, "prompt": "a pond", "init_images": [_b64(pictures["init"])]}).status_code == 200


def test_mask_blur_per_axis_as_the_webui_api_takes_it(served, pictures):
    """``mask_blur_x`` / ``mask_blur_y`` blur each axis by its own sigma (``mask_blur`` sets both): equal axes give
    the ``mask_blur`` image; different ones another image, whose infotext has no ``Mask blur`` (the webui writes
    it only for one blur of both axes)."""
    body = {**SMALL, "prompt": "a pond", "seed": 3, "denoising_strength": 0.7, "init_images": [_b64(pictures["init"])],
            "mask": _b64(pictures["mask"]), "inpaint_full_res": False}

    def run(**fields):
        response = _post(served, **body, **fields)
        assert response.status_code == 200, response.text
        data = response.json()
        return data["images"][0], json.loads(data["info"])["infotexts"][0]

    both, text = run(mask_blur=3)
    assert run(mask_blur_x=3, mask_blur_y=3) == (both, text) and "Mask blur: 3" in text
    apart, text = run(mask_blur_x=3, mask_blur_y=9)
    assert apart != both and "Mask blur" not in text
    assert run(mask_blur_x=3, mask_blur_y=9, mask_blur=3)[0] == both  # mask_blur wins, as in the webui
