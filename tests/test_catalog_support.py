"""Shared fixtures and file makers for the catalog tests (no tests here).

Every catalog test runs against SQLite and, when ``ADAPTERHUB_TEST_POSTGRES_URL`` is set (CI sets
it from ``.ci/postgres.sh``), against PostgreSQL too, each test in a schema of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

PG_ENV = "ADAPTERHUB_TEST_POSTGRES_URL"
from conftest import WILD_ADAPTERS as WILD  # noqa: E402
needs_wild = pytest.mark.skipif(not WILD.is_dir(), reason=f"wild adapter files not found at {WILD}")

# The CLI in a subprocess, with the built-in catalog enrichers registered even before the
# pyproject entry point is installed (an installed entry point makes this a no-op).
BOOT = ("import sys; from adapterhub.plugins import manager; import adapterhub_plugins.catalog as c; "
        "pm = manager(); pm.get_plugin('catalog') or pm.register(c, name='catalog'); "
        "from adapterhub.cli import main; sys.exit(main(sys.argv[1:]))")
CLI = [sys.executable, "-c", BOOT]


def _postgres_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path):
    """A fresh, empty catalog location for each backend."""
    if request.param == "sqlite":
        yield str(tmp_path / "db" / "catalog.db")
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL variant: set {PG_ENV} (e.g. from .ci/postgres.sh) to run it")
    from sqlalchemy import create_engine, text

    from adapterhub.catalog.db import catalog_url as to_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(to_url(base))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _postgres_url(base, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def lora_tensors(seed: int = 0, rank: int = 4, modules: int = 2) -> dict:
    """kohya-style SD1 LoRA tensors on UNet cross-attention (to_k takes the 768-wide context)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_0_attentions_{i % 2}_transformer_blocks_0_attn2_to_{'kv'[i // 2 % 2]}"
        out[f"{name}.lora_down.weight"] = torch.randn(rank, 768, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(320, rank, generator=g) * 0.01
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def make_lora(path: Path, seed: int = 0, rank: int = 4, metadata: dict | None = None, modules: int = 2) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(seed, rank, modules), str(path), metadata=metadata)
    return path


def run_cli(args: list[str], env_catalog: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_catalog:
        env["ADAPTERHUB_CATALOG"] = env_catalog
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120, **kwargs)
