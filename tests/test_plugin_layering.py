"""Plugins sit below the services: a plugin (``plugins/``, and the third-party test plugin) imports only the
contract (``adapterhub.types``, ``hookspecs``, ``io``, ``weights``, ``conditioning``, ``control`` ...), never the
training, sampling or serving services nor the CLI, which sit above it (``DESIGN.md``, layers).

The scan reads every module with :mod:`ast`: ``import adapterhub.train.x``, ``from adapterhub.sample.y import z``
and ``from adapterhub import cli`` all count (function-level imports too). A finding must be in :data:`PENDING` (an
import still to move below the plugins, owned elsewhere, each with its reason); an entry that no longer matches
fails too, so the list stays exact.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("train", "cli", "sample", "serve")  # the layers above the plugins that a plugin must not import
SCANNED = (ROOT / "plugins", ROOT / "tests" / "thirdparty_plugin" / "src")

PENDING: dict[tuple[str, str], str] = {}  # imports still to move below the plugins (none left)


def _is_service(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "adapterhub" and len(parts) > 1 and parts[1] in SERVICES


def imported_services(source: str) -> set[str]:
    """The modules of the services above the plugins that ``source`` imports (dotted names)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if _is_service(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_service(node.module):
                found.add(node.module)
            elif node.module == "adapterhub":
                found |= {f"adapterhub.{a.name}" for a in node.names if a.name in SERVICES}
    return found


def _findings() -> set[tuple[str, str]]:
    return {(str(path.relative_to(ROOT)), module) for folder in SCANNED for path in sorted(folder.rglob("*.py"))
            for module in imported_services(path.read_text(encoding="utf-8"))}


def test_scan_finds_every_import_form():
    source = ("import adapterhub.train.control\nfrom adapterhub.sample.infotext import x\n"
              "from adapterhub import cli, types\nfrom adapterhub.control import ControlTrainable\n"
              "def f():\n    import adapterhub.serve as s\n    from adapterhub.training import y\n"
              "from . import train\n")
    assert imported_services(source) == {"adapterhub.train.control", "adapterhub.sample.infotext",
                                         "adapterhub.cli", "adapterhub.serve"}


def test_plugins_import_no_service_above_them():
    found = _findings()
    unexpected = sorted(found - set(PENDING))
    assert not unexpected, "plugins importing a layer above them (use the contract in core instead):\n" + \
        "\n".join(f"  {path}: {module}" for path, module in unexpected)
    stale = sorted(set(PENDING) - found)
    assert not stale, "pending entries that match nothing (remove them):\n" + \
        "\n".join(f"  {path}: {module}" for path, module in stale)


def test_control_trainable_is_core_contract():
    """The control-model trainable base is in core, below the plugins, and the training service keeps no copy."""
    import adapterhub.train.control as service
    from adapterhub.control import ControlTrainable, check_out, control_metadata
    from adapterhub.types import Trainable
    from adapterhub_plugins.controlnet.train import ControlNetTrainable
    from adapterhub_plugins.t2i_adapter.train import T2IAdapterTrainable

    assert issubclass(ControlTrainable, Trainable)
    assert issubclass(ControlNetTrainable, ControlTrainable) and issubclass(T2IAdapterTrainable, ControlTrainable)
    assert callable(check_out) and callable(control_metadata)
    assert not {"ControlTrainable", "check_out", "control_metadata"} & set(vars(service))


def test_the_server_imports_nothing_of_the_training_service():
    """Services sit side by side: what the server shares with training (the canny preprocessor) is core."""
    found = {(str(path.relative_to(ROOT)), module) for path in sorted((ROOT / "adapterhub" / "serve").rglob("*.py"))
             for module in imported_services(path.read_text(encoding="utf-8"))
             if module.startswith("adapterhub.train")}
    assert not found, f"the server imports the training service: {sorted(found)}"


def test_canny_is_core_and_shared():
    """One canny preprocessor, in core: training and the server use the same function."""
    import adapterhub.serve.controls as serve_controls  # noqa: F401  (imports it where it is used)
    import adapterhub.train.control as train_control
    from adapterhub.preprocessors import canny

    assert train_control.canny is canny
