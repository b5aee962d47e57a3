"""``adapterhub convert FILE --to kohya|diffusers|peft|a1111 --out OUT [--force] [--json]``."""
from __future__ import annotations

import click

from adapterhub.cli import output
from adapterhub.names import resolve_adapter


def _render(data: dict) -> None:
    shown = dict(data)
    if not shown["metadata_kept"]:
        shown["metadata_kept"] = "no (this layout holds no metadata)"
    output.key_values(shown, title=f"{data['type']}: {data['from']} -> {data['to']} ({data['format']})")


@click.command("convert")
@click.argument("file")
@click.option("--to", "to", required=True, metavar="LAYOUT",
              help="kohya, diffusers, peft or a1111 (what the webui loads); a type has the ones that exist for it.")
@click.option("--out", "out", required=True, type=click.Path(),
              help="The file (.safetensors / .pt) or folder (peft, diffusers ControlNet / T2I-Adapter) to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert_cmd(file: str, to: str, out: str, force: bool, as_json: bool):
    """Convert an adapter to another layout of its type, keeping its metadata.

    LoRA / LoCon / AdaLoRA: kohya, a1111 (= kohya), diffusers (alpha baked into lora_B), peft (a folder
    with one PEFT adapter per component: unet/, text_encoder/, text_encoder_2/). LoHa: kohya, a1111, peft;
    LoKr: kohya, a1111. Textual inversion: a1111, diffusers. ControlNet and T2I-Adapter: diffusers
    (folder), a1111 (single file). Hypernetwork: a1111. The conversion is recorded in the metadata
    (adapterhub.converted_from, adapterhub.converted_from_sha256)."""
    from adapterhub.convert import convert

    result = convert(resolve_adapter(file), to, out, force=force)
    output.emit(result, as_json, _render)
