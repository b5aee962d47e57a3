"""The environment adapterhub runs in: package versions, known-bad combinations, device and compiler.

Versions are read from the installed distributions' metadata (``importlib.metadata``), so checking them
imports no heavy library. :func:`conflicts` finds combinations that pip can resolve but that do not work
together; a feature that needs one of the libraries involved calls :func:`require_compatible` first and gets
one line saying what to install, instead of a traceback from deep inside a library.

``adapterhub doctor`` prints all of this (``environment_report``).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from adapterhub.errors import AdapterhubError

# The libraries a report names, in the order a person reads them (distribution names).
REPORTED = ("torch", "torchvision", "diffusers", "transformers", "peft", "safetensors", "open_clip_torch",
            "accelerate", "huggingface_hub", "tokenizers", "numpy", "sqlmodel", "pluggy", "click")


def version_of(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def parse_version(text: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the leading release numbers (enough for the bounds below)."""
    numbers = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(numbers)


# transformers' floor for peft in its PEFT integration (its ``MIN_PEFT_VERSION``), by the transformers
# release that raised it. Used for versions other than the installed one (whose floor is read from its
# source); 5.24 raised it from 0.20 to 0.22 (before peft 0.22.0 was released: a fresh install then paired
# transformers 5.24+ with peft 0.21, which the tested set now avoids with peft 0.22.0).
PEFT_FLOORS = (("5.0", "0.20"), ("5.24", "0.22"))
PEFT_USERS = "diffusers + PEFT LoRA loading (load_lora_weights on text encoders, the bench's LoRA reference)"


def transformers_peft_floor(transformers_version: str) -> str | None:
    """The oldest peft that ``transformers_version``'s PEFT integration accepts."""
    installed = importlib.util.find_spec("transformers") and metadata.version("transformers")
    if transformers_version == installed:  # the installed release says it itself
        spec = importlib.util.find_spec("transformers")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            source = Path(folder, "integrations", "peft.py")
            found = source.is_file() and re.search(r'MIN_PEFT_VERSION\s*=\s*"([^"]+)"', source.read_text())
            if found:
                return found.group(1)
    floor = None
    for since, minimum in PEFT_FLOORS:
        if parse_version(transformers_version) >= parse_version(since):
            floor = minimum
    return floor


def _same_version(a: str, b: str) -> bool:
    """``0.22`` and ``0.22.0`` alike (transformers' source writes its floor with the patch number, the table not)."""
    x, y = parse_version(a), parse_version(b)
    width = max(len(x), len(y))
    return x + (0,) * (width - len(x)) == y + (0,) * (width - len(y))


def installed_versions(names=REPORTED) -> dict[str, str | None]:
    return {name: version_of(name) for name in names}


def conflicts(versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per known-bad combination in ``versions`` (default: the installed packages), each saying
    what breaks and what to install."""
    versions = {**installed_versions(("transformers", "peft")), **(versions or {})}
    found = []
    transformers, peft = versions.get("transformers"), versions.get("peft")
    floor = transformers and peft and transformers_peft_floor(transformers)
    if floor and parse_version(peft) < parse_version(floor):
        raised = next((since for since, minimum in PEFT_FLOORS if _same_version(minimum, floor)), None)
        older = f"'transformers<{raised}' (the tested set: pip install -c constraints.txt ...) or " if raised else ""
        found.append(f"transformers {transformers} requires peft >= {floor} (installed: {peft}), so {PEFT_USERS} "
                     f"fails; install {older}'peft>={floor}'")
    return found


def require_compatible(*libraries: str) -> None:
    """Raise one line (what to install) when a known conflict involves any of ``libraries``."""
    for line in conflicts():
        if any(name in line for name in libraries):
            raise AdapterhubError(f"incompatible packages: {line}")


def read_pins(path: str | Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by :func:`canonical_name` (comments ignored)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonical_name(name)] = version.strip()
    return pins


def tested_set() -> dict[str, str]:
    """The pinned versions of ``constraints.txt`` beside the source tree (an editable install), else {}."""
    path = Path(__file__).resolve().parents[1] / "constraints.txt"
    return read_pins(path) if path.is_file() else {}


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``open_clip_torch`` == ``open-clip-torch``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _device() -> dict:
    import torch

    info = {"cuda": torch.cuda.is_available(), "mps": bool(getattr(torch.backends, "mps", None)
                                                        and torch.backends.mps.is_available())}
    if info["cuda"]:
        info["name"] = torch.cuda.get_device_name(0)
        info["count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
        info["default"] = "cuda"
    else:
        info["default"] = "mps" if info["mps"] else "cpu"
    info["threads"] = torch.get_num_threads()
    return info


def _compile_backend(device: dict) -> dict:
    """What ``--backend compiled`` can use here: inductor needs a C compiler on CPU and Triton on CUDA."""
    import torch

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    triton = importlib.util.find_spec("triton") is not None
    inductor_cpu = compiler is not None
    inductor_cuda = device["cuda"] and triton
    if device["cuda"]:
        backend, why = ("inductor", "Triton found") if inductor_cuda else ("aot_eager", "Triton is not installed")
    else:
        backend, why = (("inductor", f"C++ compiler {compiler}") if inductor_cpu
                        else ("aot_eager", "no C++ compiler found for inductor's CPU code"))
    chosen = os.environ.get("ADAPTERHUB_COMPILE_BACKEND")
    return {"torch_compile": hasattr(torch, "compile"), "backend": chosen or backend,
            "why": f"$ADAPTERHUB_COMPILE_BACKEND={chosen}" if chosen else why,
            "cxx": compiler, "triton": triton}


def environment_report() -> dict:
    """Everything ``adapterhub doctor`` shows, as plain data."""
    versions = installed_versions()
    pins = tested_set()
    tested = {name: pins.get(canonical_name(name)) for name in versions}
    differs = {name: {"installed": have, "tested": tested[name]}
               for name, have in versions.items() if tested[name] is not None and have != tested[name]}
    device = _device()
    return {"adapterhub": version_of("adapterhub"), "python": platform.python_version(),
            "platform": platform.platform(), "executable": sys.executable, "packages": versions,
            "tested": tested, "differs_from_tested": differs, "device": device, "compile": _compile_backend(device),
            "conflicts": conflicts(versions)}
