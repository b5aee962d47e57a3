"""Conditioning images for ControlNet and T2I-Adapter training.

Two sources, chosen by ``--conditioning``:

* ``sidecar`` (default): beside ``photo.png`` lies ``photo.cond.png`` (any image extension; the
  ``.cond`` part is ``--cond-suffix``), the control image the model learns to follow: an edge map,
  a depth map, a pose skeleton. Sidecars are never training images themselves (the dataset scan
  drops an image whose name is another image's stem plus the suffix).
* ``canny``: the conditioning is computed from the image itself with the canny preprocessor
  (:func:`adapterhub.preprocessors.canny`: scikit-image's detector, thresholds on the 0-255 scale),
  white edges on black, three channels.

Either way the conditioning image is resized (Lanczos) and cropped exactly as its training image was
for its bucket (:func:`adapterhub.train.data.pixels`), so pixels line up with the latents and a Canny
map is computed from the very pixels the VAE encoded; values are in [0, 1], shape (3, h, w), as the
diffusers ControlNet / T2I-Adapter pipelines feed them. :func:`check` refuses, before any training,
an image without a sidecar, an unreadable sidecar and one whose aspect ratio is not its image's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.dataset.folder import IMAGE_EXTS
from adapterhub.dataset.images import ImageReadError, image_size, load_rgb
from adapterhub.errors import AdapterhubError
from adapterhub.preprocessors import canny

# a sidecar may differ from its image's aspect ratio by this fraction (rounding of a rescaled copy)
ASPECT_TOLERANCE = 0.02


def sidecar_of(image: Path, suffix: str) -> Path | None:
    """The conditioning sidecar of ``image`` (``STEM + suffix + any image extension``), or None."""
    image = Path(image)
    for ext in sorted(IMAGE_EXTS):
        for candidate in (image.with_name(image.stem + suffix + ext), image.with_name(image.stem + suffix + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def is_sidecar(path: Path, suffix: str) -> bool:
    """Whether ``path`` is another image's conditioning sidecar (``x.cond.png`` beside ``x.png``)."""
    path = Path(path)
    if not suffix or not path.stem.endswith(suffix):
        return False
    stem = path.stem[: -len(suffix)]
    return any(path.with_name(stem + ext).is_file() or path.with_name(stem + ext.upper()).is_file()
               for ext in IMAGE_EXTS)


def check(samples, cfg) -> None:
    """Fail before training when a sample has no usable sidecar: one line naming the first such image
    (missing), or the sidecar (unreadable, or another aspect ratio than its image's)."""
    if cfg.conditioning != "sidecar":
        return
    missing = [s for s in samples if sidecar_of(s.path, cfg.cond_suffix) is None]
    if missing:
        first = missing[0]
        raise AdapterhubError(f"{first.path}: no conditioning image ({first.path.stem}{cfg.cond_suffix}.png beside "
                              f"it; {len(missing)} of {len(samples)} images lack one); write sidecars or pass "
                              "--conditioning canny")
    for sample in samples:
        path = sidecar_of(sample.path, cfg.cond_suffix)
        try:
            width, height = image_size(path)
        except ImageReadError as exc:
            raise AdapterhubError(f"{path}: unreadable conditioning image: {exc}") from None
        w, h = sample.size
        if abs(width * h - height * w) > ASPECT_TOLERANCE * w * height:
            raise AdapterhubError(f"{path}: conditioning image is {width}x{height}, its image {sample.path.name} is "
                                  f"{w}x{h}; a sidecar must have its image's aspect ratio (it is resized and "
                                  "cropped the same way)")


def fit_to_bucket(image, sample):
    """``image`` resized to the sample's ``resized`` size and cropped to its bucket, as the training
    image itself (``adapterhub.train.data.pixels``: Lanczos, then the bucket crop)."""
    from PIL import Image

    if image.size != tuple(sample.resized):
        image = image.resize(tuple(sample.resized), Image.LANCZOS)
    return image.crop(tuple(sample.crop))


def condition_image(sample, cfg):
    """The sample's conditioning image as a PIL image at the sample's resized-and-cropped bucket size."""
    if cfg.conditioning == "sidecar":
        path = sidecar_of(sample.path, cfg.cond_suffix)
        if path is None:
            raise AdapterhubError(f"{sample.path}: no conditioning image")
        try:
            return fit_to_bucket(load_rgb(path), sample)
        except ImageReadError as exc:
            raise AdapterhubError(f"{path}: unreadable conditioning image: {exc}") from None
    cached = _cache_file(sample, cfg)
    if cached is not None and cached.is_file():
        from PIL import Image

        try:
            with Image.open(cached) as im:
                return im.convert("RGB")
        except OSError:
            pass  # a damaged cache entry is recomputed
    try:
        image = fit_to_bucket(load_rgb(sample.path), sample)
    except ImageReadError as exc:
        raise AdapterhubError(f"{sample.path}: unreadable image: {exc}") from None
    edges = canny(image, cfg.canny_low, cfg.canny_high)
    if cached is not None:
        from adapterhub.io import atomic_path

        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached, suffix=".png") as tmp:
            edges.save(tmp, format="PNG")
    return edges


def _cache_file(sample, cfg) -> Path | None:
    """Where a preprocessed conditioning image is kept (beside the latent cache): computed once per
    (image file, bucket, crop, preprocessor settings) instead of every step."""
    import hashlib
    import json

    try:
        stat = Path(sample.path).stat()
    except OSError:
        return None
    if cfg.cache_dir:
        root = Path(cfg.cache_dir)
    else:
        from adapterhub.base import cache_dir

        root = cache_dir() / "latents"
    key = hashlib.sha256(json.dumps([str(Path(sample.path).resolve()), stat.st_mtime_ns, stat.st_size,
                                     list(sample.bucket), list(sample.resized), list(sample.crop), cfg.conditioning,
                                     cfg.canny_low, cfg.canny_high]).encode()).hexdigest()
    return root / "conditioning" / key[:2] / f"{key}.png"


def condition_batch(samples, cfg) -> torch.Tensor:
    """(B, 3, h, w) float conditioning in [0, 1] for a batch of one bucket."""
    import numpy as np

    arrays = [np.asarray(condition_image(s, cfg), dtype=np.float32) / 255.0 for s in samples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
