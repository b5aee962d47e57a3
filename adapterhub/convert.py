"""Convert an adapter file to another layout of its type (the service behind ``adapterhub convert``).

Four target names, each named after the tools that read it:

* ``kohya``: sd-scripts / LyCORIS files (``lora_unet_…``, ``lora_down`` / ``lora_up`` / ``alpha``; LoHa and
  LoKr in the LyCORIS names; module names as kohya writes them for the base: SD1/SD2 UNets by diffusers
  block names, SDXL UNets by sgm names, ``lora_unet_input_blocks_4_1_…``, with ``lora_te1_`` / ``lora_te2_``;
  Flux transformers by BFL's names, ``lora_unet_double_blocks_0_img_attn_qkv``);
* ``a1111``: what the AUTOMATIC1111 webui loads (the kohya layout for the LoRA family, ``emb_params`` /
  ``string_to_param`` / ``clip_l`` + ``clip_g`` embeddings, a single-file ControlNet, TencentARC
  T2I-Adapters, the hypernetwork ``.pt``);
* ``diffusers``: what diffusers' loaders read (``load_lora_weights``, ``load_textual_inversion``,
  ``ControlNetModel.from_pretrained`` ...); the LoRA file is one ComfyUI also reads in full;
* ``peft``: PEFT adapter folders (``PeftModel.from_pretrained``).

Which targets exist for a type is the type's own declaration, ``AdapterType.convert_targets`` (a tuple of
these names), the built-in types' like a third-party type's: this module names no type. Which tool reads which
layout, each claim with its test: ``docs/interop.md``. The type's own
``save(adapter, path, target)`` writes the layout; this service loads the source with whatever layout
it has, records the conversion in the metadata (``adapterhub.converted_from`` = the source layout,
``adapterhub.converted_from_sha256`` = the source's sha256, every other key kept), writes into a
staging folder beside OUT, reads the result back with our own parser, and only then moves it into
place: a failure at any step leaves OUT as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adapterhub.api import load
from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.hashes import sha256_file
from adapterhub.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from adapterhub.types import Adapter, AdapterType
from adapterhub.weights import WEIGHT_FAMILIES, check_adapter_finite

TARGET_NAMES = ("kohya", "diffusers", "peft", "a1111")
CONVERTED_FROM = "adapterhub.converted_from"
CONVERTED_FROM_SHA256 = "adapterhub.converted_from_sha256"
FILE_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES


def targets_of(adapter_type: AdapterType) -> tuple[str, ...]:
    """The target names ``adapter_type`` declares (``convert_targets``; empty: it does not convert)."""
    return tuple(getattr(adapter_type, "convert_targets", None) or ())


def convert(source: str | os.PathLike, to: str, out: str | os.PathLike, force: bool = False) -> dict:
    """Write ``source`` in the ``to`` layout at ``out``; returns what was done (see :func:`_summary`)."""
    to = str(to).strip().lower()
    if to not in TARGET_NAMES:
        raise AdapterhubError(f"--to {to!r}: choose one of {', '.join(TARGET_NAMES)}")
    source, out = Path(source), Path(out)
    if out.exists() or out.is_symlink():
        if source.exists() and out.resolve() == source.resolve():
            raise AdapterhubError(f"{out}: is the file being converted; write the conversion elsewhere")
        if not force:
            raise AdapterhubError(f"{out}: already exists (pass --force to replace it)")
    adapter = load(source)
    _check_convertible(adapter, to)
    check_adapter_finite(adapter)  # a NaN / Inf tensor or alpha is refused, not copied into the new layout
    digest = sha256_file(source)
    source_format = adapter.format
    adapter.metadata = {**adapter.metadata, CONVERTED_FROM: source_format, CONVERTED_FROM_SHA256: digest}
    written = _write(adapter, to, out)
    return _summary(adapter, source, source_format, digest, to, out, written)


def _check_convertible(adapter: Adapter, to: str) -> None:
    targets = targets_of(adapter.plugin)
    if to not in targets:
        have = f"layouts for it: {', '.join(targets)}" if targets else "it has no layout to convert to"
        raise AdapterError(adapter.path, f"{_article(adapter.type)} {adapter.type} has no {to} layout; {have}")
    if adapter.family not in WEIGHT_FAMILIES:
        raise AdapterError(adapter.path, f"this {adapter.type} is for {adapter.family} models; only Stable Diffusion, "
                                         "Flux and SD3 adapters convert")
    for entry in (adapter.extra.get("refused") or {}).values():
        raise AdapterError(adapter.path, f"holds {entry['count']} modules of {entry['label']}, which no other layout "
                                         "can carry", entry["first_key"])


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _write(adapter: Adapter, to: str, out: Path) -> Adapter:
    """Save into a staging folder beside ``out``, read it back, then move it into place; returns the
    adapter read back from the result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert", dir=out.parent))
    try:
        try:
            written = Path(adapter.plugin.save(adapter, staging / out.name, to))
            _check_name(written, out, adapter, to)
            again = load(written)
        except AdapterError as exc:  # name OUT, not the staging copy
            if exc.path and exc.path.startswith(str(staging)):
                raise AdapterError(out, exc.problem, exc.key) from None
            raise
        _replace(written, out, staging)
        again.path = out
        return again
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_name(written: Path, out: Path, adapter: Adapter, to: str) -> None:
    """A file layout wants a file name with a suffix the readers know, a folder layout a plain name."""
    if written.is_file() and out.suffix.lower() not in FILE_SUFFIXES:
        raise AdapterhubError(f"--out {out}: the {to} layout of a {adapter.type} is a single file; name it "
                              f"{out.name}.safetensors (or .pt where the tools take a pickle)")
    if written.is_dir() and out.suffix.lower() in FILE_SUFFIXES:
        raise AdapterhubError(f"--out {out}: the {to} layout of a {adapter.type} is a folder; give it a folder name "
                              f"such as {out.with_suffix('').name}")


def _replace(written: Path, out: Path, staging: Path) -> None:
    """Move ``written`` to ``out``; an old ``out`` (file or folder) goes into ``staging`` first and comes
    back if the move fails."""
    old = None
    if out.exists() or out.is_symlink():
        old = staging / ".replaced"
        os.replace(out, old)
    try:
        os.replace(written, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise


def _summary(adapter: Adapter, source: Path, source_format: str, digest: str, to: str, out: Path,
             again: Adapter) -> dict:
    """type, from (the source layout), to, format (the layout read back), out, tensors written,
    metadata_kept (whether the written layout holds metadata), the source's sha256."""
    return {
        "source": str(source),
        "type": adapter.type,
        "from": source_format,
        "to": to,
        "format": again.format,
        "read_back_type": again.type,
        "out": str(out),
        "tensors": len(again.file.keys) if again.file is not None else 0,
        "metadata_kept": again.metadata.get(CONVERTED_FROM) == source_format,
        "source_sha256": digest,
    }


from adapterhub.callable_module import make_callable  # noqa: E402

make_callable(__name__, "convert")  # the package attribute may become this module: calling it calls convert()
