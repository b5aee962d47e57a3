"""Shared fixtures: a private adapterhub cache for the run, a private working directory for each test,
and the embedded tiny bases.

The caches are redirected in ``pytest_configure`` (before any test module is imported), so nothing a
test does can touch the user's ``~/.cache/adapterhub`` or Hugging Face cache (the hub is offline), and
``$ADAPTERHUB_CATALOG`` is not inherited. Every test runs in an empty directory of its own, so a
``catalog.db`` or demo output where pytest was started changes nothing. Set ``ADAPTERHUB_TEST_CACHE`` to
a folder to keep the built tiny bases between runs.

``tiny_sd1`` / ``tiny_sdxl`` are built once per session and shared: treat them as read-only. A test
that changes weights, tokenizers or schedulers takes ``fresh_sd1`` / ``fresh_sdxl``, deep copies.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_CACHE_ENV = "ADAPTERHUB_CACHE"
# variables set for the run (value) or removed from it (None); the user's values come back at the end
_PRIVATE_ENV = {"ADAPTERHUB_CATALOG": None, "HF_HUB_OFFLINE": "1", "HF_HOME": "hf"}


def _wild_adapters() -> Path:
    """The real-world adapter files (``shared/wild-adapters``): $ADAPTERHUB_WILD_ADAPTERS, else beside the
    checkout (``../shared/wild-adapters``). Tests that need them skip when they are missing, except in CI
    (``$CI`` set), where a missing folder stops the run: a suite must not shrink silently."""
    here = Path(__file__).resolve().parents[1]
    configured = os.environ.get("ADAPTERHUB_WILD_ADAPTERS")
    return Path(configured) if configured else here.parent / "shared" / "wild-adapters"


WILD_ADAPTERS = _wild_adapters()


def pytest_configure(config):
    if os.environ.get("CI") and not (WILD_ADAPTERS / "MANIFEST.tsv").is_file():
        raise pytest.UsageError(f"the real adapter files are missing ({WILD_ADAPTERS}/MANIFEST.tsv): CI runs every "
                                "wild-file test; set ADAPTERHUB_WILD_ADAPTERS to the shared/wild-adapters folder")
    # The test models are tiny and CI has 2 cores shared by 2 xdist workers: one intra-op thread per
    # process is 5-20x faster than two (measured on tiny-UNet steps and SVDs under load).
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    kept = os.environ.get("ADAPTERHUB_TEST_CACHE")
    folder = kept or tempfile.mkdtemp(prefix="adapterhub-test-cache-")
    config._adapterhub_cache = (folder, not kept, os.environ.get(_CACHE_ENV))
    os.environ[_CACHE_ENV] = folder
    config._adapterhub_env = {name: os.environ.get(name) for name in _PRIVATE_ENV}
    for name, value in _PRIVATE_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = os.path.join(folder, value) if name == "HF_HOME" else value


def pytest_unconfigure(config):
    for name, value in getattr(config, "_adapterhub_env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    folder, remove, previous = getattr(config, "_adapterhub_cache", (None, False, None))
    if folder is None:
        return
    if previous is None:
        os.environ.pop(_CACHE_ENV, None)
    else:
        os.environ[_CACHE_ENV] = previous
    if remove:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_working_directory(tmp_path_factory, monkeypatch):
    """Each test starts in an empty folder of its own (relative paths and ``./catalog.db`` land there)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def adapterhub_cache() -> Path:
    """The session's adapterhub cache folder (``$ADAPTERHUB_CACHE``)."""
    return Path(os.environ[_CACHE_ENV])


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd1(adapterhub_cache):
    """The SD1-shaped tiny base pipeline (shared by the session: do not modify it)."""
    from adapterhub.base import load_base

    return _quiet(load_base("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl(adapterhub_cache):
    """The SDXL-shaped tiny base pipeline (shared by the session: do not modify it)."""
    from adapterhub.base import load_base

    return _quiet(load_base("tiny-sdxl"))


@pytest.fixture(scope="module")
def tiny_flux(adapterhub_cache):
    """The FLUX.1-shaped tiny base pipeline, one per test module (a module may modify it)."""
    from adapterhub.base import load_base

    return _quiet(load_base("tiny-flux"))


@pytest.fixture(scope="module")
def tiny_sd3(adapterhub_cache):
    """The SD3-shaped tiny base pipeline, one per test module (a module may modify it)."""
    from adapterhub.base import load_base

    return _quiet(load_base("tiny-sd3"))


@pytest.fixture
def fresh_sd1(tiny_sd1):
    """A private deep copy of ``tiny_sd1`` that a test may modify (about 0.5 s)."""
    return copy.deepcopy(tiny_sd1)


@pytest.fixture
def fresh_sdxl(tiny_sdxl):
    """A private deep copy of ``tiny_sdxl`` that a test may modify (about 1 s)."""
    return copy.deepcopy(tiny_sdxl)


@pytest.fixture(scope="module")
def generators(tiny_sd1):
    """A compiled and an eager generator on copies of ``tiny_sd1``, compiled graphs from scratch (dynamo's
    ``aot_eager``: the capture and guards of inductor without code generation, the aten ops run one by one)."""
    import torch._dynamo

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        compiled = Generator(copy.deepcopy(tiny_sd1), backend="compiled", hash_model=False)
    eager = Generator(copy.deepcopy(tiny_sd1), backend="eager", hash_model=False)
    yield compiled, eager
    compiled.close()
    eager.close()
    torch._dynamo.reset()
