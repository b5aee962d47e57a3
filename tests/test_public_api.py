"""The public Python API: what a programmatic user needs is importable from ``adapterhub`` itself, and
importing it stays light."""
from __future__ import annotations

import subprocess
import sys

import pytest

import adapterhub

NAMES = ("load", "inspect", "identify", "convert", "load_base", "Stack", "Generator", "Request", "train",
         "TrainConfig", "Catalog", "open_catalog", "Adapter", "AdapterType", "Handle", "Patch", "Sniff",
         "AdapterError", "AdapterhubError")


@pytest.mark.parametrize("name", NAMES)
def test_every_public_name_resolves_to_the_service_it_names(name):
    value = getattr(adapterhub, name)
    assert callable(value)
    assert getattr(value, "__module__", getattr(value, "__name__", "")).startswith("adapterhub")
    assert name in adapterhub.__all__ and name in dir(adapterhub)


@pytest.mark.parametrize("name", ["convert", "train"])
def test_service_functions_stay_callable_after_their_module_is_imported(name):
    """``adapterhub.convert`` / ``adapterhub.train`` are also submodules: once imported, Python sets the
    package attribute to the module. Calling it must still call the function."""
    import importlib
    from unittest import mock

    module = importlib.import_module(f"adapterhub.{name}")
    assert callable(module)
    with mock.patch.object(module, name) as function:
        module("x", to="kohya") if name == "convert" else module("cfg")
    function.assert_called_once()


def test_from_adapterhub_import_works_for_the_services():
    from adapterhub import Generator, Stack, load_base, train  # noqa: F401
    from adapterhub.sample.generator import Generator as G
    from adapterhub.stack import Stack as S

    assert Stack is S and Generator is G


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapterhub.nope  # noqa: B018


def test_import_adapterhub_imports_neither_torch_nor_diffusers():
    code = "import sys, adapterhub; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_attach_through_the_adapter_with_options(fresh_sd1, tmp_path):
    """One way to attach: ``Adapter.attach(pipe, weight, **options)``, also for types with options."""
    import torch

    from adapterhub.plugins import adapter_types

    path = adapter_types()["lora"].example(fresh_sd1, tmp_path / "style.safetensors", seed=3)
    before = {k: v.clone() for k, v in fresh_sd1.unet.state_dict().items()}
    style = adapterhub.load(path)
    handle = style.attach(fresh_sd1, 0.8)
    assert any(not torch.equal(before[k], v) for k, v in fresh_sd1.unet.state_dict().items())
    handle.detach()
    assert all(torch.equal(before[k], v) for k, v in fresh_sd1.unet.state_dict().items())
