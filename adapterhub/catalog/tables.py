"""The catalog's tables (SQLModel), as of the newest schema version.

One row per adapter file or diffusers folder (:class:`Entry`), its user tags (:class:`Tag`), the
files a scan looked at and found not to be adapters (:class:`Skipped`, so a rescan does not open them
again), and the schema version (:class:`SchemaInfo`). Full-text search lives beside them in a
backend-specific structure (SQLite FTS5 table, PostgreSQL ``tsvector``): see :mod:`.fulltext`.

Every table name starts with ``catalog_`` so a shared PostgreSQL database can hold other things.
"""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, Index
from sqlmodel import Field, SQLModel

ENTRY_STATUSES = ("ok", "unreadable")


class Entry(SQLModel, table=True):
    __tablename__ = "catalog_entries"
    __table_args__ = (Index("ix_catalog_entries_type_base", "type", "base"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    path: str = Field(unique=True)
    name: str = Field(index=True)
    kind: str = "file"  # file | folder
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    mtime_ns: int = Field(sa_column=Column(BigInteger, nullable=False))
    sidecar_sig: str = ""  # changes when a sidecar beside the file changes (re-enrich, no re-hash)
    sha256: Optional[str] = Field(default=None, index=True)
    autov1: Optional[str] = None  # sha256 of the 64 KiB at 1 MiB, 8 hex
    autov2: Optional[str] = Field(default=None, index=True)  # sha256[:10]
    autov3: Optional[str] = Field(default=None, index=True)  # full tensor-bytes sha256 (shown as 12 hex)
    status: str = "ok"  # ok | unreadable
    error: Optional[str] = None  # why the file is unreadable
    type: Optional[str] = None
    format: Optional[str] = None
    base: Optional[str] = None
    family: Optional[str] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    targets: Optional[int] = None
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    trigger_words: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    training: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    preview: Optional[str] = None
    notes: str = ""
    rating: Optional[int] = None
    missing: bool = Field(default=False, index=True)
    added_at: float = 0.0
    scanned_at: float = 0.0


class Tag(SQLModel, table=True):
    __tablename__ = "catalog_tags"

    entry_id: int = Field(foreign_key="catalog_entries.id", primary_key=True, ondelete="CASCADE")
    tag: str = Field(primary_key=True, index=True)


class Skipped(SQLModel, table=True):
    """A file a scan opened and found not to be an adapter; reopened only when it changes."""

    __tablename__ = "catalog_skipped"

    path: str = Field(primary_key=True)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    mtime_ns: int = Field(sa_column=Column(BigInteger, nullable=False))
    reason: str = ""


class SchemaInfo(SQLModel, table=True):
    __tablename__ = "catalog_schema"

    id: int = Field(default=1, primary_key=True)
    version: int


TABLES = [Entry.__table__, Tag.__table__, Skipped.__table__, SchemaInfo.__table__]
ENTRIES = Entry.__table__
TAGS = Tag.__table__
SKIPPED = Skipped.__table__
SCHEMA = SchemaInfo.__table__
