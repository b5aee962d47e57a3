"""What the inpainting tests share (tests/test_inpaint.py, tests/test_inpaint_models.py): the size, a seeded init
image (fixture), a rectangular mask, a small masked img2img request and the pipeline's own prompt embeddings."""
from __future__ import annotations

import numpy as np
import pytest

SIZE = 64


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    pixels = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def mask(box=(8, 16, 40, 56), size=SIZE):
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return image


def request(**kw):
    from adapterhub.sample.generator import Request

    kw = {"negative": "blurry", "seed": 11, "sampler": "Euler a", "steps": 4, "width": SIZE, "height": SIZE,
          "denoising_strength": 0.5, "mask_blur": 0, "inpainting_fill": 1, **kw}
    return Request("a red house", **kw)


def embeds(pipe, text):
    return pipe.encode_prompt(text, "cpu", 1, False)[0]
