"""The environment: the tested set (constraints.txt) inside the declared ranges, known-bad combinations
explained in one line (`adapterhub doctor`, the features that need the libraries involved)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

from adapterhub import compat
from adapterhub.cli import cli
from adapterhub.errors import AdapterhubError

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    return compat.read_pins(ROOT / "constraints.txt")


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_tested_set_pins_every_declared_dependency_inside_its_range():
    pins = _pins()
    for req in _declared():
        name = compat.canonical_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"


def test_the_installed_transformers_floor_for_peft_is_read_from_transformers_itself():
    from transformers.integrations import peft as integration  # the oracle: what transformers enforces

    installed = compat.version_of("transformers")
    assert compat.transformers_peft_floor(installed) == integration.MIN_PEFT_VERSION
    assert compat.conflicts() == [], "the installed set has a known conflict"


def _pretend(monkeypatch, **versions):
    real = compat.version_of
    monkeypatch.setattr(compat, "version_of", lambda name: versions.get(name, real(name)))


def test_doctor_explains_the_transformers_peft_mismatch(monkeypatch):
    """transformers 5.25 with peft 0.21.2: what a fresh install resolved on 2026-12-07 (issue #14)."""
    _pretend(monkeypatch, transformers="5.25.0", peft="0.21.2")
    result = CliRunner().invoke(cli, ["doctor"], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "transformers 5.25.0 requires peft >= 0.22 (installed: 0.21.2)" in result.output \
        or "transformers 5.25.0 requires peft >= 0.22.0 (installed: 0.21.2)" in result.output
    assert "'transformers<5.24'" in result.output
    assert "'peft>=0.22'" in result.output or "'peft>=0.22.0'" in result.output
    assert "Traceback" not in result.output


def test_the_older_transformers_is_suggested_whatever_way_the_floor_is_written(monkeypatch):
    """transformers' own source writes its floor ``0.22.0`` (what doctor reads for the installed release), our
    table ``0.22``: either way the release that raised it is named."""
    monkeypatch.setattr(compat, "transformers_peft_floor", lambda version: "0.22.0")
    (line,) = compat.conflicts({"transformers": "5.25.0", "peft": "0.21.2"})
    assert "requires peft >= 0.22.0" in line and "'transformers<5.24'" in line and "'peft>=0.22.0'" in line


def test_doctor_json_names_versions_device_and_compiler():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "open_clip_torch", "accelerate"):
        assert report["packages"][name] == compat.version_of(name)
        assert report["tested"][name] == _pins()[compat.canonical_name(name)]
    assert report["device"]["default"] in ("cpu", "cuda", "mps")
    assert report["compile"]["backend"] in ("inductor", "aot_eager") or report["compile"]["why"].startswith("$")
    assert report["conflicts"] == []


def test_features_that_need_peft_refuse_in_one_line_under_the_mismatch(monkeypatch):
    from adapterhub.cli.bench import harness

    _lora_reference_unavailable = harness("sample")._lora_reference_unavailable
    assert _lora_reference_unavailable() is None
    _pretend(monkeypatch, transformers="5.24.0", peft="0.21.2")
    why = _lora_reference_unavailable()
    assert why and "peft >= 0.22" in why and "\n" not in why
    with pytest.raises(AdapterhubError, match=r"incompatible packages: transformers 5.24.0 requires peft >= 0.22"):
        compat.require_compatible("peft")
    compat.require_compatible("open_clip_torch")  # unrelated features are not refused
