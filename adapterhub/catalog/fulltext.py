"""Full-text search over name, tags, trigger words and metadata, with each backend's own engine.

SQLite: an FTS5 table ``catalog_fts`` (rowid = entry id, ``unicode61`` tokenizer, bm25 ranking).
PostgreSQL: ``catalog_search(entry_id, doc tsvector)`` with a GIN index, ``ts_rank`` ranking.

Text is normalised the same way for both (lower case, every run of non-letters/digits a space), so
``my_style-v2`` is found by ``style``, ``v2`` or ``my st``. Every query word is a prefix; all must match.

Ranking is bounded so that a word found in half the library still answers in milliseconds: entries
whose name, tags or trigger words match come first, ranked among their first :data:`CANDIDATES`;
the rest (matched in metadata only) follow, ranked the same way.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable

from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection

from adapterhub.catalog.db import CatalogError
from adapterhub.catalog.tables import ENTRIES, TAGS

_WORD = re.compile(r"[^\W_]+")
META_VALUE_CHARS = 1000
META_TOTAL_CHARS = 8000
CANDIDATES = 2000

SQLITE_DDL = ("CREATE VIRTUAL TABLE IF NOT EXISTS catalog_fts USING fts5("
              "name, tags, triggers, meta, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3')",)
POSTGRES_DDL = (
    "CREATE TABLE IF NOT EXISTS catalog_search (entry_id INTEGER PRIMARY KEY "
    "REFERENCES catalog_entries(id) ON DELETE CASCADE, doc TSVECTOR NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ix_catalog_search_doc ON catalog_search USING GIN (doc)",
)
_PG_DOC = ("setweight(to_tsvector('simple', :name), 'A') || setweight(to_tsvector('simple', :tags), 'B')"
           " || setweight(to_tsvector('simple', :triggers), 'B') || setweight(to_tsvector('simple', :meta), 'D')")


def words(value: str) -> list[str]:
    return _WORD.findall(value.lower())


def normalise(value: str) -> str:
    return " ".join(words(value))


def create(conn: Connection) -> None:
    for ddl in SQLITE_DDL if conn.dialect.name == "sqlite" else POSTGRES_DDL:
        conn.exec_driver_sql(ddl)


def meta_text(metadata: dict) -> str:
    parts, total = [], 0
    for key, value in metadata.items():
        value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        piece = f"{key} {value[:META_VALUE_CHARS]}"
        parts.append(piece)
        total += len(piece)
        if total > META_TOTAL_CHARS:
            break
    return normalise(" ".join(parts))


def _documents(conn: Connection, ids: list[int]) -> list[dict]:
    rows = conn.execute(select(ENTRIES.c.id, ENTRIES.c.name, ENTRIES.c.trigger_words, ENTRIES.c.metadata)
                        .where(ENTRIES.c.id.in_(ids))).all()
    tags: dict[int, list[str]] = {}
    for entry_id, tag in conn.execute(select(TAGS.c.entry_id, TAGS.c.tag).where(TAGS.c.entry_id.in_(ids))):
        tags.setdefault(entry_id, []).append(tag)
    return [{"id": r.id, "name": normalise(r.name), "tags": normalise(" ".join(tags.get(r.id, []))),
             "triggers": normalise(" ".join(r.trigger_words or [])), "meta": meta_text(r.metadata or {})}
            for r in rows]


def reindex(conn: Connection, ids: Iterable[int]) -> None:
    """Rewrite the search documents of these entries (after they or their tags changed)."""
    ids = sorted(set(ids))
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        docs = _documents(conn, part)
        if conn.dialect.name == "sqlite":
            conn.execute(text("DELETE FROM catalog_fts WHERE rowid IN :ids")
                         .bindparams(bindparam("ids", expanding=True)), {"ids": part})
            if docs:
                conn.execute(text("INSERT INTO catalog_fts(rowid, name, tags, triggers, meta) "
                                  "VALUES (:id, :name, :tags, :triggers, :meta)"), docs)
        elif docs:
            conn.execute(text(f"INSERT INTO catalog_search(entry_id, doc) VALUES (:id, {_PG_DOC}) "
                              "ON CONFLICT (entry_id) DO UPDATE SET doc = EXCLUDED.doc"), docs)


def forget(conn: Connection, ids: Iterable[int]) -> None:
    """Drop the search documents of deleted entries (PostgreSQL cascades; FTS5 cannot)."""
    ids = list(ids)
    if conn.dialect.name == "sqlite" and ids:
        conn.execute(text("DELETE FROM catalog_fts WHERE rowid IN :ids")
                     .bindparams(bindparam("ids", expanding=True)), {"ids": ids})


def reindex_all(conn: Connection) -> None:
    ids = [r[0] for r in conn.execute(select(ENTRIES.c.id))]
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DELETE FROM catalog_fts")
    reindex(conn, ids)


def _ranked(conn: Connection, terms: list[str], limit: int, primary: bool) -> list[int]:
    """Best ``limit`` ids among the first CANDIDATES matches, in name/tags/triggers or anywhere."""
    if conn.dialect.name == "sqlite":
        match = " ".join(f'"{t}"*' for t in terms)
        match = f"{{name tags triggers}} : ({match})" if primary else match
        sql = ("SELECT rowid FROM (SELECT rowid, bm25(catalog_fts, 10.0, 5.0, 5.0, 1.0) AS score "
               "FROM catalog_fts WHERE catalog_fts MATCH :q LIMIT :pool) ORDER BY score, rowid LIMIT :n")
    else:
        match = " & ".join(f"{t}:*AB" if primary else f"{t}:*" for t in terms)
        sql = ("SELECT entry_id FROM (SELECT entry_id, ts_rank(doc, q) AS score FROM catalog_search, "
               "to_tsquery('simple', :q) AS q WHERE doc @@ q LIMIT :pool) AS c "
               "ORDER BY score DESC, entry_id LIMIT :n")
    return [r[0] for r in conn.execute(text(sql), {"q": match, "n": limit, "pool": CANDIDATES})]


def matching_ids(conn: Connection, query: str, limit: int) -> list[int]:
    """Entry ids matching every word of ``query`` (as prefixes), best first."""
    terms = words(query)
    if not terms:
        raise CatalogError(f"nothing to search for in {query!r}: give a word or two")
    ids = _ranked(conn, terms, limit, primary=True)
    if len(ids) < limit:
        seen = set(ids)
        ids += [i for i in _ranked(conn, terms, limit + len(ids), primary=False) if i not in seen]
    return ids[:limit]
