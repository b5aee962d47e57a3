"""The safe fixes of ``validate --fix``: nothing is deleted, every change is journalled."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image, ImageOps

from adapterhub.dataset.folder import TEMP_SUFFIX, Dataset, Item, encode_caption
from adapterhub.dataset.images import to_rgb
from adapterhub.dataset.journal import Journal, state_dir, write_caption
from adapterhub.io import atomic_path

_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def _backup_path(root: Path, journal: Journal, rel: str, area: str) -> Path:
    path = state_dir(root, area, journal.path.stem) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _fix_mode(ds: Dataset, item: Item, journal: Journal) -> bool:
    fmt = _SAVE_FORMATS.get(item.path.suffix.lower())
    if fmt is None:
        return False
    with Image.open(item.path) as im:
        im.load()
        rgb = to_rgb(ImageOps.exif_transpose(im))
    backup = _backup_path(ds.root, journal, item.rel, "originals")
    with atomic_path(item.path, suffix=TEMP_SUFFIX) as tmp:  # a killed fix's leftover is recognisable
        rgb.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        after = tmp.read_bytes()
        shutil.copy2(item.path, backup)
        journal.file(item.path, backup, after)
        journal.flush()
    return True


def _quarantine(ds: Dataset, item: Item, journal: Journal) -> bool:
    moves = [item.path] + ([item.caption_path] if item.caption_path.exists() else [])
    for src in moves:
        dst = _backup_path(ds.root, journal, ds.rel(src), "quarantine")
        journal.move(src, dst)
        journal.flush()
        os.replace(src, dst)
    return True


def _fix_encoding(ds: Dataset, item: Item, journal: Journal) -> bool:
    cap = item.caption()
    write_caption(journal, cap.path, cap.raw, encode_caption(cap.text))
    item.forget_caption()
    return True


_FIXERS = {"odd-mode": _fix_mode, "unreadable": _quarantine, "truncated": _quarantine,
           "caption-encoding": _fix_encoding}


def apply_fixes(ds: Dataset, findings: list) -> int:
    by_rel = {i.rel: i for i in ds.items}
    todo = [f for f in findings if f.fixable and f.check in _FIXERS]
    if not todo:
        return 0
    with Journal(ds.root, "validate --fix", {"fixes": len(todo)}) as journal:
        for f in todo:
            f.fixed = _FIXERS[f.check](ds, by_rel[f.file], journal)
    return sum(1 for f in todo if f.fixed)
