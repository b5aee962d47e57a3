"""Write a bucketed copy of a dataset: every image resized to cover its bucket and centre-cropped,
with its caption beside it, in the same folder layout (kohya ``N_class`` names kept)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from PIL import Image

from adapterhub.dataset.buckets import Bucketer
from adapterhub.dataset.config import PrepareConfig
from adapterhub.dataset.folder import Item, encode_caption, scan, write_bytes_atomic
from adapterhub.dataset.images import ImageReadError, load_rgb
from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_path

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _check_out(cfg: PrepareConfig) -> Path:
    if cfg.out is None:
        raise AdapterhubError("prepare: --out is required")
    src, out = Path(cfg.dir).resolve(), Path(cfg.out).resolve()
    if out == src or src in out.parents:
        raise AdapterhubError(f"prepare: --out {cfg.out} must not be inside {cfg.dir}")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise AdapterhubError(f"prepare: {cfg.out} is not empty (use --overwrite)")
    return out


def _target(out: Path, item: Item, fmt: str) -> tuple[Path, str]:
    suffix = item.path.suffix.lower() if fmt == "keep" else "." + fmt
    if suffix not in _FORMATS:
        suffix = ".png"
    return (out / item.rel).with_suffix(suffix), _FORMATS[suffix]


def _resize_crop(im: Image.Image, placement) -> Image.Image:
    if im.size != placement.resized:
        im = im.resize(placement.resized, Image.Resampling.LANCZOS)
    return im.crop(placement.crop_ltrb)


def _save(im: Image.Image, path: Path, fmt: str, quality: int) -> None:
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path, suffix=path.suffix) as tmp:
        im.save(tmp, format=fmt, **options)


def prepare(cfg: PrepareConfig, on_progress: Callable[[int], None] | None = None) -> dict:
    """Returns counts, the files skipped with their reasons, and writes ``OUT/buckets.json``."""
    out = _check_out(cfg)
    ds = scan(cfg.dir, cfg.ext)
    bucketer = Bucketer(replace(cfg, no_upscale=not cfg.upscale))
    written, skipped, records = 0, [], []
    for item in ds.items:
        try:
            im = load_rgb(item.path)
            placement = bucketer.place(*im.size)
            if min(placement.bucket) <= 0:
                raise ImageReadError(f"{im.size[0]}x{im.size[1]} is smaller than one step ({cfg.step})")
            target, fmt = _target(out, item, cfg.format)
            _save(_resize_crop(im, placement), target, fmt, cfg.quality)
        except (ImageReadError, OSError) as exc:
            skipped.append({"file": item.rel, "problem": str(exc)})
        else:
            _copy_caption(item, target.with_suffix(cfg.ext))
            records.append({"file": Path(target).relative_to(out).as_posix(), "source": item.rel,
                            "size": list(im.size), "bucket": list(placement.bucket)})
            written += 1
        if on_progress:
            on_progress(1)
    _copy_folder_files(ds.root, out)
    write_bytes_atomic(out / "buckets.json", json.dumps(records, indent=1).encode())
    return {"out": str(out), "written": written, "skipped": skipped,
            "buckets": sorted({f"{r['bucket'][0]}x{r['bucket'][1]}" for r in records})}


def _copy_caption(item: Item, target: Path) -> None:
    cap = item.caption()
    if cap.exists:
        write_bytes_atomic(target, encode_caption(cap.text))


def _copy_folder_files(src: Path, out: Path) -> None:
    """Dataset-level sidecars (licence notes, READMEs) travel along."""
    for name in ("LICENSES.md", "README.md", "LICENSE"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
