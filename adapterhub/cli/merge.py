"""``adapterhub merge --base BASE --out OUT FILE[:WEIGHT]...``."""
from __future__ import annotations

import click

from adapterhub.cli import output
from adapterhub.cli.args import resolve_adapter, split_weight


@click.command("merge")
@click.option("--base", required=True, help="tiny-sd1, tiny-sdxl, a diffusers folder, a .safetensors checkpoint or a hub id.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=True), help="A diffusers folder, or a single-file checkpoint if it ends in .safetensors.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Output precision (default: the base's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.argument("adapters", nargs=-1, required=True)
def merge_cmd(base, out, dtype, as_json, adapters):
    """Bake one or more adapters (FILE[:WEIGHT], or catalog names) into the UNet and text encoder(s)."""
    from pathlib import Path

    from adapterhub.merge import merge_files

    output.quiet_model_loading()
    specs = []
    for spec in adapters:
        name, weight = split_weight(spec)
        specs.append((resolve_adapter(name), weight))
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    result = merge_files(base, specs, Path(out), dtype, progress=say)
    output.emit(result.as_dict(), as_json, lambda d: output.table(d["adapters"], ["path", "type", "format", "weight", "targets"],
                                                                 title=f"merged into {d['out']} in {d['seconds']} s"))
