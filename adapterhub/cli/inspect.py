"""``adapterhub inspect FILE [--json]``."""
from __future__ import annotations

import click

from adapterhub.cli import output
from adapterhub.names import resolve_adapter


def _render(facts: dict) -> None:
    shown = {k: v for k, v in facts.items() if k not in ("metadata", "block_norms")}
    output.key_values(shown, title=facts.get("name"))
    meta = facts.get("metadata") or {}
    if meta:
        output.table([{"key": k, "value": v if len(v) < 120 else v[:117] + "..."} for k, v in sorted(meta.items())],
                     ["key", "value"], title="metadata")


@click.command("inspect")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (type, format, base, rank, alpha, targets, metadata, sha256).")
@click.option("--no-hash", is_flag=True, help="Skip the sha256 of the file.")
@click.option("--plot", "plot", default=None, type=click.Path(dir_okay=False),
              help="Draw the norm of the adapter's weight changes per block (UNet blocks; a Flux / SD3 transformer's "
                   "blocks) into this PNG (weight-space types: LoRA, LoCon, LoHa, LoKr ...); --json adds the "
                   "numbers as block_norms.")
def inspect_cmd(file: str, as_json: bool, no_hash: bool, plot: str | None):
    """Identify an adapter file and show its type, layout, base, rank, targets and metadata."""
    import adapterhub

    path = resolve_adapter(file)
    facts = adapterhub.inspect(path, with_hash=not no_hash)
    if plot is not None:
        from adapterhub.deltachart import measure, save_chart

        adapter = adapterhub.load(path)
        norms, unmeasured = measure(adapter)  # a type with no weight deltas fails here, nothing written
        label = facts.get("name") or path.stem
        row = norms if norms or not unmeasured else \
            f"no bars: the change of its {unmeasured} modules depends on the base weights"
        title = f"{path.name}: weight change per block"
        if norms and unmeasured:
            title += f" ({unmeasured} of {len(adapter.patches)} modules not drawn: their change depends on the base)"
        save_chart([(label, row)], plot, title=title)
        facts["block_norms"], facts["plot"] = norms, str(plot)
        if unmeasured:
            facts["not_drawn"] = unmeasured
    output.emit(facts, as_json, _render)
