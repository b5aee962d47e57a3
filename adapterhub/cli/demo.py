"""``adapterhub demo``: the main job on the embedded default base, offline, in well under 2 minutes."""
from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli import output


@click.command("demo")
@click.option("--out", default="adapterhub-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the example adapters and the image.")
@click.option("--base", default="tiny-sd1", show_default=True, help="The base to run on.")
@click.option("--weight", default=0.5, show_default=True, help="Weight of each adapter in the merge.")
@click.option("--catalog", default=None, help="Catalog to register the examples in (default: $ADAPTERHUB_CATALOG or ./catalog.db).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def demo(out, base, weight, catalog, as_json):
    """Build the tiny base, write an adapter of each type, inspect, merge and render an image."""
    from adapterhub.demo import NOISE_NOTE, run_demo

    output.quiet_model_loading()
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    result = run_demo(Path(out), base=base, weight=weight, catalog=catalog, progress=say)
    data = {"out": str(result.out), "image": str(result.image), "chart": str(result.chart),
            "seconds": round(result.seconds, 1), "adapters": result.adapters, "catalog": result.catalog,
            "note": NOISE_NOTE}

    def render(d):
        output.table(d["adapters"], ["name", "type", "format", "base", "rank", "alpha", "targets"],
                     title="example adapters (inspected, then merged)")
        click.echo(f"image (base | merged | difference): {d['image']}   total {d['seconds']} s")
        click.echo(f"note: {d['note']}")
        click.echo(f"what each adapter changes, per block: {d['chart']}")

    output.emit(data, as_json, render)
