"""Shared fixtures: a private adapterhub cache for the run, and the embedded tiny bases.

The cache is redirected in ``pytest_configure`` (before any test module is imported), so nothing a
test does can touch the user's ``~/.cache/adapterhub``. Set ``ADAPTERHUB_TEST_CACHE`` to a folder to
keep the built tiny bases between runs.

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


def _wild_adapters() -> Path:
    """The real-world adapter files (``shared/wild-adapters``): $ADAPTERHUB_WILD_ADAPTERS, else beside the
    checkout (``../shared``), else the workplace's copy."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("ADAPTERHUB_WILD_ADAPTERS"), here.parent / "shared" / "wild-adapters",
                      Path("/work/shared/wild-adapters")):
        if candidate and Path(candidate, "MANIFEST.tsv").is_file():
            return Path(candidate)
    return here.parent / "shared" / "wild-adapters"


WILD_ADAPTERS = _wild_adapters()


def pytest_configure(config):
    # The test models are tiny and CI has 2 cores shared by 2 xdist workers: one intra-op thread per
    # process is 5-20x faster than two (measured on tiny-UNet steps and SVDs under load).
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    kept = os.environ.get("ADAPTERHUB_TEST_CACHE")
    folder = kept or tempfile.mkdtemp(prefix="adapterhub-test-cache-")
    config._adapterhub_cache = (folder, not kept, os.environ.get(_CACHE_ENV))
    os.environ[_CACHE_ENV] = folder


def pytest_unconfigure(config):
    folder, remove, previous = getattr(config, "_adapterhub_cache", (None, False, None))
    if folder is None:
        return
    if previous is None:
        os.environ.pop(_CACHE_ENV, None)
    else:
        os.environ[_CACHE_ENV] = previous
    if remove:
        shutil.rmtree(folder, ignore_errors=True)


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
