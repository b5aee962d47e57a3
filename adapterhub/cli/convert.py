"""``adapterhub convert FILE --to kohya|diffusers|peft|a1111 --out OUT [--force] [--json]``."""
from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli import output
from adapterhub.errors import AdapterhubError
from adapterhub.names import resolve_adapter
from adapterhub.outputs import check_writable, write_failed


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

    source = resolve_adapter(file)
    _check_out(Path(out))
    try:
        result = convert(source, to, out, force=force)
    except OSError as exc:
        raise _os_error(exc, Path(out)) from None
    output.emit(result, as_json, _render)


def _check_out(out: Path) -> None:
    """Before any work: ``out`` can be written, and a file layout never replaces a folder (not even with
    --force, which replaces an earlier output, not a folder that happens to have a file's name)."""
    from adapterhub.convert import FILE_SUFFIXES

    if out.is_dir() and not out.is_symlink() and out.suffix.lower() in FILE_SUFFIXES:
        raise AdapterhubError(f"--out {out}: is a folder; a {out.suffix} file cannot replace it "
                              "(name a file, or remove the folder)")
    check_writable(out)


def _os_error(exc: OSError, out: Path) -> AdapterhubError:
    """A failed write names OUT (its staging copy is gone, an old OUT kept); a failed read, the file read."""
    where = Path(exc.filename) if exc.filename else None
    if where is None or where.absolute().is_relative_to(out.absolute().parent):
        return write_failed(out, exc)
    return AdapterhubError(f"{where}: cannot read: {exc.strerror or exc}")
