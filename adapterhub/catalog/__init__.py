"""The catalog: scan, identify, hash and browse adapter files.

A service: functions take an open :class:`Catalog` and return plain data; progress goes to a
callback; nothing here prints. The CLI (:mod:`adapterhub.cli.catalog`) is a thin layer over it::

    from adapterhub.catalog import open_catalog, scan, search
    with open_catalog("catalog.db", create=True) as cat:
        report = scan(cat, ["~/loras"], on_event=print)
        hits = search(cat, "watercolor")

Modules: :mod:`.tables` (SQLModel tables), :mod:`.schema` (versions, migrations), :mod:`.db`
(engines, transactions), :mod:`.walk` / :mod:`.examine` / :mod:`.store` /
:mod:`.scanner` (scanning; the hashes are :mod:`adapterhub.hashes`), :mod:`.fulltext` (search), :mod:`.query`
and :mod:`.edit` (browsing, editing).
"""
from __future__ import annotations

import os
from pathlib import Path

from adapterhub.catalog.db import Catalog, CatalogError, catalog_url, open_catalog, sqlite_path
from adapterhub.catalog.edit import export, import_, note, prune, rate, tag
from adapterhub.catalog.query import dupes, list_entries, search, show, stats
from adapterhub.catalog.scanner import ScanReport, scan
from adapterhub.catalog.schema import VERSION as SCHEMA_VERSION

__all__ = ["Catalog", "CatalogError", "ScanReport", "SCHEMA_VERSION", "catalog_url", "dupes", "export",
           "import_", "list_entries", "note", "open_catalog", "prune", "rate", "resolve_adapter_arg",
           "scan", "search", "show", "stats", "tag"]


def resolve_adapter_arg(arg: str | os.PathLike, catalog_url: str | None = None) -> Path:
    """The file an adapter argument means: ``arg`` itself if it exists, else the catalog entry
    named ``arg`` (name, or sha256 / AutoV3 / AutoV1 prefix) in ``catalog_url`` (default:
    ``$ADAPTERHUB_CATALOG`` or ./catalog.db).

    Raises :class:`CatalogError` (an ``AdapterhubError``) naming the candidates when ``arg`` is
    ambiguous, and when it is neither a file nor a catalog entry, or the entry's file is gone.
    """
    path = Path(arg).expanduser()
    if path.exists():
        return path
    from adapterhub.catalog.db import catalog_url as to_url

    url = to_url(catalog_url)
    db_file = sqlite_path(url)
    if db_file is not None and not db_file.exists():
        raise CatalogError(f"{arg}: no such file (and no catalog at {db_file} to look the name up in)")
    with open_catalog(catalog_url) as catalog:
        entry = show(catalog, str(arg))
    if entry["missing"] or not Path(entry["path"]).exists():
        raise CatalogError(f"{arg}: the catalog entry's file is missing: {entry['path']} "
                           "(rescan, or `adapterhub catalog prune`)")
    return Path(entry["path"])
