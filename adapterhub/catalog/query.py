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
from adapterhub.hashes import EMPTY_AUTOV1, autov1_identifies

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
    """Entries matching every filter given (``missing``: only the missing ones; else only present; ``base``: the
    detected base or the family, so ``flux`` lists flux-dev, flux-schnell and width-only Flux files)."""
    if sort not in SORTS:
        raise CatalogError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTS)}")
    q = select(ENTRIES).where(ENTRIES.c.missing == missing)
    if type:
        q = q.where(func.lower(ENTRIES.c.type) == type.lower())
    if base:  # a base (flux-dev, sd3.5-large, sdxl ...) or a family (flux, sd3: each of its bases)
        q = q.where(or_(func.lower(ENTRIES.c.base) == base.lower(), func.lower(ENTRIES.c.family) == base.lower()))
    if unreadable:
        q = q.where(ENTRIES.c.status != "ok")
    for tag in tags:
        q = q.where(ENTRIES.c.id.in_(select(TAGS.c.entry_id).where(TAGS.c.tag == tag.strip())))
    column = SORTS[sort]
    order = column.desc() if sort in DESCENDING else column.asc()
    q = q.order_by(order.nulls_last(), ENTRIES.c.path).limit(limit)
    with reading(catalog) as conn:
        return _entries(conn, conn.execute(q).all())


_WORD = re.compile(r"[^\W_]+")  # as the full-text index splits, but keeping the case
_NAME_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # camelCase / digit boundaries
NAME_TIERS = ("exact", "prefix", "word prefix", "substring")


def name_words(name: str) -> list[str]:
    """The words of a name in lower case, camelCase parts too: ``EasyNegative`` -> easynegative, easy,
    negative (the full-text index only splits at non-letters, so it cannot find ``negative`` there)."""
    out = []
    for word in _WORD.findall(name):
        out.append(word.lower())
        parts = _NAME_PART.findall(word)
        out += [p.lower() for p in parts] if len(parts) > 1 else []
    return out


def name_tier(name: str, terms: list[str]) -> int | None:
    """How well ``name`` matches the query words ``terms`` (lower case): an index into
    :data:`NAME_TIERS` (exact, prefix, every word a word prefix, every word a substring), or None."""
    normal, query = " ".join(fts.words(name)), " ".join(terms)
    if normal == query:
        return 0
    if normal.startswith(query):
        return 1
    parts = name_words(name)
    if all(any(p.startswith(t) for p in parts) for t in terms):
        return 2
    compact = "".join(fts.words(name))
    return 3 if all(t in compact for t in terms) else None


def _name_substring_ids(conn: Connection, terms: list[str]) -> list[int]:
    """Entries whose name holds every term anywhere (a scan of names: the index only knows prefixes)."""
    q = select(ENTRIES.c.id)
    for term in terms:  # terms are letters and digits only: nothing for LIKE to interpret
        q = q.where(func.lower(ENTRIES.c.name).like(f"%{term}%"))
    return [r[0] for r in conn.execute(q.order_by(ENTRIES.c.id).limit(fts.CANDIDATES))]


def search(catalog: Catalog, query: str, limit: int = 20) -> list[dict]:
    """Entries whose name, tags, trigger words or metadata hold every word of ``query``, best first:
    names matching exactly, then by prefix, then word by word (``neg`` finds ``EasyNegative``), then
    inside a word (``negative`` finds ``deepnegative``); then entries found by tags, trigger words or
    metadata, in full-text rank order."""
    terms = fts.words(query)
    with reading(catalog) as conn:
        found = fts.matching_ids(conn, query, fts.CANDIDATES)  # raises on a query without words
        position = {entry_id: i for i, entry_id in enumerate(found)}
        ids = found + [i for i in _name_substring_ids(conn, terms) if i not in position]
        if not ids:
            return []
        names = {}
        for start in range(0, len(ids), 500):
            names.update(conn.execute(select(ENTRIES.c.id, ENTRIES.c.name)
                                      .where(ENTRIES.c.id.in_(ids[start:start + 500]))).all())

        def rank(entry_id: int):  # the name's tier; the index's order within one; then by name
            tier = name_tier(names[entry_id], terms)
            return (len(NAME_TIERS) if tier is None else tier, position.get(entry_id, len(position)),
                    names[entry_id].lower())

        best = sorted((i for i in ids if i in names), key=rank)[:limit]
        rows = {r.id: r for r in conn.execute(select(ENTRIES).where(ENTRIES.c.id.in_(best)))}
        return _entries(conn, [rows[i] for i in best if i in rows])


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
        if len(prefix) == 8 and autov1_identifies(prefix):  # not the one every small file has
            conds.append(ENTRIES.c.autov1 == prefix)
        return conn.execute(select(ENTRIES).where(or_(*conds)).order_by(ENTRIES.c.path)).all()
    return []


def similar_names(conn: Connection, ref: str, n: int = 5) -> list[str]:
    """Names the user may have meant by ``ref``: those holding it (or held in it, as in
    ``fgjd_EasyNegative`` for ``EasyNegative``), then the closest spellings (difflib)."""
    import difflib

    names = sorted({r[0] for r in conn.execute(select(ENTRIES.c.name).where(ENTRIES.c.missing.is_(False)))})
    wanted = ref.lower()
    inside = [name for name in names if len(name) > 2 and (wanted in name.lower() or name.lower() in wanted)]
    close = difflib.get_close_matches(ref, names, n=n, cutoff=0.6)
    lowered = {name.lower(): name for name in names}
    close += [lowered[c] for c in difflib.get_close_matches(wanted, list(lowered), n=n, cutoff=0.6)]
    return list(dict.fromkeys(sorted(inside, key=lambda name: abs(len(name) - len(ref))) + close))[:n]


def _one(ref: str, rows: list[Row], catalog: Catalog, conn: Connection | None = None) -> Row:
    if not rows and ref.lower().removeprefix("0x") == EMPTY_AUTOV1:
        raise CatalogError(f"{ref!r}: is the AutoV1 of every file under 1 MiB (the hash of no bytes), so it "
                           "identifies nothing; use the sha256 or AutoV3 prefix, or the name")
    if not rows:
        similar = similar_names(conn, ref) if conn is not None else []
        hint = f"; did you mean {', '.join(similar)}?" if similar else ""
        raise CatalogError(f"{ref!r}: not found (no such file, and no name or hash prefix in catalog "
                           f"{catalog.display} matches){hint}")
    if len({r.sha256 for r in rows}) == 1 or len(rows) == 1:
        present = [r for r in rows if not r.missing]
        return (present or rows)[0]  # copies of one file: any of them will do
    shown = "; ".join(f"{r.name} ({r.path}, sha256 {(r.sha256 or '?')[:10]})" for r in rows[:8])
    more = f"; and {len(rows) - 8} more" if len(rows) > 8 else ""
    raise CatalogError(f"{ref!r} is ambiguous: {len(rows)} catalog entries match: {shown}{more}; "
                       "give a path or a longer hash prefix")


def find_row(conn: Connection, catalog: Catalog, ref: str) -> Row:
    return _one(ref, _candidates(conn, ref), catalog, conn)


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
