"""Write a bucketed copy of a dataset: every image resized to cover its bucket and centre-cropped,
with its caption beside it, in the same folder layout (kohya ``N_class`` names kept).

The buckets are the ones ``dataset bucket`` reports and ``train`` uses for the same flags (one
:class:`~adapterhub.dataset.buckets.Bucketer`, one set of defaults). The flags are checked before
anything is written, and the copy is built in a hidden staging folder beside ``--out`` that takes
its place only when every image is written: a failure leaves no output folder (or, with
``--overwrite``, the old one as it was).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from adapterhub.dataset.buckets import Bucketer, unusable
from adapterhub.dataset.config import PrepareConfig
from adapterhub.dataset.folder import Item, encode_caption, scan, write_bytes_atomic
from adapterhub.dataset.images import ImageReadError, load_rgb
from adapterhub.errors import AdapterhubError

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _check(cfg: PrepareConfig) -> tuple[Path, Bucketer]:
    """Every flag, before anything is written: the output folder and the bucket settings."""
    if cfg.out is None:
        raise AdapterhubError("prepare: --out is required")
    if not 1 <= cfg.quality <= 100:
        raise AdapterhubError(f"prepare: --quality must be 1 to 100 (got {cfg.quality})")
    bucketer = Bucketer(cfg)
    src, out = Path(cfg.dir).resolve(), Path(cfg.out).resolve()
    if out == src or src in out.parents:
        raise AdapterhubError(f"prepare: --out {cfg.out} must not be inside {cfg.dir}")
    if out.exists() and not out.is_dir():
        raise AdapterhubError(f"prepare: --out {cfg.out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise AdapterhubError(f"prepare: {cfg.out} is not empty (use --overwrite)")
    return out, bucketer


_STAGING = ".adapterhub-staging"


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to build in (``.OUT.PID.RANDOM.adapterhub-staging``); published
    into ``out`` only if the block succeeds. The staging folders of killed runs are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=_STAGING, dir=out.parent))
    try:
        yield stage
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_dead_staging(out: Path) -> None:
    # only a folder whose process is gone: a prepare running beside us into the same OUT keeps its own
    for stage in out.parent.glob(f".{glob.escape(out.name)}.*{_STAGING}"):
        pid = stage.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: no cheap check, keep the folder
        return True
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours (PermissionError): keep it
        return True
    return True


def _publish(stage: Path, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.replace(stage, out)  # one rename: the whole copy appears at once
        return
    for src in sorted(stage.rglob("*")):  # --overwrite: renames into the old folder, nothing rewritten
        dst = out / src.relative_to(stage)
        if src.is_dir():
            dst.mkdir(exist_ok=True)
        else:
            os.replace(src, dst)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **options)


def prepare(cfg: PrepareConfig, on_progress: Callable[[int], None] | None = None) -> dict:
    """Returns counts, the files skipped with their reasons, and writes ``OUT/buckets.json``.

    Unreadable images and images too small to bucket are skipped and reported; a file that cannot
    be written stops the run (:class:`AdapterhubError`, nothing published)."""
    out, bucketer = _check(cfg)
    ds = scan(cfg.dir, cfg.ext)
    skipped, records = [], []
    with _staged(out) as stage:
        for item in ds.items:
            record = _prepare_one(cfg, bucketer, item, stage, skipped)
            if record:
                records.append(record)
            if on_progress:
                on_progress(1)
        _copy_folder_files(ds.root, stage)
        write_bytes_atomic(stage / "buckets.json", json.dumps(records, indent=1).encode())
    return {"out": str(out), "written": len(records), "skipped": skipped,
            "buckets": sorted({f"{r['bucket'][0]}x{r['bucket'][1]}" for r in records})}


def _prepare_one(cfg: PrepareConfig, bucketer: Bucketer, item: Item, stage: Path, skipped: list) -> dict | None:
    try:
        im = load_rgb(item.path)
    except ImageReadError as exc:
        skipped.append({"file": item.rel, "problem": str(exc)})
        return None
    placement = bucketer.place(*im.size)
    problem = unusable(im.size, placement, cfg.step)
    if problem:
        skipped.append({"file": item.rel, "problem": problem})
        return None
    target, fmt = _target(stage, item, cfg.format)
    try:
        _save(_resize_crop(im, placement), target, fmt, cfg.quality)
        _copy_caption(item, target.with_suffix(cfg.ext))
    except OSError as exc:
        raise AdapterhubError(f"prepare: cannot write {item.rel} to {cfg.out}: "
                              f"{exc.strerror or exc}; nothing was written") from None
    return {"file": target.relative_to(stage).as_posix(), "source": item.rel,
            "size": list(im.size), "bucket": list(placement.bucket)}


def _copy_caption(item: Item, target: Path) -> None:
    cap = item.caption()
    if cap.exists:
        target.write_bytes(encode_caption(cap.text))


def _copy_folder_files(src: Path, out: Path) -> None:
    """Dataset-level sidecars (licence notes, READMEs) travel along."""
    for name in ("LICENSES.md", "README.md", "LICENSE"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
