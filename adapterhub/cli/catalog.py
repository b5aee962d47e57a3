"""``adapterhub catalog``: scan folders of adapters into a catalog, then list, search, show and tag them.

The catalog is ``./catalog.db`` unless ``--catalog`` (before or after the sub-command) or
``$ADAPTERHUB_CATALOG`` names another file or an SQLAlchemy URL (``postgresql://user@host/db``).
Each command validates, calls one function of :mod:`adapterhub.catalog` and renders its result.
"""
from __future__ import annotations

import json
from contextlib import ExitStack

import click

from adapterhub.cli import output

CATALOG_HELP = "catalog file or SQLAlchemy URL (default: $ADAPTERHUB_CATALOG or ./catalog.db)"


def _remember_catalog(ctx: click.Context, _param, value):
    if value:
        ctx.ensure_object(dict)["catalog"] = value
    return value


def catalog_option(fn):
    return click.option("--catalog", "catalog_ref", default=None, expose_value=False, is_eager=True,
                        callback=_remember_catalog, help=CATALOG_HELP)(fn)


def _open(create: bool = False):
    from adapterhub.catalog import open_catalog

    ctx = click.get_current_context()
    ref = (ctx.find_object(dict) or {}).get("catalog")
    return open_catalog(ref, create=create)


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group()
@catalog_option
def catalog():
    """Scan, identify, hash and browse adapter files."""


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------
def _scan_summary(report: dict) -> None:
    keys = ("found", "new", "updated", "moved", "unchanged", "missing", "reappeared", "skipped")
    summary = {k: report[k] for k in keys}
    summary["unreadable"] = len(report["unreadable"])
    summary["hashed"] = human_size(report["hashed_bytes"])
    summary["seconds"] = round(report["seconds"], 2)
    output.key_values(summary, title="scan")
    if report["unreadable"]:
        output.table(report["unreadable"], ["path", "error"], title="unreadable (kept in the catalog with the reason)")
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@catalog.command("scan")
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, help="worker processes (default: CPUs)")
@click.option("--force", is_flag=True, help="re-examine and re-hash every file, changed or not")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, hidden=True)
@catalog_option
def scan_cmd(dirs, jobs, force, as_json, batch_size):
    """Scan folders (recursively) for adapter files and store what they are."""
    from adapterhub.catalog import scan

    with ExitStack() as stack:
        advance = []

        def on_event(event: dict) -> None:
            if event["event"] == "start" and event["total"]:
                advance.append(stack.enter_context(output.progress("scanning", total=event["total"])))
            elif event["event"] == "file" and advance:
                advance[0]()

        with _open(create=True) as cat:
            report = scan(cat, dirs, jobs=jobs, on_event=on_event, force=force, batch_size=batch_size).as_dict()
    output.emit(report, as_json, _scan_summary)


# ------------------------------------------------------------------------------------------------
# browsing
# ------------------------------------------------------------------------------------------------
LIST_COLUMNS = ["name", "type", "base", "rank", "size", "tags", "rating", "status"]


def _status(entry: dict) -> str:
    return "missing" if entry["missing"] else entry["status"]


def _rows(entries: list[dict]) -> list[dict]:
    return [{**e, "size": human_size(e["size"]), "tags": ", ".join(e["tags"]), "status": _status(e)}
            for e in entries]


def _without_metadata(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "metadata"} for e in entries]


@catalog.command("list")
@click.option("--type", "type_", help="only this adapter type (lora, locon, ti, ...)")
@click.option("--base", help="only this base model (sd1, sd2, sdxl, ...)")
@click.option("--tag", "tags", multiple=True, help="only entries with this tag (repeatable: all must match)")
@click.option("--missing", is_flag=True, help="only entries whose file is gone")
@click.option("--unreadable", is_flag=True, help="only files that could not be read")
@click.option("--sort", default="name", show_default=True,
              type=click.Choice(["name", "path", "size", "mtime", "added", "rating", "type", "base", "rank"]),
              help="order of the entries")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="show at most this many entries")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def list_cmd(type_, base, tags, missing, unreadable, sort, limit, as_json):
    """List catalog entries."""
    from adapterhub.catalog import list_entries

    with _open() as cat:
        entries = list_entries(cat, type=type_, base=base, tags=tags, missing=missing,
                               unreadable=unreadable, sort=sort, limit=limit)
    output.emit(_without_metadata(entries), as_json, lambda es: output.table(_rows(es), LIST_COLUMNS))


@catalog.command("search")
@click.argument("query", nargs=-1, required=True)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="show at most this many matches")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def search_cmd(query, limit, as_json):
    """Search names, tags, trigger words and metadata; every word must match.

    Names match inside words too (negative finds EasyNegative and deepnegative), ranked: the exact name,
    names starting with the query, names with words starting with each query word, names holding each
    word; then matches in tags, trigger words and metadata (where every word is a prefix)."""
    from adapterhub.catalog import search

    text = " ".join(query)
    with _open() as cat:
        entries = search(cat, text, limit=limit)
        where = cat.display
    if not entries and not as_json:
        click.echo(f"no entries match {text!r} in catalog {where}", err=True)
        return
    columns = ["name", "type", "base", "tags", "trigger_words", "path"]
    rows = [{**row, "trigger_words": ", ".join(e["trigger_words"][:5])}
            for row, e in zip(_rows(entries), entries, strict=True)]
    output.emit(_without_metadata(entries), as_json, lambda _: output.table(rows, columns))


def _pretty(value: str) -> str:
    try:
        decoded = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else None
    except json.JSONDecodeError:
        decoded = None
    return json.dumps(decoded, indent=2, ensure_ascii=False) if decoded is not None else str(value)


def human_time(seconds: float | None) -> str:
    """A timestamp as a local date and time (JSON keeps the number, for scripts)."""
    from datetime import datetime

    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _render_entry(entry: dict) -> None:
    from adapterhub.hashes import EMPTY_AUTOV1

    fields = {}
    for key, value in entry.items():
        if key == "mtime_ns":
            fields["mtime"] = human_time(value / 1e9 if value is not None else None)
        elif key in ("added_at", "scanned_at"):
            fields[key] = human_time(value)
        elif key == "autov1" and value == EMPTY_AUTOV1:
            fields[key] = f"{value} (the webui's hash of a file under 1 MiB: the same for all, not an identifier)"
        elif key != "metadata":
            fields[key] = value
    fields["size"] = f"{human_size(entry['size'])} ({entry['size']} bytes)"
    output.key_values(fields, title=entry["name"])
    if entry["metadata"]:
        output.table([{"key": k, "value": _pretty(v)} for k, v in sorted(entry["metadata"].items())],
                     ["key", "value"], title="metadata")


@catalog.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def show_cmd(ref, as_json):
    """Every field of one entry: NAME, HASH-PREFIX (sha256, AutoV3, AutoV1) or PATH."""
    from adapterhub.catalog import show

    with _open() as cat:
        entry = show(cat, ref)
    output.emit(entry, as_json, _render_entry)


# ------------------------------------------------------------------------------------------------
# editing
# ------------------------------------------------------------------------------------------------
@catalog.command("tag")
@click.argument("ref")
@click.argument("action", type=click.Choice(["add", "rm"]))
@click.argument("tags", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def tag_cmd(ref, action, tags, as_json):
    """Add or remove tags: catalog tag NAME add|rm TAG..."""
    from adapterhub.catalog import tag

    with _open() as cat:
        output.emit(tag(cat, ref, action, tags), as_json)


@catalog.command("note")
@click.argument("ref")
@click.argument("text", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def note_cmd(ref, text, as_json):
    """Set an entry's note (no TEXT clears it)."""
    from adapterhub.catalog import note

    with _open() as cat:
        output.emit(note(cat, ref, " ".join(text)), as_json)


@catalog.command("rate")
@click.argument("ref")
@click.argument("rating", type=click.IntRange(0, 5), required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def rate_cmd(ref, rating, as_json):
    """Rate an entry 0 to 5 (no RATING clears it)."""
    from adapterhub.catalog import rate

    with _open() as cat:
        output.emit(rate(cat, ref, rating), as_json)


@catalog.command("prune")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def prune_cmd(as_json):
    """Remove the entries whose files are missing."""
    from adapterhub.catalog import prune

    with _open() as cat:
        removed = prune(cat)
    numbered = {str(i + 1): path for i, path in enumerate(removed)}
    output.emit({"removed": len(removed), "paths": removed}, as_json,
                lambda d: output.key_values({"removed": d["removed"], **numbered}))


# ------------------------------------------------------------------------------------------------
# overview, export, import
# ------------------------------------------------------------------------------------------------
def _render_dupes(groups: list[dict]) -> None:
    rows = [{"kind": g["kind"], "hash": g["hash"], "name": e["name"],
             "path": e["path"] + (" (missing)" if e["missing"] else "")} for g in groups for e in g["entries"]]
    output.table(rows, ["kind", "hash", "name", "path"], title=f"{len(groups)} groups of duplicates")


@catalog.command("dupes")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def dupes_cmd(as_json):
    """Duplicates: identical files, and the same tensors with different metadata."""
    from adapterhub.catalog import dupes

    with _open() as cat:
        output.emit(dupes(cat), as_json, _render_dupes)


@catalog.command("stats")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def stats_cmd(as_json):
    """Counts by type and base, sizes, missing and unreadable files."""
    from adapterhub.catalog import stats

    with _open() as cat:
        facts = stats(cat)
    output.emit(facts, as_json, lambda f: output.key_values({**f, "total_bytes": human_size(f["total_bytes"])}))


@catalog.command("export")
@click.option("--json", "as_json", is_flag=True, default=True, help="JSON (the only format)")
@click.option("--output", "-o", "out", type=click.Path(dir_okay=False), help="write to a file (default: stdout)")
@catalog_option
def export_cmd(as_json, out):
    """Export every entry (with tags, notes, ratings) as JSON."""
    from adapterhub.catalog import export
    from adapterhub.io import atomic_path
    from adapterhub.outputs import check_writable, write_failed

    if out is not None:
        check_writable(out, "--output")
    with _open() as cat:
        data = export(cat)
    if out is None:
        output.emit_json(data)
        return
    try:
        with atomic_path(out, suffix=".json") as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    except OSError as exc:  # a full disk: the atomic write kept the previous file
        raise write_failed(out, exc, "--output") from None
    click.echo(f"exported {len(data['entries'])} entries to {out}", err=True)


@catalog.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@catalog_option
def import_cmd(source, as_json):
    """Merge an export: add tags, fill empty notes and ratings, add unknown entries."""
    from adapterhub.catalog import import_

    with _open(create=True) as cat:
        output.emit(import_(cat, source), as_json)
