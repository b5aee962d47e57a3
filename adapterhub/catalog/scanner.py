"""``catalog scan``: walk, reconcile with what the catalog knows, examine what changed, store in batches.

* Unchanged files (same size and mtime) are not opened again; if only a sidecar changed, the file is
  re-identified and re-enriched but not re-hashed.
* New and changed files are examined in worker processes (hashing is most of the work).
* Results are written in batches, each in one transaction: a scan killed at any moment leaves a
  consistent catalog, and the rerun finishes the job.
* Entries under the scanned roots whose files are gone are marked missing (``catalog prune``
  removes them); a file that reappears, or moved elsewhere with the same content, is matched again.

Progress goes to ``on_event(dict)``: ``{"event": "start", "total": n}``, then one
``{"event": "file", "path", "status"}`` per examined file; the report is the return value.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapterhub.catalog import store
from adapterhub.catalog.db import Catalog, CatalogError, reading, write
from adapterhub.catalog.examine import Job, examine
from adapterhub.catalog.walk import Found, walk

Event = Callable[[dict], None]
BATCH_SIZE = 64
BATCH_SECONDS = 1.0


@dataclass
class ScanReport:
    roots: list[str]
    found: int = 0
    examined: int = 0
    new: int = 0
    updated: int = 0
    moved: int = 0
    unchanged: int = 0
    missing: int = 0
    reappeared: int = 0
    skipped: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0
    unreadable: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Plan:
    jobs: list[Job] = field(default_factory=list)
    unchanged: int = 0
    skipped: int = 0
    reappeared: list[int] = field(default_factory=list)
    vanished: list[int] = field(default_factory=list)
    stale_skipped: list[str] = field(default_factory=list)


def _roots(roots: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for root in roots:
        path = Path(root).expanduser().absolute()
        if not path.exists():
            raise CatalogError(f"{root}: no such file or folder")
        out.append(Path(os.path.normpath(path)))
    if not out:
        raise CatalogError("nothing to scan: name one or more folders")
    return out


def _plan(found: list[Found], known: dict, skipped: dict, force: bool) -> _Plan:
    plan = _Plan()
    for f in found:
        k = known.get(f.path)
        same_stat = k is not None and not force and (k.size, k.mtime_ns) == (f.size, f.mtime_ns)
        if same_stat and k.sidecar_sig == f.sidecar_sig:
            plan.unchanged += 1
            if k.missing:
                plan.reappeared.append(k.id)
        elif same_stat:
            plan.jobs.append(Job(f.path, f.kind, f.size, f.mtime_ns, f.sidecar_sig, k.hashes, f.sidecars))
        elif k is None and not force and skipped.get(f.path) == (f.size, f.mtime_ns):
            plan.skipped += 1
        else:
            plan.jobs.append(Job(f.path, f.kind, f.size, f.mtime_ns, f.sidecar_sig, None, f.sidecars))
    paths = {f.path for f in found}
    plan.vanished = [k.id for p, k in known.items() if p not in paths and not k.missing]
    plan.stale_skipped = [p for p in skipped if p not in paths]
    return plan


def _die_with_parent() -> None:
    """Worker initializer: on Linux, end this worker when the scan process dies (even by SIGKILL)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _examined(jobs: list[Job], n_jobs: int) -> Iterator[dict]:
    """Examine every job, in worker processes when there is more than one job and worker."""
    if n_jobs <= 1 or len(jobs) < 2:
        yield from map(examine, jobs)
        return
    from adapterhub.plugins import adapter_types, manager

    manager(), adapter_types()  # load the plugins once, before forking, so workers inherit them
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    chunk = max(1, min(16, len(jobs) // (n_jobs * 8)))
    pool = ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), mp_context=context, initializer=_die_with_parent)
    try:
        yield from pool.map(examine, jobs, chunksize=chunk)
    finally:  # on Ctrl-C or a failed write, drop the queued files instead of examining them all first
        pool.shutdown(wait=True, cancel_futures=True)


def _flush(catalog: Catalog, batch: list[dict], report: ScanReport, vanished: set[int]) -> None:
    entries = [e for e in batch if e["skip"] is None]
    skipped = [e for e in batch if e["skip"] is not None]

    def save(conn):
        counts = store.save_entries(conn, entries) if entries else {}
        store.save_skipped(conn, skipped)
        return counts

    counts = write(catalog, save)
    report.missing -= len(vanished.intersection(counts.pop("moved_ids", [])))  # found again, elsewhere
    for key, value in counts.items():
        setattr(report, key, getattr(report, key) + value)
    report.skipped += len(skipped)
    for e in entries:
        if e["status"] != "ok":
            report.unreadable.append({"path": e["path"], "error": e["error"]})
        report.warnings.extend(f"{e['path']}: {w}" for w in e["warnings"])


def _reconcile(catalog: Catalog, plan: _Plan) -> None:
    def apply(conn):
        store.set_missing(conn, plan.vanished, True)
        store.set_missing(conn, plan.reappeared, False)
        store.forget_skipped(conn, plan.stale_skipped)

    if plan.vanished or plan.reappeared or plan.stale_skipped:
        write(catalog, apply)


def scan(catalog: Catalog, roots: Iterable[str | os.PathLike], jobs: int | None = None,
         on_event: Event | None = None, force: bool = False, batch_size: int = BATCH_SIZE) -> ScanReport:
    """Scan ``roots`` into ``catalog``; see the module docstring. ``force`` re-examines everything."""
    started = time.perf_counter()
    if catalog.readonly:
        raise CatalogError(f"catalog {catalog.display} is read-only; nothing was changed")
    root_paths = _roots(roots)
    report = ScanReport(roots=[str(r) for r in root_paths])
    walked = walk(root_paths)
    found = list({f.path: f for f in walked.found}.values())
    report.found, report.warnings = len(found), list(walked.warnings)
    with reading(catalog) as conn:
        known = store.known_under(conn, report.roots)
        skipped = store.skipped_under(conn, report.roots)
    plan = _plan(found, known, skipped, force)
    report.unchanged, report.skipped = plan.unchanged, plan.skipped
    report.missing, report.reappeared = len(plan.vanished), len(plan.reappeared)
    _reconcile(catalog, plan)
    report.hashed_bytes = sum(j.size for j in plan.jobs if not j.hashes)
    emit = on_event or (lambda event: None)
    emit({"event": "start", "total": len(plan.jobs), "found": len(found)})
    catalog.engine.dispose()  # no pooled connection may cross a fork
    batch: list[dict] = []
    last, vanished = time.monotonic(), set(plan.vanished)
    for entry in _examined(plan.jobs, jobs or os.cpu_count() or 1):
        batch.append(entry)
        report.examined += 1
        emit({"event": "file", "path": entry["path"], "status": "skipped" if entry["skip"] else entry["status"]})
        if len(batch) >= batch_size or time.monotonic() - last > BATCH_SECONDS:
            _flush(catalog, batch, report, vanished)
            batch, last = [], time.monotonic()
    if batch:
        _flush(catalog, batch, report, vanished)
    report.seconds = time.perf_counter() - started
    return report
