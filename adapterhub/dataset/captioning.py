"""The captioning runner: any registered captioner over a dataset folder, batched and resumable.

A captioner (registered through the hook ``adapterhub_captioners``) is an object with

* ``name``: unique, used by ``--captioner``;
* ``caption(images, options) -> list[str | list[str]]``: one caption (a sentence) or tag list per
  image. ``options`` is the :class:`CaptionConfig` with ``device``, ``precision`` and
  ``cache_dir`` resolved;
* optionally ``load(options)``: load the model once, before the first batch;
* optionally ``transform(options) -> callable``: per-image preprocessing (PIL RGB image in, any
  object out) run in the data-loading workers, so that decoding and resizing overlap the model;
  ``caption`` then receives the transformed objects instead of PIL images.

The run holds the folder's writer lock (:mod:`adapterhub.dataset.lock`) from reading the captions
to writing the last one.

Resuming: after each batch the finished images are appended to
``DIR/.adapterhub/caption-progress/<run fingerprint>.jsonl``; a rerun with the same settings skips
them (``--mode skip`` also skips every image that already has a caption). Under
``accelerate launch`` each process takes every WORLD_SIZE-th image, starting at its RANK.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from adapterhub.dataset.config import CaptionConfig
from adapterhub.dataset.folder import Item, encode_caption, join_tags, scan
from adapterhub.dataset.images import ImageReadError, load_rgb
from adapterhub.dataset.journal import Journal, state_dir, write_caption
from adapterhub.dataset.lock import dataset_lock
from adapterhub.dataset.tags import add
from adapterhub.errors import AdapterhubError

_FINGERPRINT_FIELDS = ("captioner", "model", "pretrained", "vocab", "top_k", "threshold", "mode",
                       "prompt", "max_length", "num_beams", "ext", "seed",
                       # the wd tagger's
                       "character_threshold", "mcut", "rating", "character_tags_first", "always_first_tags",
                       "undesired_tags", "remove_underscore", "escape_parens", "caption_separator",
                       "character_tag_expand", "tag_replacement", "tagger")


@dataclass
class CaptionReport:
    captioned: int = 0
    skipped: int = 0
    resumed: int = 0
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    loader_wait_s: float = 0.0
    model_s: float = 0.0
    loop_s: float = 0.0
    device: str = "cpu"
    shard: str = "1/1"

    def as_dict(self) -> dict:
        rate = self.captioned / self.seconds if self.seconds else 0.0
        loop_rate = self.captioned / self.loop_s if self.loop_s else 0.0
        idle = 1 - self.model_s / self.loop_s if self.loop_s else 0.0
        return {**asdict(self), "images_per_s": round(rate, 2), "loop_images_per_s": round(loop_rate, 2),
                "model_idle_share": round(idle, 3)}


def get_captioner(name: str):
    from adapterhub.plugins import captioners

    found = captioners()
    if name not in found:
        raise AdapterhubError(f"unknown captioner {name!r}; registered: {', '.join(sorted(found)) or 'none'}")
    return found[name]


def shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables ``accelerate launch`` / torchrun set."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return int(env.get("RANK", "0")) if world > 1 else 0, world, int(env.get("LOCAL_RANK", "0"))


def resolve_options(cfg: CaptionConfig) -> CaptionConfig:
    import torch

    device = cfg.device
    if device == "auto":
        device = f"cuda:{shard()[2]}" if torch.cuda.is_available() else "cpu"
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    cache = cfg.cache_dir or Path(os.environ.get("ADAPTERHUB_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapterhub")
    return replace(cfg, device=device, precision=precision, cache_dir=Path(cache))


def fingerprint(cfg: CaptionConfig) -> str:
    data = {k: getattr(cfg, k) for k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
    """The resume record of one run (one file per process)."""

    def __init__(self, cfg: CaptionConfig, rank: int, world: int):
        name = fingerprint(cfg) + (f"-{rank}of{world}" if world > 1 else "") + ".jsonl"
        self.path = state_dir(cfg.dir, "caption-progress") / name
        if cfg.restart:
            self.path.unlink(missing_ok=True)
        self.done = set()
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    self.done.add(json.loads(line))
                except json.JSONDecodeError:
                    continue

    def record(self, rels: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rels))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


class _ImageSet:
    """Map-style dataset for the DataLoader: (index, transformed image or None, error)."""

    def __init__(self, items: list[Item], transform: Callable | None):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            im = load_rgb(self.items[i].path)
            return i, (self.transform(im) if self.transform else im), None
        except ImageReadError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a transform failing on one image skips that image
            return i, None, f"{exc.__class__.__name__}: {exc}"


def _collate(batch):
    return batch


def compose(existing: str, exists: bool, result, mode: str, cap) -> str:
    """The new caption text for one image from the captioner's ``result``."""
    if isinstance(result, (list, tuple)):
        new_tags = [str(t).strip() for t in result if str(t).strip()]
        if mode == "append" and exists and existing.strip():
            return cap.with_tags(add(cap.tags, new_tags))
        return cap.with_tags(new_tags) if exists else join_tags(new_tags)
    line = str(result).strip()
    if mode == "append" and exists and existing.strip():
        first = cap.first_line
        if line.lower() in first.lower():
            return cap.text
        return cap.with_first_line(f"{first}, {line}" if first else line)
    return cap.with_first_line(line) if exists else line


def _select(cfg: CaptionConfig, items: list[Item], progress: _Progress, report: CaptionReport):
    todo = []
    for item in items:
        if item.rel in progress.done:
            report.resumed += 1
        elif cfg.mode == "skip" and item.caption().text.strip():
            report.skipped += 1
        else:
            todo.append(item)
    return todo


def _loader(todo: list[Item], transform, cfg: CaptionConfig, pin: bool):
    import torch

    workers = cfg.num_workers
    if workers < 0:
        workers = 0 if len(todo) < 2 * cfg.batch_size else min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        _ImageSet(todo, transform), batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=pin, persistent_workers=False,
        prefetch_factor=4 if workers else None)


def _write_batch(cfg, journal, progress, todo, batch, results, report) -> None:
    done = []
    for (i, _, _), result in zip(batch, results):
        item = todo[i]
        cap = item.caption()
        text = compose(cap.text, cap.exists, result, cfg.mode, cap)
        data = encode_caption(text)
        if data != cap.raw:
            write_caption(journal, cap.path, cap.raw, data)
        item.forget_caption()
        done.append(item.rel)
    progress.record(done)
    report.captioned += len(done)


def run_captioning(cfg: CaptionConfig, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Caption the folder; ``on_progress(done, total)`` after every batch. Returns the report."""
    if cfg.batch_size < 1:
        raise AdapterhubError("--batch-size must be at least 1")
    captioner = get_captioner(cfg.captioner)
    options = resolve_options(cfg)
    rank, world, _ = shard()
    # the shards of one launch write disjoint images: they share the lock, and exclude other writers
    with dataset_lock(cfg.dir, f"caption {cfg.captioner}", shared=world > 1):
        return _caption_folder(cfg, options, captioner, rank, world, on_progress)


def _caption_folder(cfg, options, captioner, rank, world, on_progress) -> dict:
    ds = scan(cfg.dir, cfg.ext)
    report = CaptionReport(device=options.device, shard=f"{rank + 1}/{world}")
    progress = _Progress(cfg, rank, world)
    todo = _select(cfg, ds.items[rank::world], progress, report)
    if not todo:
        progress.finish()
        return report.as_dict()
    start = time.perf_counter()
    if hasattr(captioner, "load"):
        captioner.load(options)
    transform = captioner.transform(options) if hasattr(captioner, "transform") else None
    details = {"captioner": cfg.captioner, "model": cfg.model, "mode": cfg.mode}
    with Journal(cfg.dir, f"caption {cfg.captioner}", details) as journal:
        _run_batches(cfg, options, captioner, journal, progress, todo, transform, report, on_progress)
    report.seconds = time.perf_counter() - start
    progress.finish()
    return report.as_dict()


def _run_batches(cfg, options, captioner, journal, progress, todo, transform, report, on_progress):
    """``model_s`` is time inside the captioner; the rest of ``loop_s`` the model sat idle
    (waiting for the loader, writing captions)."""
    tick = loop_start = time.perf_counter()
    for batch in _loader(todo, transform, cfg, pin=str(options.device).startswith("cuda")):
        now = time.perf_counter()
        report.loader_wait_s += now - tick
        ok = [b for b in batch if b[2] is None]
        report.failed += [{"file": todo[i].rel, "problem": err} for i, _, err in batch if err]
        results = captioner.caption([obj for _, obj, _ in ok], options) if ok else []
        if len(results) != len(ok):
            raise AdapterhubError(f"captioner {cfg.captioner} returned {len(results)} captions for "
                                  f"{len(ok)} images")
        tick = time.perf_counter()
        report.model_s += tick - now
        _write_batch(cfg, journal, progress, todo, ok, results, report)
        if on_progress:
            on_progress(len(batch), len(todo))
        tick = time.perf_counter()
        report.loop_s = tick - loop_start
