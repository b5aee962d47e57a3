"""``adapterhub inspect FILE [--json]``."""
from __future__ import annotations

import click

from adapterhub.cli import output
from adapterhub.names import resolve_adapter


def _render(facts: dict) -> None:
    shown = {k: v for k, v in facts.items() if k != "metadata"}
    output.key_values(shown, title=facts.get("name"))
    meta = facts.get("metadata") or {}
    if meta:
        output.table([{"key": k, "value": v if len(v) < 120 else v[:117] + "..."} for k, v in sorted(meta.items())],
                     ["key", "value"], title="metadata")


@click.command("inspect")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (type, format, base, rank, alpha, targets, metadata, sha256).")
@click.option("--no-hash", is_flag=True, help="Skip the sha256 of the file.")
def inspect_cmd(file: str, as_json: bool, no_hash: bool):
    """Identify an adapter file and show its type, layout, base, rank, targets and metadata."""
    import adapterhub

    facts = adapterhub.inspect(resolve_adapter(file), with_hash=not no_hash)
    output.emit(facts, as_json, _render)
