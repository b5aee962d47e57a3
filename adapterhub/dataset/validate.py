"""Dataset checks and the safe fixes.

Every image is decoded once (in threads): unreadable or truncated files, too small, odd modes
(CMYK, palette, alpha, 16-bit), oversized files, a content type that does not match the extension,
exact (SHA-256) and near (64-bit DCT perceptual hash) duplicates. Captions: missing, empty, not
UTF-8, and orphans. Safe fixes: odd modes are converted to RGB (alpha on white) and non-UTF-8
captions re-encoded, originals kept under ``DIR/.adapterhub/originals``; unreadable images are
moved with their captions to ``DIR/.adapterhub/quarantine``. Fixes are journalled (``undo``).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from adapterhub.dataset.config import ValidateConfig
from adapterhub.dataset.folder import Dataset, Item, scan
from adapterhub.hashes import sha256_file

ODD_MODES = {"CMYK": "CMYK", "P": "palette", "PA": "palette with alpha", "RGBA": "alpha",
             "LA": "alpha", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit int",
             "F": "float", "YCbCr": "YCbCr", "LAB": "LAB", "1": "1-bit"}
_FORMAT_EXTS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}, "WEBP": {".webp"}, "GIF": {".gif"},
                "BMP": {".bmp"}, "TIFF": {".tif", ".tiff"}}
ERRORS = {"unreadable", "truncated", "missing-caption", "empty-caption", "duplicate"}


@dataclass
class Finding:
    file: str
    check: str
    message: str
    fixable: bool = False
    fixed: bool = False

    @property
    def severity(self) -> str:
        return "error" if self.check in ERRORS else "warning"

    def row(self) -> dict:
        return {**asdict(self), "severity": self.severity}


@dataclass
class ImageFacts:
    item: Item
    size: tuple[int, int] | None = None
    mode: str | None = None
    format: str | None = None
    has_alpha: bool = False
    sha256: str | None = None
    phash: int | None = None
    problem: str | None = None  # "unreadable" | "truncated"
    detail: str = ""


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    m[0] /= np.sqrt(2)
    return m * np.sqrt(2 / n)


_DCT32 = _dct_matrix(32)


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash: 32×32 grey, 2-D DCT, the 8×8 low frequencies against their median."""
    grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def _inspect(item: Item) -> ImageFacts:
    facts = ImageFacts(item)
    try:
        facts.sha256 = sha256_file(item.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(item.path) as im:
                facts.format, facts.mode = im.format, im.mode
                facts.has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                im.load()
                im = ImageOps.exif_transpose(im)
                facts.size = im.size
                facts.phash = phash(im)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is reported, never raised
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        facts.problem = "truncated" if "truncated" in text.lower() else "unreadable"
        facts.detail = text.replace(f"'{item.path}'", f"'{item.path.name}'")[:200]
    return facts


def _image_findings(f: ImageFacts, cfg: ValidateConfig) -> list[Finding]:
    rel = f.item.rel
    if f.problem:
        return [Finding(rel, f.problem, f.detail, fixable=True)]
    out = []
    w, h = f.size
    if min(w, h) < cfg.min_side:
        out.append(Finding(rel, "too-small", f"{w}x{h}, shorter side < {cfg.min_side}"))
    if f.mode in ODD_MODES or f.has_alpha:
        kind = ODD_MODES.get(f.mode, "transparency")
        out.append(Finding(rel, "odd-mode", f"mode {f.mode} ({kind})", fixable=True))
    mb = f.item.path.stat().st_size / 2**20
    if mb > cfg.max_file_mb or w * h > cfg.max_megapixels * 1e6:
        out.append(Finding(rel, "oversized", f"{mb:.1f} MB, {w * h / 1e6:.1f} MP"))
    expected = _FORMAT_EXTS.get(f.format or "")
    if expected and f.item.path.suffix.lower() not in expected:
        out.append(Finding(rel, "wrong-extension", f"{f.format} data in a {f.item.path.suffix} file"))
    return out


def _caption_findings(item: Item) -> list[Finding]:
    cap = item.caption()
    if not cap.exists:
        return [Finding(item.rel, "missing-caption", f"no {item.caption_path.suffix} beside it")]
    out = []
    if cap.encoding != "utf-8":
        out.append(Finding(item.rel, "caption-encoding",
                           f"{cap.path.name} is not UTF-8 (read as {cap.encoding})", fixable=True))
    if not cap.text.strip():
        out.append(Finding(item.rel, "empty-caption", f"{cap.path.name} is empty"))
    return out


def _duplicate_findings(facts: list[ImageFacts], max_distance: int) -> list[Finding]:
    out, first_by_sha = [], {}
    for f in facts:
        if f.sha256 and not f.problem:
            if f.sha256 in first_by_sha:
                out.append(Finding(f.item.rel, "duplicate", f"same bytes as {first_by_sha[f.sha256]}"))
            else:
                first_by_sha[f.sha256] = f.item.rel
    unique = [f for f in facts if f.phash is not None and first_by_sha.get(f.sha256) == f.item.rel]
    if len(unique) < 2 or max_distance < 0:
        return out
    hashes = np.array([f.phash for f in unique], dtype=np.uint64)
    reported: set[int] = set()
    for i in range(len(unique) - 1):
        if i in reported:
            continue  # each image is reported once, against the first image it resembles
        x = np.bitwise_xor(hashes[i + 1:], hashes[i])
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.nonzero(dist <= max_distance)[0]:
            if i + 1 + j not in reported:
                reported.add(i + 1 + j)
                out.append(Finding(unique[i + 1 + j].item.rel, "near-duplicate",
                                   f"looks like {unique[i].item.rel} (distance {int(dist[j])})"))
    return out


def check(cfg: ValidateConfig, ds: Dataset | None = None, on_progress=None) -> tuple[Dataset, list, list]:
    """(dataset, findings, facts); nothing is changed."""
    ds = ds or scan(cfg.dir, cfg.ext)
    workers = cfg.workers or None
    facts = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in pool.map(_inspect, ds.items):
            facts.append(f)
            if on_progress:
                on_progress(1)
    findings = []
    for f in facts:
        findings += _image_findings(f, cfg)
        findings += [] if f.problem else _caption_findings(f.item)
    findings += _duplicate_findings(facts, cfg.near_distance)
    findings += [Finding(ds.rel(p), "orphan-caption", "caption without an image") for p in ds.orphan_captions]
    return ds, findings, facts


def validate(cfg: ValidateConfig, on_progress=None) -> dict:
    """Check, then (with ``fix``) apply the safe fixes; ``ok`` is False when problems remain."""
    from adapterhub.dataset.fixes import apply_fixes
    from adapterhub.dataset.lock import dataset_lock

    if cfg.fix:  # the checks the fixes act on must see the files the fixes change: one lock for both
        with dataset_lock(cfg.dir, "validate --fix"):
            ds, findings, _ = check(cfg, on_progress=on_progress)
            apply_fixes(ds, findings)
    else:
        ds, findings, _ = check(cfg, on_progress=on_progress)
    open_ = [f for f in findings if not f.fixed]
    return {"images": len(ds.items), "findings": [f.row() for f in findings],
            "errors": sum(1 for f in open_ if f.severity == "error"),
            "warnings": sum(1 for f in open_ if f.severity == "warning"),
            "fixed": sum(1 for f in findings if f.fixed), "ok": not open_}
