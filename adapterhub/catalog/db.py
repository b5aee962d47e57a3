"""Opening a catalog: which database, engine settings, write transactions that retry, clear errors.

A catalog is named by a path (an SQLite file) or any SQLAlchemy URL (``postgresql://...`` for a
team's shared catalog). Without one, ``ADAPTERHUB_CATALOG`` or ``./catalog.db`` is used.

SQLite runs in WAL mode with a busy timeout; every write transaction starts with ``BEGIN
IMMEDIATE`` so two writers queue instead of failing half-way. A catalog file without write
permission, or in a folder without write permission, is opened read-only: browsing works (and writes
nothing, not even SQLite's ``-wal`` / ``-shm`` files), writing says so in one line. A URL whose
scheme no installed driver serves is one line naming the package to install.
"""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.pool import QueuePool

from adapterhub.errors import AdapterhubError

ENV_VAR = "ADAPTERHUB_CATALOG"
DEFAULT_FILE = "catalog.db"
BUSY_TIMEOUT_S = 30.0
WRITE_ATTEMPTS = 10
T = TypeVar("T")


class CatalogError(AdapterhubError):
    """A catalog that cannot be opened, read or written; the message names it."""


@dataclass
class Catalog:
    """An open catalog: its engine and how to name it to a person."""

    engine: Engine
    url: str
    readonly: bool = False

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display(self) -> str:
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            return url.database or ":memory:"
        return url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def catalog_url(value: str | os.PathLike | None = None) -> str:
    """The SQLAlchemy URL of the catalog named by ``value``, ``$ADAPTERHUB_CATALOG`` or ./catalog.db."""
    value = str(value) if value else os.environ.get(ENV_VAR) or DEFAULT_FILE
    if "://" in value:
        if value.startswith("postgres://"):
            value = "postgresql://" + value[len("postgres://"):]
        if value.startswith("postgresql://") and not _has_module("psycopg2"):
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        return value
    return "sqlite:///" + str(Path(value).expanduser().absolute())


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _writable(path: Path) -> bool:
    """Write permission as the user meant it: mode bits count even for root, who ignores them."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(path, os.W_OK)


def _immutable(path: Path) -> bool:
    """Whether a read-only ``path`` must be opened immutable: in a folder nobody may write, SQLite can
    create neither the ``-shm`` file a WAL read needs nor a journal, so no writer can change the file
    either. Not when a ``-wal`` file holds changes not yet in the database (immutable would ignore them)."""
    wal = path.with_name(path.name + "-wal")
    return not _writable(path.parent) and not (wal.exists() and wal.stat().st_size > 0)


def _sqlite_engine(path: Path, readonly: bool) -> Engine:
    immutable = readonly and _immutable(path)

    def connect():
        if readonly:
            uri = f"{path.as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
            return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        return sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)

    # Pooled: closing the last connection to a WAL database checkpoints it, which costs a sync.
    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool, pool_size=2, max_overflow=8)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("catalog_write") and not readonly
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# the package that provides each database driver module (what ``pip install`` wants)
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "'psycopg[binary]'", "MySQLdb": "mysqlclient",
                   "pymysql": "pymysql", "mysql": "mysql-connector-python", "oracledb": "oracledb",
                   "pyodbc": "pyodbc", "pymssql": "pymssql", "asyncpg": "asyncpg", "aiosqlite": "aiosqlite"}


def _shown(url: str) -> str:
    """``url`` as a person may see it: no password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def make_engine(url: str, readonly: bool = False) -> Engine:
    """An engine for ``url``; an unknown scheme, a malformed URL or a driver that is not installed is a
    :class:`CatalogError` (the message names the package to install)."""
    try:
        path = sqlite_path(url)
        if path is not None:
            return _sqlite_engine(path, readonly)
        if make_url(url).get_backend_name() == "sqlite":
            return create_engine(url)
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise CatalogError(f"catalog {_shown(url)}: unknown database scheme {scheme!r} (name an SQLite file, "
                           "sqlite:///FILE or postgresql://USER@HOST/DB)") from None
    except ImportError as exc:  # the dialect is known, its driver module is not installed
        module = (exc.name or "").split(".")[0] or "its driver"
        package = DRIVER_PACKAGES.get(module, f"the package that provides {module!r}")
        raise CatalogError(f"catalog {_shown(url)}: the {make_url(url).get_backend_name()} driver ({module}) "
                           f"is not installed; pip install {package}") from None
    except (ArgumentError, ValueError) as exc:
        raise CatalogError(f"catalog {_shown(url)}: not a valid database URL ({_message(exc)})") from None


def open_catalog(value: str | os.PathLike | None = None, create: bool = False) -> Catalog:
    """Open (and, with ``create``, make) a catalog, upgrading an older schema on the way."""
    from adapterhub.catalog.schema import ensure_schema

    url = catalog_url(value)
    path = sqlite_path(url)
    readonly = False
    if path is not None:
        if not path.exists():
            if not create:
                raise CatalogError(f"no catalog at {path} (make one with `adapterhub catalog scan DIR`, "
                                   f"or name another with --catalog or ${ENV_VAR})")
            from adapterhub.outputs import existing_folder

            if not _writable(existing_folder(path)):  # mode bits count, also for root (see _writable)
                raise CatalogError(f"cannot create catalog {path}: the folder {existing_folder(path)} is read-only")
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not _writable(path) or not _writable(path.parent):
            readonly = True  # a folder without write permission: SQLite could write neither WAL nor journal
    catalog = Catalog(make_engine(url, readonly), url, readonly)
    try:
        ensure_schema(catalog)
    except BaseException:
        catalog.close()
        raise
    return catalog


# ---------------------------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------------------------
def _message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else orig.__class__.__name__


def _is_readonly(exc: BaseException) -> bool:
    text = _message(exc).lower()
    return "readonly database" in text or "read-only" in text or "read only" in text


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # a concurrent writer inserted the same path first: retry sees its row
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    return "database is locked" in _message(exc).lower() or "busy" in _message(exc).lower()


def translate(catalog: Catalog, exc: BaseException) -> CatalogError:
    """One line for a person: which catalog, what went wrong."""
    if _is_readonly(exc):
        return CatalogError(f"catalog {catalog.display} is read-only; nothing was changed")
    return CatalogError(f"catalog {catalog.display}: {_message(exc)}")


def write(catalog: Catalog, fn: Callable[[Connection], T], attempts: int = WRITE_ATTEMPTS) -> T:
    """Run ``fn(conn)`` in one write transaction; retry it whole when another writer got in the way."""
    if catalog.readonly:
        raise CatalogError(f"catalog {catalog.display} is read-only; nothing was changed")
    for attempt in range(attempts):
        try:
            with catalog.engine.connect() as conn:
                conn.execution_options(catalog_write=True)
                with conn.begin():
                    return fn(conn)
        except DBAPIError as exc:
            if _is_readonly(exc) or not _retryable(exc) or attempt == attempts - 1:
                raise translate(catalog, exc) from None
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")


@contextmanager
def reading(catalog: Catalog) -> Iterator[Connection]:
    """A read transaction (one consistent snapshot); database errors become one line."""
    try:
        with catalog.engine.connect() as conn, conn.begin():
            yield conn
    except DBAPIError as exc:
        raise translate(catalog, exc) from None

