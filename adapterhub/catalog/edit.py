"""Changing the catalog by hand: tags, notes, ratings, pruning, export and import.

Each operation is one transaction. Import merges: tags are added; notes and a rating are taken from
the file where the catalog has none; entries the catalog does not know are added (marked missing
when their file is not on this machine). Entries are matched by path, else by sha256.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from adapterhub.catalog import fulltext, store
from adapterhub.catalog.db import Catalog, CatalogError, reading, write
from adapterhub.catalog.query import _entries, find_row
from adapterhub.catalog.schema import VERSION
from adapterhub.catalog.tables import ENTRIES, TAGS

EXPORT_FORMAT = "adapterhub-catalog"


def _clean_tags(tags) -> list[str]:
    out = [t.strip() for t in tags if t and t.strip()]
    if not out:
        raise CatalogError("give at least one tag")
    return sorted(set(out))


def _add_tags(conn: Connection, entry_id: int, tags: list[str]) -> None:
    have = {t for (t,) in conn.execute(select(TAGS.c.tag).where(TAGS.c.entry_id == entry_id))}
    new = [{"entry_id": entry_id, "tag": t} for t in tags if t not in have]
    if new:
        conn.execute(TAGS.insert(), new)


def tag(catalog: Catalog, ref: str, action: str, tags) -> dict:
    """``action`` ``add`` or ``rm``; returns the entry's name, path and tags afterwards."""
    if action not in ("add", "rm"):
        raise CatalogError(f"unknown tag action {action!r}: use add or rm")
    tags = _clean_tags(tags)

    def apply(conn):
        row = find_row(conn, catalog, ref)
        if action == "add":
            _add_tags(conn, row.id, tags)
        else:
            conn.execute(TAGS.delete().where(TAGS.c.entry_id == row.id, TAGS.c.tag.in_(tags)))
        fulltext.reindex(conn, [row.id])
        return _entries(conn, [row])[0]

    entry = write(catalog, apply)
    return {"name": entry["name"], "path": entry["path"], "tags": entry["tags"]}


def _set(catalog: Catalog, ref: str, **values) -> dict:
    def apply(conn):
        row = find_row(conn, catalog, ref)
        conn.execute(ENTRIES.update().where(ENTRIES.c.id == row.id).values(**values))
        return {"name": row.name, "path": row.path, **values}

    return write(catalog, apply)


def note(catalog: Catalog, ref: str, text: str) -> dict:
    return _set(catalog, ref, notes=text.strip())


def rate(catalog: Catalog, ref: str, rating: int | None) -> dict:
    if rating is not None and not 0 <= rating <= 5:
        raise CatalogError(f"rating {rating} is out of range: use 0 to 5 (or clear it)")
    return _set(catalog, ref, rating=rating)


def prune(catalog: Catalog) -> list[str]:
    """Remove the entries whose files are missing; return their paths."""
    def apply(conn):
        rows = conn.execute(select(ENTRIES.c.id, ENTRIES.c.path).where(ENTRIES.c.missing.is_(True))).all()
        ids = [r.id for r in rows]
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            conn.execute(TAGS.delete().where(TAGS.c.entry_id.in_(part)))
            fulltext.forget(conn, part)
            conn.execute(ENTRIES.delete().where(ENTRIES.c.id.in_(part)))
        return sorted(r.path for r in rows)

    return write(catalog, apply)


def export(catalog: Catalog) -> dict:
    with reading(catalog) as conn:
        entries = _entries(conn, conn.execute(select(ENTRIES).order_by(ENTRIES.c.path)).all())
    return {"format": EXPORT_FORMAT, "schema": VERSION, "exported_at": time.time(), "catalog": catalog.display,
            "entries": entries}


def _read_export(source: str | os.PathLike | dict) -> list[dict]:
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CatalogError(f"{source}: cannot read a catalog export ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("entries"), list):
        raise CatalogError(f"{source}: not an adapterhub catalog export (made by `adapterhub catalog export --json`)")
    return data["entries"]


def _merge_user_fields(conn: Connection, ids: list[int], item: dict) -> None:
    tags = [t for t in item.get("tags") or [] if isinstance(t, str) and t.strip()]
    for entry_id in ids:
        if tags:
            _add_tags(conn, entry_id, sorted({t.strip() for t in tags}))
        row = conn.execute(select(ENTRIES.c.notes, ENTRIES.c.rating).where(ENTRIES.c.id == entry_id)).one()
        values = {}
        if not row.notes and item.get("notes"):
            values["notes"] = str(item["notes"])
        if row.rating is None and isinstance(item.get("rating"), int):
            values["rating"] = item["rating"]
        if values:
            conn.execute(ENTRIES.update().where(ENTRIES.c.id == entry_id).values(**values))


def _import_one(conn: Connection, item: dict, before: int) -> str:
    """Merge one exported entry; matched by path, else by sha256 among the entries that were there
    before the import (so copies inside the export stay separate entries)."""
    path = item.get("path")
    if not isinstance(path, str) or not path:
        return "invalid"
    ids = [r[0] for r in conn.execute(select(ENTRIES.c.id).where(ENTRIES.c.path == path))]
    if not ids and item.get("sha256"):
        ids = [r[0] for r in conn.execute(select(ENTRIES.c.id).where(ENTRIES.c.sha256 == item["sha256"],
                                                                    ENTRIES.c.id <= before))]
    outcome = "merged" if ids else "added"
    if not ids:
        entry = {k: item.get(k) for k in store.SCANNED_FIELDS}
        entry.update(autov3=item.get("tensor_sha256") or item.get("autov3"), size=item.get("size") or 0,
                     mtime_ns=item.get("mtime_ns") or 0, status=item.get("status") or "ok",
                     name=item.get("name") or Path(path).stem, kind=item.get("kind") or "file")
        store.save_entries(conn, [entry], match_moves=False)
        ids = [r[0] for r in conn.execute(select(ENTRIES.c.id).where(ENTRIES.c.path == path))]
        if not os.path.exists(path):
            store.set_missing(conn, ids, True)
    _merge_user_fields(conn, ids, item)
    fulltext.reindex(conn, ids)
    return outcome


def import_(catalog: Catalog, source: str | os.PathLike | dict) -> dict:
    """Merge an export into the catalog (one transaction); returns counts."""
    items = _read_export(source)

    def apply(conn):
        before = conn.execute(select(func.coalesce(func.max(ENTRIES.c.id), 0))).scalar()
        counts = {"merged": 0, "added": 0, "invalid": 0}
        for item in items:
            counts[_import_one(conn, item if isinstance(item, dict) else {}, before)] += 1
        return counts

    return write(catalog, apply)
