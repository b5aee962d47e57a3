"""Catalog benchmark: first-scan throughput against ``sha256sum``, unchanged rescans, full-text search.

    python benchmarks/catalog.py                      # all three, SQLite, in a temp folder
    python benchmarks/catalog.py --postgres URL       # the search figure on PostgreSQL as well
    python benchmarks/catalog.py --quick              # smaller sizes, for a smoke run

Targets (from the catalog issue), all measured on files generated in the same run:
  1. first scan of >= 1 GB across 2,000 files at >= 80 % of ``sha256sum``'s throughput on the same
     files (both with the files in the page cache: each is read once before timing);
  2. rescan of 10,000 unchanged entries in under 2 s;
  3. ``catalog search`` over 100,000 entries in under 50 ms (median over varied queries).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterhub import catalog as cat_api
from adapterhub.catalog import open_catalog, store
from adapterhub.catalog.db import write

# A deliberately small vocabulary: every query word matches thousands of the 100,000 entries.
WORDS = ("neon", "anime", "watercolor", "pastel", "cyberpunk", "portrait", "landscape", "sketch", "ink", "oil",
         "gothic", "retro", "vapor", "pixel", "chibi", "dragon", "forest", "ocean", "city", "night", "sunset",
         "winter", "samurai", "robot", "knight", "witch")


def _register_enrichers() -> None:
    """The built-in enrichers, as the ``catalog`` entry point registers them once installed."""
    import adapterhub_plugins.catalog as enrichers

    from adapterhub.plugins import manager

    pm = manager()
    if pm.get_plugin("catalog") is None and not pm.is_registered(enrichers):
        pm.register(enrichers, name="catalog")


def make_files(folder: Path, count: int, modules: int, rank: int) -> int:
    """``count`` distinct kohya LoRA files (SD1 cross-attention shapes); returns total bytes."""
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_0_attentions_{i % 2}_transformer_blocks_0_attn2_to_{'kv'[i // 2 % 2]}_{i}"
        base[f"{name}.lora_down.weight"] = torch.randn(rank, 768, generator=g)
        base[f"{name}.lora_up.weight"] = torch.randn(320, rank, generator=g)
        base[f"{name}.alpha"] = torch.tensor(float(rank))
    first = next(iter(base))
    total = 0
    for n in range(count):
        base[first][0, 0] = float(n)  # every file different
        path = folder / f"d{n % 20:02d}" / f"{random.choice(WORDS)}_{n:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(base, str(path), metadata={"ss_network_dim": str(rank), "ss_steps": str(100 + n)})
        total += path.stat().st_size
    return total


def _read_all(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children (workers, sha256sum)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_sha256sum(folder: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``sha256sum`` over every file."""
    files = sorted(str(p) for p in folder.rglob("*.safetensors"))
    started, cpu = time.perf_counter(), _cpu()
    for start in range(0, len(files), 500):
        subprocess.run(["sha256sum", *files[start:start + 500]], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _cpu() - cpu


def bench_first_scan(work: Path, count: int, modules: int, rank: int, jobs: int | None) -> dict:
    folder = work / "scan1"
    total = make_files(folder, count, modules, rank)
    _read_all(folder)
    sha_s, sha_cpu = time_sha256sum(folder)
    with open_catalog(work / "first.db", create=True) as cat:
        started, cpu = time.perf_counter(), _cpu()
        report = cat_api.scan(cat, [folder], jobs=jobs)
        scan_s, scan_cpu = time.perf_counter() - started, _cpu() - cpu
    assert report.new == count and not report.unreadable, report.as_dict()
    shutil.rmtree(folder)
    return {"files": count, "bytes": total, "jobs": jobs or os.cpu_count(),
            "sha256sum_s": round(sha_s, 3), "scan_s": round(scan_s, 3),
            "sha256sum_MBps": round(total / sha_s / 1e6, 1), "scan_MBps": round(total / scan_s / 1e6, 1),
            "ratio": round(sha_s / scan_s, 3),
            "sha256sum_cpu_s": round(sha_cpu, 3), "scan_cpu_s": round(scan_cpu, 3),
            "ratio_per_cpu_second": round(sha_cpu / scan_cpu, 3), "loadavg_1min": os.getloadavg()[0]}


def bench_rescan(work: Path, count: int, jobs: int | None) -> dict:
    folder = work / "scan2"
    make_files(folder, count, modules=1, rank=1)
    db = work / "rescan.db"
    with open_catalog(db, create=True) as cat:
        started = time.perf_counter()
        cat_api.scan(cat, [folder], jobs=jobs)
        first_s = time.perf_counter() - started
    started = time.perf_counter()
    with open_catalog(db) as cat:
        report = cat_api.scan(cat, [folder], jobs=jobs)
    rescan_s = time.perf_counter() - started
    assert report.unchanged == count and report.examined == 0, report.as_dict()
    shutil.rmtree(folder)
    return {"entries": count, "first_scan_s": round(first_s, 2), "rescan_s": round(rescan_s, 3)}


def _synthetic(n: int, rng: random.Random) -> dict:
    words = rng.sample(WORDS, 3)
    name = f"{words[0]}_{words[1]}_{n:06d}"
    tags = {w: rng.randint(1, 50) for w in rng.sample(WORDS, 6)}
    return {"path": f"/library/{words[2]}/{name}.safetensors", "name": name, "kind": "file", "size": 1000 + n,
            "mtime_ns": n, "sidecar_sig": "", "sha256": f"{n:064x}", "autov1": f"{n:08x}", "autov2": f"{n:010x}",
            "autov3": f"{n + 1:064x}", "status": "ok", "error": None, "type": "lora", "format": "kohya",
            "base": rng.choice(["sd1", "sd2", "sdxl"]), "family": "stable-diffusion", "rank": 8, "alpha": 8.0,
            "targets": 64, "metadata": {"ss_output_name": name, "ss_tag_frequency": json.dumps({"5_x": tags})},
            "trigger_words": rng.sample(WORDS, 2), "training": {"steps": n}, "preview": None}


def fill(cat, count: int, batch: int = 5000) -> float:
    rng = random.Random(1)
    started = time.perf_counter()
    for start in range(0, count, batch):
        entries = [_synthetic(n, rng) for n in range(start, min(count, start + batch))]
        write(cat, lambda conn, es=entries: store.save_entries(conn, es, match_moves=False))
    return time.perf_counter() - started


def bench_search(url: str, count: int, queries: int = 200) -> dict:
    with open_catalog(url, create=True) as cat:
        fill_s = fill(cat, count)
        rng = random.Random(2)
        asked = [" ".join(rng.sample(WORDS, rng.choice([1, 1, 2]))) for _ in range(queries)]
        asked += [w[:3] for w in WORDS]  # short prefixes match the most
        times, hits = [], 0
        cat_api.search(cat, "neon")  # warm
        for q in asked:
            started = time.perf_counter()
            hits += len(cat_api.search(cat, q, limit=20))
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"backend": cat.dialect, "entries": count, "fill_s": round(fill_s, 1), "queries": len(asked),
            "median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(len(times) * 0.95)], 2),
            "max_ms": round(times[-1], 2), "mean_hits": round(hits / len(asked), 1)}


def _postgres_schema(url: str) -> tuple[str, callable]:
    """A throw-away schema on the given PostgreSQL database, and how to drop it."""
    from sqlalchemy import create_engine, text

    from adapterhub.catalog.db import catalog_url

    schema = f"bench_{os.getpid()}"
    engine = create_engine(catalog_url(url))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"))

    def drop():
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", drop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temp folder, removed after)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--postgres", help="also measure search on this PostgreSQL URL")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--only", choices=["scan", "rescan", "search"], action="append")
    args = parser.parse_args(argv)
    _register_enrichers()
    work = Path(tempfile.mkdtemp(prefix="adapterhub-bench-", dir=args.dir))
    only = set(args.only or ["scan", "rescan", "search"])
    files, rescan_n, search_n = (200, 1000, 10_000) if args.quick else (2000, 10_000, 100_000)
    results = {}
    try:
        if "scan" in only:
            results["first_scan"] = bench_first_scan(work, files, modules=4, rank=32, jobs=args.jobs)
            print(json.dumps({"first_scan": results["first_scan"]}), flush=True)
        if "rescan" in only:
            results["rescan"] = bench_rescan(work, rescan_n, args.jobs)
            print(json.dumps({"rescan": results["rescan"]}), flush=True)
        if "search" in only:
            results["search_sqlite"] = bench_search(str(work / "search.db"), search_n)
            print(json.dumps({"search_sqlite": results["search_sqlite"]}), flush=True)
            if args.postgres:
                url, drop = _postgres_schema(args.postgres)
                try:
                    results["search_postgresql"] = bench_search(url, search_n)
                finally:
                    drop()
                print(json.dumps({"search_postgresql": results["search_postgresql"]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
