"""Aspect-ratio buckets exactly as kohya's ``BucketManager`` computes them.

Predefined buckets (``make_bucket_resolutions``): the square ``floor(sqrt(area)/step)*step``, then
for every width from min to max in steps the tallest height within the area, both ways round.
An image goes to its own size if that is a bucket, else to the bucket of least linear aspect-ratio
error; it is scaled to cover the bucket and centre-cropped. With ``no_upscale`` the bucket is made
from the image: shrunk to the area if larger, then floored to the step (crop, never pad).

One rule for ``dataset bucket``, ``dataset prepare`` and ``train``: all three place images with
:class:`Bucketer` and take the default smallest/largest side from :func:`bucket_sides`. An image
whose bucket has a side under one step (a very wide or tall one under ``no_upscale``) is not
usable (:func:`unusable`); each caller reports it instead of training on or writing it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from adapterhub.dataset.config import BucketConfig
from adapterhub.dataset.folder import Dataset, scan
from adapterhub.dataset.images import ImageReadError, image_size
from adapterhub.errors import AdapterhubError


@dataclass(frozen=True)
class Placement:
    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float

    @property
    def crop_ltrb(self) -> tuple[int, int, int, int]:
        """Centre crop of the resized image, as kohya crops it."""
        left = (self.resized[0] - self.bucket[0]) // 2
        top = (self.resized[1] - self.bucket[1]) // 2
        return left, top, left + self.bucket[0], top + self.bucket[1]


def bucket_sides(resolution: int, step: int, min_side: int | None = None,
                 max_side: int | None = None) -> tuple[int, int]:
    """(smallest, largest) bucket side: as given, else kohya's 256 / 1024 at 512 scaled with the
    resolution: half of it floored to the step (at least one step), and twice it."""
    low = min_side if min_side is not None else max(step, (resolution // 2) // step * step)
    high = max_side if max_side is not None else resolution * 2
    return low, high


def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64) -> list[tuple[int, int]]:
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class Bucketer:
    def __init__(self, cfg: BucketConfig):
        low, high = check(cfg)
        self.step = cfg.step
        self.no_upscale = cfg.no_upscale
        self.max_area = cfg.max_reso[0] * cfg.max_reso[1]
        lo, hi = low - low % cfg.step, high + (-high) % cfg.step
        self.resos = make_bucket_resolutions(cfg.max_reso, lo, hi, cfg.step)
        self.reso_set = set(self.resos)
        self.ars = [w / h for w, h in self.resos]

    def round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def place(self, width: int, height: int) -> Placement:
        ar = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self.reso_set:
                errors = [abs(a - ar) for a in self.ars]
                reso = self.resos[errors.index(min(errors))]
            scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            resized = self._shrink(width, height, ar) if width * height > self.max_area else (width, height)
            reso = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return Placement(reso, resized, reso[0] / reso[1] - ar if reso[1] else float("inf"))

    def _shrink(self, width: int, height: int, ar: float) -> tuple[int, int]:
        rw = math.sqrt(self.max_area * ar)
        rh = self.max_area / rw
        bw = self.round_to_steps(rw)
        bh_w = max(self.step, self.round_to_steps(bw / ar))
        bh = self.round_to_steps(rh)
        bw_h = max(self.step, self.round_to_steps(bh * ar))
        # a very wide image's height rounds to 0 (kohya divides by it): only the width rounding is left
        if bh == 0 or abs(bw / bh_w - ar) < abs(bw_h / bh - ar):
            return bw, int(bw / ar + 0.5)
        return int(bh * ar + 0.5), bh


def check(cfg: BucketConfig) -> tuple[int, int]:
    """Reject settings that cannot bucket (one line); returns the (smallest, largest) side."""
    if cfg.step <= 0 or cfg.resolution <= 0 or (cfg.height is not None and cfg.height <= 0):
        raise AdapterhubError("buckets: need --step > 0 and --resolution (and --height) > 0")
    low, high = bucket_sides(cfg.resolution, cfg.step, cfg.min, cfg.max)
    if low <= 0 or high < low:
        raise AdapterhubError(f"buckets: need 0 < --min <= --max (got --min {low}, --max {high})")
    if cfg.max_reso[0] < cfg.step or cfg.max_reso[1] < cfg.step:
        raise AdapterhubError(f"buckets: resolution must be at least the step ({cfg.step})")
    if not cfg.no_upscale and (min(cfg.max_reso) < low or max(cfg.max_reso) > high):
        raise AdapterhubError(f"buckets: resolution {cfg.max_reso} must lie within --min {low} "
                              f"and --max {high}")
    return low, high


def unusable(size: tuple[int, int], placement: Placement, step: int) -> str | None:
    """Why an image cannot be bucketed (a bucket side under one step), or None."""
    if min(placement.bucket) > 0:
        return None
    return f"{size[0]}x{size[1]} is smaller than one step ({step}) on a side after bucketing"


def _placements(ds: Dataset, bucketer: Bucketer):
    placed, failed = [], []
    for item in ds.items:
        try:
            w, h = image_size(item.path)
        except ImageReadError as exc:
            failed.append({"file": item.rel, "problem": str(exc)})
            continue
        placement = bucketer.place(w, h)
        problem = unusable((w, h), placement, bucketer.step)
        if problem:
            failed.append({"file": item.rel, "problem": problem})
        else:
            placed.append((item, (w, h), placement))
    return placed, failed


def bucket_report(cfg: BucketConfig, ds: Dataset | None = None) -> dict:
    """Per-bucket counts (images and images × repeats), the kohya ``ss_bucket_info``, warnings."""
    ds = ds or scan(cfg.dir, cfg.ext)
    bucketer = Bucketer(cfg)
    placed, failed = _placements(ds, bucketer)
    groups = defaultdict(list)
    for item, size, p in placed:
        groups[p.bucket].append((item, size, p))
    buckets = []
    for reso in sorted(groups):
        members = groups[reso]
        buckets.append({"resolution": f"{reso[0]}x{reso[1]}", "aspect": round(reso[0] / reso[1], 3),
                        "images": len(members),
                        "with_repeats": sum(m[0].subset.repeats or 1 for m in members),
                        "upscaled": sum(1 for _, s, p in members if p.resized[0] > s[0])})
    errors = [abs(p.ar_error) for _, _, p in placed]
    warnings = [f"bucket {b['resolution']} holds {b['with_repeats']} image(s), fewer than a batch "
                f"of {cfg.batch_size}" for b in buckets if b["with_repeats"] < cfg.batch_size]
    return {
        "predefined": None if cfg.no_upscale else [f"{w}x{h}" for w, h in bucketer.resos],
        "buckets": buckets,
        "mean_ar_error": sum(errors) / len(errors) if errors else 0.0,
        "images": [{"file": i.rel, "size": list(s), "bucket": list(p.bucket), "resized": list(p.resized),
                    "crop_ltrb": list(p.crop_ltrb)} for i, s, p in placed],
        "unreadable": failed, "warnings": warnings,
        "ss_bucket_info": {"buckets": {i: {"resolution": [int(x) for x in b["resolution"].split("x")],
                                           "count": b["with_repeats"]} for i, b in enumerate(buckets)},
                           "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0},
    }
