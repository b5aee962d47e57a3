"""Writing scan results: one batch of entries per transaction, moves matched by hash.

An entry keeps its row (and so its tags, notes and rating) when its file changes, and when the file
is moved or renamed: a new path whose sha256 equals that of an entry whose file is gone takes that
entry over. Inserts are upserts on ``path``, so two scans of the same folder at once agree.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, or_, select
from sqlalchemy.engine import Connection

from adapterhub.catalog import fulltext
from adapterhub.catalog.tables import ENTRIES, SKIPPED

SCANNED_FIELDS = ("path", "name", "kind", "size", "mtime_ns", "sidecar_sig", "sha256", "autov1", "autov2",
                  "autov3", "status", "error", "type", "format", "base", "family", "rank", "alpha",
                  "targets", "metadata", "trigger_words", "training", "preview")


@dataclass(frozen=True)
class Known:
    id: int
    size: int
    mtime_ns: int
    sidecar_sig: str
    missing: bool
    hashes: dict


def _under(column, roots: list[str]):
    clauses = []
    for root in roots:
        clauses.append(column == root)
        clauses.append(column.startswith(root.rstrip(os.sep) + os.sep, autoescape=True))
    return or_(*clauses)


def known_under(conn: Connection, roots: list[str]) -> dict[str, Known]:
    c = ENTRIES.c
    rows = conn.execute(select(c.id, c.path, c.size, c.mtime_ns, c.sidecar_sig, c.missing, c.sha256,
                               c.autov1, c.autov2, c.autov3).where(_under(c.path, roots)))
    return {r.path: Known(r.id, r.size, r.mtime_ns, r.sidecar_sig, bool(r.missing),
                          {"sha256": r.sha256, "autov1": r.autov1, "autov2": r.autov2, "autov3": r.autov3})
            for r in rows}


def skipped_under(conn: Connection, roots: list[str]) -> dict[str, tuple[int, int]]:
    rows = conn.execute(select(SKIPPED.c.path, SKIPPED.c.size, SKIPPED.c.mtime_ns)
                        .where(_under(SKIPPED.c.path, roots)))
    return {r.path: (r.size, r.mtime_ns) for r in rows}


def set_missing(conn: Connection, ids: list[int], missing: bool) -> None:
    for start in range(0, len(ids), 500):
        conn.execute(ENTRIES.update().where(ENTRIES.c.id.in_(ids[start:start + 500])).values(missing=missing))


def forget_skipped(conn: Connection, paths: list[str]) -> None:
    for start in range(0, len(paths), 500):
        conn.execute(SKIPPED.delete().where(SKIPPED.c.path.in_(paths[start:start + 500])))


def _row(entry: dict, now: float) -> dict:
    row = {k: entry.get(k) for k in SCANNED_FIELDS}
    row.update(missing=False, scanned_at=now, metadata=row["metadata"] or {},
               trigger_words=row["trigger_words"] or [], training=row["training"] or {},
               sidecar_sig=row["sidecar_sig"] or "")
    return row


def _move_sources(conn: Connection, entries: list[dict], taken: set[int]) -> dict[str, list]:
    """sha256 -> the entries with that content whose files are gone (they moved or were renamed),
    leaving out the ``taken`` ones (updated in place by this batch)."""
    hashes = sorted({e["sha256"] for e in entries if e.get("sha256")})
    gone: dict[str, list] = {}
    for start in range(0, len(hashes), 500):
        rows = conn.execute(select(ENTRIES.c.id, ENTRIES.c.path, ENTRIES.c.missing, ENTRIES.c.sha256)
                            .where(ENTRIES.c.sha256.in_(hashes[start:start + 500])))
        for r in rows:
            if r.id not in taken and (r.missing or not os.path.exists(r.path)):
                gone.setdefault(r.sha256, []).append(r)
    return gone


def _take_move_source(gone: dict[str, list], entry: dict) -> int | None:
    """Claim the gone entry this file most likely is (same file name first); each is claimed once."""
    candidates = gone.get(entry.get("sha256") or "", [])
    if not candidates:
        return None
    name = os.path.basename(entry["path"])
    pick = next((r for r in candidates if os.path.basename(r.path) == name), candidates[0])
    candidates.remove(pick)
    return pick.id


def _upsert(conn: Connection, rows: list[dict], now: float) -> None:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(ENTRIES)
    stmt = stmt.on_conflict_do_update(index_elements=[ENTRIES.c.path],
                                      set_={k: stmt.excluded[k] for k in (*SCANNED_FIELDS, "missing", "scanned_at")})
    conn.execute(stmt, [{**r, "added_at": now, "notes": "", "rating": None} for r in rows])


def _update(conn: Connection, rows: list[dict]) -> None:
    if rows:
        conn.execute(ENTRIES.update().where(ENTRIES.c.id == bindparam("b_id")), rows)


def save_entries(conn: Connection, entries: list[dict], match_moves: bool = True) -> dict:
    """Write one batch; returns how many were new, updated (same path) and moved (matched by hash),
    and the ids the moved files took over (``moved_ids``)."""
    now = time.time()
    entries = sorted(entries, key=lambda e: e["path"])
    paths = [e["path"] for e in entries]
    existing = dict(conn.execute(select(ENTRIES.c.path, ENTRIES.c.id).where(ENTRIES.c.path.in_(paths))).all())
    new = [e for e in entries if e["path"] not in existing]
    gone = _move_sources(conn, new, set(existing.values())) if match_moves and new else {}
    updates, inserts, moved = [], [], []
    for entry in entries:
        row = _row(entry, now)
        entry_id = existing.get(entry["path"])
        if entry_id is None:
            entry_id = _take_move_source(gone, entry)
            moved += [entry_id] if entry_id is not None else []
        if entry_id is None:
            inserts.append(row)
        else:
            updates.append({**row, "b_id": entry_id})
    _update(conn, updates)
    if inserts:
        _upsert(conn, inserts, now)
    forget_skipped(conn, paths)
    ids = [r[0] for r in conn.execute(select(ENTRIES.c.id).where(ENTRIES.c.path.in_(paths)))]
    fulltext.reindex(conn, ids)
    return {"new": len(inserts), "updated": len(updates) - len(moved), "moved": len(moved), "moved_ids": moved}


def save_skipped(conn: Connection, skipped: list[dict]) -> None:
    """Remember files that are not adapters, so an unchanged one is not opened again."""
    if not skipped:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    rows = [{"path": s["path"], "size": s["size"], "mtime_ns": s["mtime_ns"], "reason": (s["skip"] or "")[:500]}
            for s in sorted(skipped, key=lambda s: s["path"])]
    stmt = insert(SKIPPED)
    conn.execute(stmt.on_conflict_do_update(index_elements=[SKIPPED.c.path],
                                            set_={k: stmt.excluded[k] for k in ("size", "mtime_ns", "reason")}), rows)
