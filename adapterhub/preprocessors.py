"""Control-image preprocessors: a photo to the map a control model (ControlNet, T2I-Adapter) follows.

Core, below the services that use them: training computes its conditioning images with them
(``--conditioning canny``) and the server runs them on a unit's image (``module``). Each takes and returns a
PIL image; the map is white on black, three channels, the photo's size.
"""
from __future__ import annotations

from adapterhub.errors import AdapterhubError


def canny(image, low: float, high: float):
    """White-on-black Canny edges of a PIL image, as an RGB PIL image: scikit-image's detector (sigma 1) with
    the thresholds on the 0-255 scale, as OpenCV's and the ControlNet annotators' are."""
    import numpy as np
    from PIL import Image

    try:
        from skimage.feature import canny as sk_canny
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        raise AdapterhubError("the canny preprocessor needs scikit-image (pip install scikit-image)") from None
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = sk_canny(gray, sigma=1.0, low_threshold=float(low), high_threshold=float(high))
    array = (edges.astype(np.uint8) * 255)[..., None].repeat(3, axis=2)
    return Image.fromarray(array, "RGB")
