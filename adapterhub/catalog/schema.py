"""Schema versions and migrations: opening a catalog made by an older adapterhub upgrades it.

``catalog_schema.version`` records the version. A new catalog is created at :data:`VERSION`
directly; an older one runs each migration after its version, all in one transaction, under a lock
(SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock) so two processes never upgrade at once.

History:
  1. entries (path, stat, hashes, identification, metadata), tags.
  2. user notes and rating, trigger words, training facts, preview, sidecar signature; the
     skipped-files table; full-text search.

To change the schema: edit :mod:`.tables` to the new shape, add ``_to_N`` below and a line above.
"""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, inspect, select, text
from sqlalchemy.engine import Connection

from adapterhub.catalog import fulltext
from adapterhub.catalog.db import Catalog, CatalogError, reading, write
from adapterhub.catalog.tables import ENTRIES, SCHEMA, SKIPPED, TABLES

VERSION = 2
_PG_LOCK_KEY = 0x61646170  # "adap": serialises schema work on a shared PostgreSQL database


def _add_column(conn: Connection, table: str, column: Column, default_sql: str | None) -> None:
    kind = column.type.compile(dialect=conn.dialect)
    null = " NOT NULL" if not column.nullable else ""
    default = f" DEFAULT {default_sql}" if default_sql is not None else ""
    conn.exec_driver_sql(f'ALTER TABLE {table} ADD COLUMN "{column.name}" {kind}{default}{null}')


def _to_2(conn: Connection) -> None:
    defaults = {"sidecar_sig": "''", "trigger_words": "'[]'", "training": "'{}'", "preview": None,
                "notes": "''", "rating": None}
    for name, default in defaults.items():
        _add_column(conn, ENTRIES.name, ENTRIES.c[name], default)
    SKIPPED.create(conn, checkfirst=True)
    fulltext.create(conn)
    fulltext.reindex_all(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _to_2}


class DamagedSchema(Exception):
    """``catalog_schema`` holds no version this code ever wrote (raised inside a transaction, which
    rolls back; :func:`ensure_schema` turns it into a :class:`CatalogError` naming the catalog)."""


def _version(conn: Connection) -> int | None:
    """The catalog's schema version; None for an empty database.

    Raises :class:`DamagedSchema` when the version table exists but holds no whole number >= 1 in
    exactly one row: such a file was not left so by adapterhub, and guessing would "upgrade" it blindly."""
    names = set(inspect(conn).get_table_names())
    if SCHEMA.name not in names:
        return 1 if ENTRIES.name in names else None
    found = conn.execute(select(SCHEMA.c.version)).scalars().all()
    if len(found) != 1:
        raise DamagedSchema(f"{len(found)} schema version rows instead of one")
    version = found[0]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DamagedSchema(f"schema version {version!r} is not a version number")
    return version


def _upgrade(conn: Connection) -> int:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    found = _version(conn)
    if found is None:
        for table in TABLES:
            table.create(conn, checkfirst=True)
        fulltext.create(conn)
        conn.execute(SCHEMA.insert().values(id=1, version=VERSION))
        return VERSION
    if found > VERSION:
        return found
    for number in range(found + 1, VERSION + 1):
        MIGRATIONS[number](conn)
    if found < VERSION:
        SCHEMA.create(conn, checkfirst=True)
        conn.execute(SCHEMA.delete())
        conn.execute(SCHEMA.insert().values(id=1, version=VERSION))
    return found


def ensure_schema(catalog: Catalog) -> int:
    """Create or upgrade the catalog's tables; return the version found (before any upgrade).

    Raises :class:`CatalogError` for a version newer than this code, a damaged version table, and a
    read-only catalog that needs creating or upgrading; nothing is written then."""
    try:
        with reading(catalog) as conn:
            found = _version(conn)
    except DamagedSchema as exc:
        raise CatalogError(f"catalog {catalog.display}: damaged schema version table ({exc}); restore the "
                           "file from a backup, or scan into a new catalog") from None
    if found is not None and found > VERSION:
        raise CatalogError(f"catalog {catalog.display} has schema version {found}, newer than this "
                           f"adapterhub understands ({VERSION}); upgrade adapterhub")
    if found == VERSION:
        return found
    if catalog.readonly:
        what = "is empty" if found is None else f"needs upgrading from schema {found} to {VERSION}"
        raise CatalogError(f"catalog {catalog.display} is read-only and {what}")
    return write(catalog, _upgrade)
