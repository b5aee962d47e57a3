"""A dataset folder: images, their sidecar captions, and kohya's ``N_class tokens`` subfolders.

Captions are read as bytes and decoded strictly as UTF-8 (a BOM is dropped); a file that is not
UTF-8 is decoded as cp1252 (or latin-1) and flagged, never rejected, so one bad file cannot stop a
run. Writes are atomic and always UTF-8. Tags are the comma-separated parts of the first line;
other lines are kept as they are.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.dataset.config import CAPTION_EXTS
from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_path

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jxl", ".avif"}
STATE_DIR = ".adapterhub"
# Every atomic write inside a dataset folder names its temp file ``.NAME.RANDOM`` + this suffix, so
# that the leftovers of a killed write are recognisable (``lock.clean_temp_files``) and nothing
# else is ever removed.
TEMP_SUFFIX = ".adapterhub-tmp"
_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Subset:
    """One folder of images; ``repeats`` and ``class_tokens`` come from a kohya ``N_tokens`` name."""

    rel: str
    repeats: int | None = None
    class_tokens: str | None = None

    @classmethod
    def from_name(cls, rel: str) -> "Subset":
        m = _KOHYA_DIR.match(Path(rel).name) if rel else None
        if m:
            return cls(rel, int(m.group(1)), m.group(2).strip())
        return cls(rel)


@dataclass
class Caption:
    """A caption file's text. ``raw`` is the exact bytes read (``None``: no file)."""

    path: Path
    raw: bytes | None
    text: str = ""
    encoding: str = "utf-8"

    @property
    def exists(self) -> bool:
        return self.raw is not None

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def tags(self) -> list[str]:
        return split_tags(self.first_line)

    def with_tags(self, tags: list[str]) -> str:
        """The full new text: the first line replaced by ``tags``, other lines kept."""
        return self.with_first_line(join_tags(tags))

    def with_first_line(self, line: str) -> str:
        rest = self.text.split("\n", 1)[1] if "\n" in self.text else None
        return line if rest is None else f"{line}\n{rest}"


@dataclass
class Item:
    """One image and the caption file that belongs to it (existing or to be written)."""

    path: Path
    rel: str
    subset: Subset
    caption_path: Path
    caption_found: bool = False
    _caption: Caption | None = field(default=None, repr=False)

    def caption(self) -> Caption:
        if self._caption is None:
            self._caption = read_caption(self.caption_path)
        return self._caption

    def forget_caption(self) -> None:
        self._caption = None


@dataclass
class Dataset:
    root: Path
    items: list[Item]
    orphan_captions: list[Path]
    subsets: dict[str, Subset]
    ext: str = ".txt"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def split_tags(line: str) -> list[str]:
    return [t.strip() for t in line.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def norm_tag(tag: str) -> str:
    """The form tags are compared in: trimmed, inner spaces collapsed, lower-cased."""
    return " ".join(tag.split()).lower()


def decode_caption(raw: bytes) -> tuple[str, str]:
    """(text, encoding); strict UTF-8 first, then cp1252, then latin-1 (never fails)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for enc in ("utf-8", "cp1252", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return text, enc


def read_caption(path: Path) -> Caption:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Caption(path, None)
    text, enc = decode_caption(raw)
    return Caption(path, raw, text, enc)


def encode_caption(text: str) -> bytes:
    return (text.rstrip("\n") + "\n").encode("utf-8") if text.strip() else b""


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, rename over ``path``. A symlink at
    ``path`` is replaced by the file (what it points to is not changed)."""
    with atomic_path(path, suffix=TEMP_SUFFIX) as tmp:
        tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _find_caption(image: Path, ext: str) -> tuple[Path, bool]:
    for e in (ext, *CAPTION_EXTS):
        candidate = image.with_suffix(e)
        if candidate.is_file():
            return candidate, True
    return image.with_suffix(ext), False


def scan(root: str | os.PathLike, ext: str = ".txt") -> Dataset:
    """Walk ``root`` (hidden folders, ``.adapterhub`` included, are skipped), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise AdapterhubError(f"{root}: not a folder")
    items, captions_seen, all_captions, subsets = [], set(), [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        subset = Subset.from_name(rel_dir or root.resolve().name)
        subset = Subset(rel_dir, subset.repeats, subset.class_tokens)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            suffix = path.suffix.lower()
            if suffix in CAPTION_EXTS or suffix == ext:
                all_captions.append(path)
            elif suffix in IMAGE_EXTS:
                cap, found = _find_caption(path, ext)
                captions_seen.add(cap)
                subsets.setdefault(rel_dir, subset)
                items.append(Item(path, path.relative_to(root).as_posix(), subset, cap, found))
    orphans = [c for c in all_captions if c not in captions_seen
               and not any(c.with_suffix(e).exists() for e in IMAGE_EXTS)]
    return Dataset(root, items, orphans, subsets, ext)


def require_items(ds: Dataset) -> None:
    if not ds.items:
        raise AdapterhubError(f"{ds.root}: no images found ({', '.join(sorted(IMAGE_EXTS))})")
