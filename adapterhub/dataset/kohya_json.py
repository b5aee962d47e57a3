"""kohya's fine-tuning metadata (``meta_cap_dd.json``) from a folder's sidecar files.

kohya sd-scripts' fine-tuning reads one JSON object keyed by image: ``{"<key>": {"tags": ...,
"caption": ..., "train_resolution": ...}}``, which its ``merge_dd_tags_to_metadata.py`` (tags from
``.txt``, as the WD tagger writes them) and ``merge_captions_to_metadata.py`` (sentences from
``.caption``) build. :func:`export_metadata` does both in one pass and writes the same JSON: the
key is the image's file stem (kohya's default) or, with ``full_path``, its absolute path; the
entries of an existing file (``in_json``, else ``out`` when it exists, as kohya) are kept, their
``tags`` and ``caption`` replaced where the folder has them. Unlike kohya, an image without a
sidecar is left out rather than failing, and two images with one stem are refused rather than
the later silently replacing the earlier.

:func:`import_metadata` goes back: each entry's ``tags`` and ``caption`` become the image's
sidecars, the image found as kohya's fine-tuning finds it (the key is the image's path, else its
file stem). It holds the folder's writer lock and writes through the undo journal; every key is
resolved and every value checked before the first file is written.

:func:`read_training_metadata` is the same file as a training set (``adapterhub train --dataset
meta.json``): each entry's image and caption found as kohya's fine-tuning dataset finds them.
"""
from __future__ import annotations

import json
from pathlib import Path

from adapterhub.dataset.config import KohyaImportConfig, KohyaJsonConfig
from adapterhub.dataset.folder import IMAGE_EXTS, decode_caption, encode_caption, require_items, scan
from adapterhub.errors import AdapterhubError


def read_metadata(path: Path | None) -> dict:
    """The metadata object in ``path`` ({} for None); anything else is one error naming the file."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterhubError(f"{path}: not readable kohya metadata ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise AdapterhubError(f"{path}: not kohya metadata (an object of per-image objects)")
    return data


def _sidecar(image: Path, ext: str) -> str | None:
    path = image.with_suffix(ext)
    if not path.is_file():
        return None
    # kohya: read_text(encoding="utf-8").strip(); decode_caption also takes BOMs and cp1252
    return decode_caption(path.read_bytes())[0].strip()


def export_metadata(cfg: KohyaJsonConfig) -> dict:
    """Write ``cfg.out`` (atomically, nothing on error); return counts for the report."""
    from adapterhub.io import atomic_path

    ds = scan(cfg.dir)
    require_items(ds)
    out = Path(cfg.out)
    metadata = read_metadata(cfg.in_json or (out if out.is_file() else None))
    before, owners, counts = set(metadata), {}, {"tags": 0, "captions": 0}
    for item in ds.items:
        key = str(item.path.resolve()) if cfg.full_path else item.path.stem
        if key in owners:
            raise AdapterhubError(f"{item.path}: its key {key!r} is also {owners[key]}'s; use --full-path")
        owners[key] = item.rel
        for field, ext, count in (("tags", cfg.tags_ext, "tags"), ("caption", cfg.caption_ext, "captions")):
            text = _sidecar(item.path, ext)
            if text is not None:
                metadata.setdefault(key, {})[field] = text
                counts[count] += 1
    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return {"out": str(out), "images": len(ds.items), **counts, "kept": len(before - set(owners))}


def _image_for(key: str, by_path: dict, by_stem: dict, source: Path) -> Path | None:
    """The image kohya reads for ``key``: the path itself when it exists, else the one image with
    that stem (several is an error: kohya would pick one at random)."""
    path = Path(key).expanduser()
    if path.is_file():
        return by_path.get(path.resolve())
    found = by_stem.get(key, [])
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise AdapterhubError(f"{source}: key {key!r} matches {len(found)} images ({names}); "
                              "write the metadata with --full-path keys")
    return by_path.get(found[0]) if found else None


def _plan(cfg: KohyaImportConfig, metadata: dict, ds) -> tuple[list[tuple[Path, str]], list[str]]:
    """(sidecar path, text) for every field to write, and the keys no image answers to."""
    by_path = {item.path.resolve(): item.path for item in ds.items}
    by_stem: dict[str, list] = {}
    for item in ds.items:
        by_stem.setdefault(item.path.stem, []).append(item.path.resolve())
    writes, missing = [], []
    for key, entry in metadata.items():
        image = _image_for(key, by_path, by_stem, cfg.json_file)
        if image is None:
            missing.append(key)
            continue
        for field, ext in (("tags", cfg.tags_ext), ("caption", cfg.caption_ext)):
            if field not in entry:
                continue
            if not isinstance(entry[field], str):
                raise AdapterhubError(f"{cfg.json_file}: {key!r}: {field} is not text")
            writes.append((image.with_suffix(ext), entry[field].strip()))
    return writes, missing


def import_metadata(cfg: KohyaImportConfig) -> dict:
    """Write the sidecars; return counts and the keys not found."""
    from adapterhub.dataset.journal import Journal, write_caption
    from adapterhub.dataset.lock import dataset_lock

    metadata = read_metadata(cfg.json_file)
    with dataset_lock(cfg.dir, "from-kohya-json"):
        ds = scan(cfg.dir)
        require_items(ds)
        writes, missing = _plan(cfg, metadata, ds)
        report = {"written": 0, "unchanged": 0, "skipped": 0, "not_found": missing}
        with Journal(cfg.dir, "from-kohya-json", {"json": str(cfg.json_file)}) as journal:
            for path, text in writes:
                before = path.read_bytes() if path.is_file() else None
                after = encode_caption(text)
                if before is not None and cfg.mode == "skip":
                    report["skipped"] += 1
                elif before == after:
                    report["unchanged"] += 1
                else:
                    write_caption(journal, path, before, after)
                    report["written"] += 1
    return report


# -- the metadata as a training set ------------------------------------------------------------------
def fine_tuning_caption(entry: dict) -> str:
    """The caption kohya's fine-tuning dataset trains an entry with: ``caption``, then ``", "`` and
    ``tags`` when both are there (and the tags are not empty); ``tags`` alone without a caption;
    else empty."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        caption = tags
    elif tags:
        caption = f"{caption}, {tags}"
    return (caption or "").strip()


def _training_image(key: str, image_dir: Path, source: Path) -> Path | None:
    """The image of ``key`` as kohya's fine-tuning finds it: the key as a path (absolute, or here
    relative to ``image_dir`` rather than to the working directory), else the key plus an image
    extension in ``image_dir`` (kohya's ``glob_images``). Several images for one key (``cat.png``
    and ``cat.jpg``) is an error: kohya would take whichever its glob lists first."""
    base = image_dir / Path(key).expanduser()
    if base.is_file() and base.suffix.lower() in IMAGE_EXTS:
        return base
    found = {}
    for ext in sorted(IMAGE_EXTS):
        for candidate in (base.with_name(base.name + ext), base.with_name(base.name + ext.upper())):
            if candidate.is_file():
                found.setdefault(candidate.resolve(), candidate)  # one file, on a case-blind disk
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found.values()))
        raise AdapterhubError(f"{source}: key {key!r} matches {len(found)} images in {base.parent} ({names}); "
                              "name the file in the key")
    return next(iter(found.values()), None)


def read_training_metadata(path: Path, image_dir: Path) -> list[tuple[str, Path, str]]:
    """``(key, image, caption)`` per entry of the metadata JSON ``path``, in the file's order, with
    images resolved in ``image_dir`` (kohya's ``--train_data_dir``) and captions by
    :func:`fine_tuning_caption`. A file that is not metadata, a value that is not text, or a key no
    image answers to is an error naming the file, before anything is trained. (kohya's fallback to a
    cached ``.npz`` latent without its image is not followed: the image is needed.)"""
    path = Path(path)
    metadata = read_metadata(path)
    if not metadata:
        raise AdapterhubError(f"{path}: no entries (kohya metadata maps each image to its caption and tags)")
    if not Path(image_dir).is_dir():
        raise AdapterhubError(f"{image_dir}: no such folder (the images of {path})")
    entries, missing = [], []
    for key, entry in metadata.items():
        for field in ("caption", "tags"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise AdapterhubError(f"{path}: {key!r}: {field} is not text")
        image = _training_image(key, Path(image_dir), path)
        if image is None:
            missing.append(key)
        else:
            entries.append((key, image, fine_tuning_caption(entry)))
    if missing:
        raise AdapterhubError(f"{path}: {len(missing)} of {len(metadata)} entries have no image in {image_dir} "
                              f"(first: {missing[0]!r}); give the images' folder with --train-data-dir")
    return entries
