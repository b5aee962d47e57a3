"""Bake adapters into a base model and save it (the service behind ``adapterhub merge``)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.outputs import check_writable, write_failed
from adapterhub.types import Adapter
from adapterhub.weights import WEIGHT_FAMILIES, merge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergeResult:
    out: Path
    base: str
    adapters: list[dict]
    seconds: float

    def as_dict(self) -> dict:
        return {"out": str(self.out), "base": self.base, "adapters": self.adapters, "seconds": round(self.seconds, 3)}


def merge_adapters(pipe, entries: list[tuple[Adapter, float]]) -> None:
    """Weight-space adapters go through the engine together (all validated before the first change);
    the other types bake themselves in through their plugin afterwards."""
    merge(pipe, [(a, w) for a, w in entries if a.plugin.weight_space])
    for adapter, weight in entries:
        if not adapter.plugin.weight_space:
            adapter.merge_into(pipe, weight)


def check_target(out: Path) -> None:
    """Before any work: ``out`` can be written, and writing it destroys nothing of the user's. A single
    file is refused where a folder stands; a diffusers folder replaces only an earlier model (a folder
    with ``model_index.json``) or an empty folder, never some other folder of files."""
    if out.is_dir():
        if out.suffix.lower() == ".safetensors":
            raise AdapterhubError(f"--out {out}: is a folder; a single-file checkpoint cannot replace it "
                                  "(name a file, or a folder without the .safetensors suffix)")
        if not (out / "model_index.json").is_file() and any(out.iterdir()):
            raise AdapterhubError(f"--out {out}: is a folder of other files, not a diffusers model; "
                                  "refusing to replace it (name a new or empty folder)")
    check_writable(out)


def base_architecture(base: str) -> str:
    """The architecture of ``base`` as far as it can be told without loading weights: a preset's name,
    a diffusers folder's UNet (or text encoder) config, a safetensors checkpoint's header. Anything else
    (a pickle checkpoint, a hub id, an unreadable file) is ``unknown``; loading will tell."""
    from adapterhub.base import PRESETS

    if base in PRESETS:
        return base
    path = Path(base).expanduser()
    try:
        if path.is_dir():
            return _folder_architecture(path)
        if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
            return _checkpoint_header_architecture(path)
    except (OSError, ValueError, AdapterhubError):  # unreadable here: load_base reports it properly
        pass
    return "unknown"


def _folder_architecture(folder: Path) -> str:
    from adapterhub.archs import TEXT2_WIDTH, TEXT_WIDTH, arch_from_context_width

    def config(part: str) -> dict:
        file = folder / part / "config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    width = config("unet").get("cross_attention_dim")
    arch = arch_from_context_width(width[0] if isinstance(width, list) else width)
    if arch != "unknown":
        return arch
    second = config("text_encoder_2").get("hidden_size")
    if second is not None:
        return TEXT2_WIDTH.get(second, "unknown")
    return TEXT_WIDTH.get(config("text_encoder").get("hidden_size"), "unknown")


def _checkpoint_header_architecture(path: Path) -> str:
    from adapterhub.archs import arch_from_metadata
    from adapterhub.base import METADATA_KEY, PRESETS, detect_architecture
    from adapterhub.io import read_safetensors_header

    header, metadata, _ = read_safetensors_header(path)
    if metadata.get(METADATA_KEY) in PRESETS:
        return metadata[METADATA_KEY]
    arch = detect_architecture({key: tuple(entry["shape"]) for key, entry in header.items()})
    return arch if arch != "unknown" else arch_from_metadata(metadata)


def _lineage(arch: str) -> str:
    """A tiny base stands in for its real architecture: adapters made for tiny-sd1 and sd1 share key
    names, and metadata-only detection cannot tell them apart, so only lineages are compared early."""
    return arch.removeprefix("tiny-")


SD_FAMILY = "stable-diffusion"
FAMILY_LABELS = {SD_FAMILY: "Stable Diffusion"}


def base_family(base: str) -> tuple[str, str, int | None]:
    """``(family, architecture, hidden width)`` of ``base`` as its files tell without building it: a
    transformer family (``flux`` / ``sd3``) with its width (None where the files do not say), or Stable
    Diffusion with its architecture, or ``("unknown", "unknown", None)``."""
    from adapterhub.transformer_bases import transformer_base_facts

    facts = transformer_base_facts(base)
    if facts is not None:
        return facts[0], facts[0], facts[1]
    arch = base_architecture(base)
    return (SD_FAMILY if arch != "unknown" else "unknown"), arch, None


def _family_phrase(family: str) -> str:
    label = FAMILY_LABELS.get(family, family)
    vowel = label[:1] in "aeiou" or label.startswith("sd")  # "an sd3", "a flux", "a Stable Diffusion"
    return f"{'an' if vowel else 'a'} {label}"


def check_fits_base(base: str, adapters: list[Adapter]) -> None:
    """Before the base is loaded (minutes for a real Flux): each adapter is of ``base``'s family (Stable
    Diffusion, Flux, SD3) and made for its architecture (a Stable Diffusion lineage; a transformer's
    hidden width), as far as the files tell. An unknown side passes; the shapes are checked after
    loading, as always. Adapters are named by family and width, the names users know."""
    from adapterhub.transformer_bases import BASE_WIDTHS

    told = None
    for adapter in adapters:
        if adapter.family not in WEIGHT_FAMILIES:
            raise AdapterError(adapter.path, f"this is a {adapter.family} adapter, not a Stable Diffusion one")
        family, arch, width = told = base_family(base) if told is None else told
        first = next(iter(adapter.patches.values()), None)  # a key to look at, as later checks name one
        key = getattr(first, "source", None)
        mine = BASE_WIDTHS.get(adapter.base)
        if family == "unknown":
            continue
        if adapter.family != family:
            made = f" ({adapter.base})" if adapter.family == SD_FAMILY and adapter.base != "unknown" else (
                f" (hidden width {mine})" if mine else "")
            raise AdapterError(adapter.path, f"{_family_phrase(adapter.family)} adapter{made}, but the base {base} "
                                             f"is {_family_phrase(family)} model", key)
        if family != SD_FAMILY:
            if mine and width and mine != width:
                raise AdapterError(adapter.path, f"{_family_phrase(family)} adapter for hidden width {mine}, but "
                                                 f"the base {base} has hidden width {width}", key)
        elif adapter.base != "unknown" and _lineage(adapter.base) != _lineage(arch):
            named = "" if arch == base else f" ({arch})"
            raise AdapterError(adapter.path, f"made for {adapter.base}, but the base {base}{named} is a "
                                             "different architecture", key)


def merge_files(base: str, specs, out: Path, dtype: str | None = None,
                progress=lambda message: None) -> MergeResult:
    """``specs``: ``(path, weight)`` pairs, or stack entries / a :class:`~adapterhub.stack.Stack` (separate
    text-encoder and UNet multipliers, block weights); applied as a stack in ``merge`` mode."""
    from adapterhub.base import load_base
    from adapterhub.checkpoint import save_pipeline
    from adapterhub.stack import Stack

    if dtype is not None and dtype not in DTYPES:
        raise AdapterhubError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_target(Path(out))
    start = time.perf_counter()
    stack = specs if isinstance(specs, Stack) else Stack(specs)
    progress(f"reading {len(stack)} adapter(s)")
    stack.load()
    if Path(out).suffix == ".safetensors":
        for entry in stack.entries:
            adapter = entry.adapter
            if not adapter.plugin.single_file_merge:
                raise AdapterError(adapter.path, f"a {adapter.type} cannot be baked into a single-file checkpoint "
                                                 "(its tokens need a tokenizer): write a diffusers folder instead")
    check_fits_base(base, [entry.adapter for entry in stack.entries])
    progress(f"loading base {base}")
    pipe = load_base(base)
    progress("merging")
    stack.apply(pipe, mode="merge", dtype=DTYPES[dtype] if dtype else None)  # finite in the saved dtype too
    progress(f"writing {out}")
    try:
        save_pipeline(pipe, out, dtype=DTYPES[dtype] if dtype else None)
    except OSError as exc:  # a full disk, a read-only mount: the atomic write left the old output
        raise write_failed(out, exc) from None
    adapters = [entry.summary() for entry in stack.entries]
    return MergeResult(Path(out), base, adapters, time.perf_counter() - start)
