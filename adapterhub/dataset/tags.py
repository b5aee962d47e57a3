"""Batch tag edits: plan (a preview of every change), then apply through the undo journal.

Tags compare case-insensitively with whitespace collapsed (``norm_tag``); what is written keeps
the spelling the user typed or the caption had.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from adapterhub.dataset.config import TagEditConfig
from adapterhub.dataset.folder import Dataset, Item, encode_caption, norm_tag, scan, split_tags
from adapterhub.dataset.journal import Journal, write_caption
from adapterhub.dataset.lock import dataset_lock
from adapterhub.errors import AdapterhubError


@dataclass
class Change:
    item: Item
    before: str | None
    after: str

    def row(self) -> dict:
        return {"file": self.item.rel, "before": self.before, "after": self.after}


def _values(cfg: TagEditConfig) -> list[str]:
    return [t for v in cfg.values for t in split_tags(v)]


def _without(tags: list[str], drop: set[str]) -> list[str]:
    return [t for t in tags if norm_tag(t) not in drop]


def add(tags, new, position=-1):
    have = {norm_tag(t) for t in tags}
    fresh = [t for t in dict.fromkeys(new) if norm_tag(t) not in have]
    at = len(tags) if position < 0 else min(position, len(tags))
    return tags[:at] + fresh + tags[at:]


def remove(tags, drop):
    return _without(tags, {norm_tag(t) for t in drop})


def replace(tags, old, new):
    key = norm_tag(old)
    out = []
    for t in tags:
        out.extend(new if norm_tag(t) == key else [t])
    return dedupe(out)


def move_front(tags, front):
    keys = [norm_tag(t) for t in front]
    present = [next(t for t in tags if norm_tag(t) == k) for k in dict.fromkeys(keys)
               if any(norm_tag(t) == k for t in tags)]
    return present + _without(tags, set(keys))


def dedupe(tags):
    seen, out = set(), []
    for t in tags:
        if norm_tag(t) not in seen:
            seen.add(norm_tag(t))
            out.append(t)
    return out


def sort_tags(tags, keep_first=0, frequency: Counter | None = None):
    head, tail = tags[:keep_first], tags[keep_first:]
    if frequency is None:
        return head + sorted(tail, key=norm_tag)
    return head + sorted(tail, key=lambda t: (-frequency[norm_tag(t)], norm_tag(t)))


def trigger(tags, word):
    return [word] + remove(tags, [word])


def tag_frequency(ds: Dataset) -> Counter:
    """Images per tag (a tag counted once per image), over the normalised form."""
    counts: Counter = Counter()
    for item in ds.items:
        counts.update({norm_tag(t) for t in item.caption().tags})
    return counts


def _editor(cfg: TagEditConfig, ds: Dataset):
    vals = _values(cfg)
    a = cfg.action
    need = {"add": 1, "remove": 1, "replace": 1, "move-front": 1}.get(a, 0)
    if len(vals) < need:
        raise AdapterhubError(f"tags {a}: give at least one tag")
    if a == "add":
        return lambda tags, item: add(tags, vals, cfg.position)
    if a == "remove":
        return lambda tags, item: remove(tags, vals)
    if a == "replace":
        if len(cfg.values) != 2:
            raise AdapterhubError("tags replace: give OLD and NEW (NEW may be a comma-separated list)")
        old, new = cfg.values[0].strip(), split_tags(cfg.values[1])
        return lambda tags, item: replace(tags, old, new)
    if a == "move-front":
        return lambda tags, item: move_front(tags, vals)
    if a == "dedupe":
        return lambda tags, item: dedupe(tags)
    if a == "sort":
        freq = tag_frequency(ds) if cfg.by == "frequency" else None
        return lambda tags, item: sort_tags(tags, cfg.keep_first, freq)
    if a == "trigger":
        return _trigger_editor(vals)
    raise AdapterhubError(f"unknown tag action {a!r}")


def _trigger_editor(vals: list[str]):
    if len(vals) > 1:
        raise AdapterhubError("tags trigger: give one trigger word (or none: the folder's class tokens)")

    def edit(tags, item: Item):
        word = vals[0] if vals else item.subset.class_tokens
        if not word:
            raise AdapterhubError(f"{item.rel}: no trigger word given and its folder is not "
                                  "named N_trigger")
        return trigger(tags, word)
    return edit


def _selected(item: Item, cfg: TagEditConfig) -> bool:
    have = {norm_tag(t) for t in item.caption().tags}
    return (all(norm_tag(t) in have for t in cfg.where)
            and not any(norm_tag(t) in have for t in cfg.where_not))


def plan(cfg: TagEditConfig, ds: Dataset | None = None) -> list[Change]:
    """Every caption the edit changes; captions are created only by add and trigger."""
    ds = ds or scan(cfg.dir, cfg.ext)
    edit = _editor(cfg, ds)
    creates = cfg.action in ("add", "trigger")
    changes = []
    for item in ds.items:
        cap = item.caption()
        if (not cap.exists and not creates) or not _selected(item, cfg):
            continue
        new_tags = edit(cap.tags, item)
        if new_tags != cap.tags or not cap.exists:
            changes.append(Change(item, cap.text if cap.exists else None, cap.with_tags(new_tags)))
    return changes


def apply(cfg: TagEditConfig, changes: list[Change]) -> int:
    """Write the planned changes (journalled, holding the folder's lock); returns how many files
    were written. A caption that changed since ``plan`` read it stops the edit before anything is
    written: applying a stale plan would silently undo that change."""
    if cfg.dry_run or not changes:
        return 0
    details = {"action": cfg.action, "values": list(cfg.values), "where": list(cfg.where)}
    with dataset_lock(cfg.dir, f"tags {cfg.action}"):
        _check_unchanged(changes)
        with Journal(cfg.dir, f"tags {cfg.action}", details) as journal:
            for ch in changes:
                cap = ch.item.caption()
                write_caption(journal, cap.path, cap.raw, encode_caption(ch.after))
                ch.item.forget_caption()
    return len(changes)


def _check_unchanged(changes: list[Change]) -> None:
    for ch in changes:
        cap = ch.item.caption()
        try:
            now = cap.path.read_bytes()
        except FileNotFoundError:
            now = None
        if now != cap.raw:
            raise AdapterhubError(f"{cap.path}: changed since the edit was planned; nothing was "
                                  "written, run the edit again")


def edit_tags(cfg: TagEditConfig) -> tuple[list[Change], int]:
    """Plan and apply in one hold of the folder's lock (a preview takes no lock: it writes nothing)."""
    if cfg.dry_run:
        return plan(cfg), 0
    with dataset_lock(cfg.dir, f"tags {cfg.action}"):
        changes = plan(cfg)
        return changes, apply(cfg, changes)
