"""A catalog stays consistent, and loses nothing, when scans run at once or die half-way.

The scans run in forked processes (the test process has torch imported already, so a fork costs
milliseconds where a fresh interpreter costs seconds); each opens the catalog itself, as a second
``adapterhub catalog scan`` would.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import test_catalog_support as support
from test_catalog_support import make_lora

from adapterhub import catalog as cat_api
from adapterhub.catalog import open_catalog

catalog_url = support.catalog_url  # a shared fixture

FORK = multiprocessing.get_context("fork")


def _library(root, n: int) -> int:
    for i in range(n):
        make_lora(root / f"d{i % 4}" / f"lora {i:03d}.safetensors", seed=i, modules=1, rank=2)
    (root / "d0" / "notes.txt").write_text("not an adapter")
    (root / "d1" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return n + 1  # entries expected: every LoRA and the broken file


def _assert_consistent(url: str, expected: int) -> None:
    with open_catalog(url) as cat:
        entries = cat_api.list_entries(cat)
        paths = [e["path"] for e in entries]
        assert len(paths) == len(set(paths)) == expected
        assert all(e["sha256"] for e in entries)
        assert sum(e["status"] != "ok" for e in entries) == 1
        assert all(e["type"] == "lora" and e["rank"] == 2 for e in entries if e["status"] == "ok")
        assert len(cat_api.search(cat, "lora", limit=10_000)) == expected - 1  # the index agrees
        if cat.dialect == "sqlite":
            with cat.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def _slow_examine(job):
    """``examine`` slowed down, so that a kill lands half-way (module level: workers unpickle it)."""
    from adapterhub.catalog.examine import examine

    time.sleep(0.01)
    return examine(job)


def _scan_in_child(url: str, root: str, jobs: int, batch_size: int, slow: bool) -> None:
    os.setsid()  # its own process group, so the test can kill it with its workers
    if slow:
        import adapterhub.catalog.scanner as scan_module

        scan_module.examine = _slow_examine
    with open_catalog(url, create=True) as cat:
        cat_api.scan(cat, [root], jobs=jobs, batch_size=batch_size)


def _start(url, root, jobs=1, batch_size=4, slow=False):
    proc = FORK.Process(target=_scan_in_child, args=(url, str(root), jobs, batch_size, slow))
    proc.start()
    return proc


def test_two_scans_of_one_folder_at_once(catalog_url, tmp_path):
    expected = _library(tmp_path / "lib", 80)
    procs = [_start(catalog_url, tmp_path / "lib", batch_size=4) for _ in range(2)]
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    _assert_consistent(catalog_url, expected)


def _count(url: str) -> int:
    try:
        with open_catalog(url) as cat, cat.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM catalog_entries").scalar()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _kill_halfway(url, root, expected, jobs) -> int:
    proc = _start(url, root, jobs=jobs, batch_size=8, slow=True)
    deadline = time.monotonic() + 60
    while _count(url) < 16 and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    stored = _count(url)
    assert proc.exitcode == -signal.SIGKILL and 0 < stored < expected, "the kill should land half-way"
    return stored


def test_scan_killed_halfway_then_rerun(catalog_url, tmp_path):
    expected = _library(tmp_path / "lib", 120)
    stored = _kill_halfway(catalog_url, tmp_path / "lib", expected, jobs=2)
    with open_catalog(catalog_url) as cat:  # what was committed is whole, and searchable
        entries = cat_api.list_entries(cat)
        assert len(entries) == stored and all(e["sha256"] for e in entries)
        report = cat_api.scan(cat, [tmp_path / "lib"], jobs=2)
        assert (report.unchanged, report.new) == (stored, expected - stored)
    _assert_consistent(catalog_url, expected)
