"""Reading the catalog: list, search, show, name resolution, duplicates and statistics.

Every function returns plain dicts (JSON-ready); :func:`entry_dict` is the one shape of an entry.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Connection, Row

from adapterhub.catalog import fulltext as fts
from adapterhub.catalog.db import Catalog, CatalogError, reading
from adapterhub.catalog.tables import ENTRIES, TAGS

SORTS = {"name": ENTRIES.c.name, "path": ENTRIES.c.path, "size": ENTRIES.c.size,
         "mtime": ENTRIES.c.mtime_ns, "added": ENTRIES.c.added_at, "rating": ENTRIES.c.rating,
         "type": ENTRIES.c.type, "base": ENTRIES.c.base, "rank": ENTRIES.c.rank}
DESCENDING = {"size", "mtime", "added", "rating"}
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]{6,64}$")


def _tags(conn: Connection, ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for start in range(0, len(ids), 500):
        rows = conn.execute(select(TAGS.c.entry_id, TAGS.c.tag).where(TAGS.c.entry_id.in_(ids[start:start + 500]))
                            .order_by(TAGS.c.tag))
        for entry_id, tag in rows:
            out.setdefault(entry_id, []).append(tag)
    return out


def entry_dict(row: Row, tags: list[str]) -> dict:
    """An entry for people and scripts: identity, hashes, identification, user fields, metadata."""
    m = row._mapping
    return {
        "name": m["name"], "path": m["path"], "kind": m["kind"], "status": m["status"], "error": m["error"],
        "missing": bool(m["missing"]), "type": m["type"], "format": m["format"], "base": m["base"],
        "family": m["family"], "rank": m["rank"], "alpha": m["alpha"], "targets": m["targets"],
        "size": m["size"], "mtime_ns": m["mtime_ns"], "sha256": m["sha256"], "autov1": m["autov1"],
        "autov2": m["autov2"], "autov3": (m["autov3"] or "")[:12] or None, "tensor_sha256": m["autov3"],
        "tags": tags, "rating": m["rating"], "notes": m["notes"], "trigger_words": m["trigger_words"] or [],
        "training": m["training"] or {}, "preview": m["preview"], "added_at": m["added_at"],
        "scanned_at": m["scanned_at"], "metadata": m["metadata"] or {},
    }


def _entries(conn: Connection, rows: list[Row]) -> list[dict]:
    tags = _tags(conn, [r.id for r in rows])
    return [entry_dict(r, tags.get(r.id, [])) for r in rows]


def list_entries(catalog: Catalog, type: str | None = None, base: str | None = None,
                 tags: tuple[str, ...] = (), missing: bool = False, unreadable: bool = False,
                 sort: str = "name", limit: int | None = None) -> list[dict]:
    """Entries matching every filter given (``missing``: only the missing ones; else only present)."""
    if sort not in SORTS:
        raise CatalogError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTS)}")
    q = select(ENTRIES).where(ENTRIES.c.missing == missing)
    if type:
        q = q.where(func.lower(ENTRIES.c.type) == type.lower())
    if base:
        q = q.where(func.lower(ENTRIES.c.base) == base.lower())
    if unreadable:
        q = q.where(ENTRIES.c.status != "ok")
    for tag in tags:
        q = q.where(ENTRIES.c.id.in_(select(TAGS.c.entry_id).where(TAGS.c.tag == tag.strip())))
    column = SORTS[sort]
    order = column.desc() if sort in DESCENDING else column.asc()
    q = q.order_by(order.nulls_last(), ENTRIES.c.path).limit(limit)
    with reading(catalog) as conn:
        return _entries(conn, conn.execute(q).all())


def search(catalog: Catalog, query: str, limit: int = 20) -> list[dict]:
    """Entries whose name, tags, trigger words or metadata hold every word of ``query``, best first."""
    with reading(catalog) as conn:
        ids = fts.matching_ids(conn, query, limit)
        if not ids:
            return []
        rows = {r.id: r for r in conn.execute(select(ENTRIES).where(ENTRIES.c.id.in_(ids)))}
        return _entries(conn, [rows[i] for i in ids if i in rows])


def _candidates(conn: Connection, ref: str) -> list[Row]:
    """Rows ``ref`` may mean: a path, else a name (exact, then any case), else a hash prefix."""
    path = os.path.normpath(Path(ref).expanduser().absolute())
    rows = conn.execute(select(ENTRIES).where(ENTRIES.c.path == path)).all()
    if rows or os.sep in ref:
        return rows
    for cond in (ENTRIES.c.name == ref, func.lower(ENTRIES.c.name) == ref.lower()):
        rows = conn.execute(select(ENTRIES).where(cond).order_by(ENTRIES.c.path)).all()
        if rows:
            return rows
    if _HEX.match(ref):
        prefix = ref.lower().removeprefix("0x")
        conds = [ENTRIES.c.sha256.startswith(prefix), ENTRIES.c.autov3.startswith(prefix)]
        if len(prefix) == 8:
            conds.append(ENTRIES.c.autov1 == prefix)
        return conn.execute(select(ENTRIES).where(or_(*conds)).order_by(ENTRIES.c.path)).all()
    return []


def _one(ref: str, rows: list[Row], catalog: Catalog) -> Row:
    if not rows:
        raise CatalogError(f"{ref!r}: not found (no such file, and no name or hash prefix in catalog "
                           f"{catalog.display} matches)")
    if len({r.sha256 for r in rows}) == 1 or len(rows) == 1:
        present = [r for r in rows if not r.missing]
        return (present or rows)[0]  # copies of one file: any of them will do
    shown = "; ".join(f"{r.name} ({r.path}, sha256 {(r.sha256 or '?')[:10]})" for r in rows[:8])
    more = f"; and {len(rows) - 8} more" if len(rows) > 8 else ""
    raise CatalogError(f"{ref!r} is ambiguous: {len(rows)} catalog entries match: {shown}{more}; "
                       "give a path or a longer hash prefix")


def find_row(conn: Connection, catalog: Catalog, ref: str) -> Row:
    return _one(ref, _candidates(conn, ref), catalog)


def show(catalog: Catalog, ref: str) -> dict:
    with reading(catalog) as conn:
        return _entries(conn, [find_row(conn, catalog, ref)])[0]


def dupes(catalog: Catalog) -> list[dict]:
    """Groups of entries with the same content (sha256), then with the same tensors (AutoV3) but
    different files (metadata edited)."""
    c = ENTRIES.c
    groups = []
    with reading(catalog) as conn:
        for kind, column, distinct in (("identical", c.sha256, c.path), ("same tensors", c.autov3, c.sha256)):
            keys = select(column).where(column.is_not(None)).group_by(column) \
                .having(func.count(func.distinct(distinct)) > 1)
            rows = conn.execute(select(ENTRIES).where(column.in_(keys)).order_by(column, c.path)).all()
            by_key: dict[str, list[Row]] = {}
            for r in rows:
                by_key.setdefault(r._mapping[column.name], []).append(r)
            for key, members in by_key.items():
                groups.append({"kind": kind, "hash": key[:12] if kind == "same tensors" else key[:10],
                               "entries": [{"name": r.name, "path": r.path, "sha256": (r.sha256 or "")[:10],
                                            "missing": bool(r.missing)} for r in members]})
    return groups


def _counts(conn: Connection, column) -> dict:
    rows = conn.execute(select(column, func.count()).group_by(column).order_by(func.count().desc()))
    return {"(none)" if k is None else str(k): n for k, n in rows}


def stats(catalog: Catalog) -> dict:
    c = ENTRIES.c
    with reading(catalog) as conn:
        total, size = conn.execute(select(func.count(), func.coalesce(func.sum(c.size), 0))).one()
        return {
            "catalog": catalog.display, "entries": total, "total_bytes": int(size),
            "missing": conn.execute(select(func.count()).where(c.missing.is_(True))).scalar(),
            "unreadable": conn.execute(select(func.count()).where(c.status != "ok")).scalar(),
            "by_type": _counts(conn, c.type), "by_base": _counts(conn, c.base),
            "tags": conn.execute(select(func.count(func.distinct(TAGS.c.tag)))).scalar(),
            "duplicate_groups": sum(1 for g in dupes(catalog) if g["kind"] == "identical"),
        }
