"""``adapterhub merge --base BASE --out OUT SPEC...`` (SPEC: ``FILE[:WEIGHT][:te=W][:unet=W][:lbw=...]``)."""
from __future__ import annotations

import click

from adapterhub.cli import output


@click.command("merge")
@click.option("--base", required=True, help="tiny-sd1, tiny-sdxl, a diffusers folder, a .safetensors checkpoint or a hub id.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=True), help="A diffusers folder, or a single-file checkpoint if it ends in .safetensors.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Output precision (default: the base's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.argument("adapters", nargs=-1, required=True, metavar="SPEC...")
def merge_cmd(base, out, dtype, as_json, adapters):
    """Bake one or more adapters into the UNet and text encoder(s).

    Each SPEC is FILE (or a catalog name / hash prefix) with optional fields, or several such entries
    separated by commas: FILE[:WEIGHT[:UNET]][:te=W][:unet=W][:lbw=PRESET|v1,v2,...], e.g.
    style.safetensors:0.8  char:0.6:unet=0.3  detail:1:lbw=OUTS. Block weights: 17 or 26 values
    (SD1/SD2), 12 or 20 (SDXL), or a preset: ALL NONE INS IND INALL MIDD OUTD OUTS OUTALL ALL0.5."""
    from pathlib import Path

    from adapterhub.merge import merge_files
    from adapterhub.stack import Stack

    output.quiet_model_loading()
    stack = Stack(entry for spec in adapters for entry in Stack.parse(spec).entries)
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    result = merge_files(base, stack, Path(out), dtype, progress=say)
    columns = ["path", "type", "format", "weight", "targets"]
    columns[4:4] = [c for c in ("unet", "lbw") if any(c in row for row in result.adapters)]
    output.emit(result.as_dict(), as_json, lambda d: output.table(d["adapters"], columns,
                                                                 title=f"merged into {d['out']} in {d['seconds']} s"))
