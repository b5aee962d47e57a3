"""The one output helper of the CLI: JSON for scripts, rich tables for people, progress bars.

Commands build plain data (dicts and lists) and hand it here; nothing else in ``cli/`` prints.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import click


def _default(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _shown(text: str) -> str:
    """``text`` printable on a UTF-8 stream: a file name's bytes that are not UTF-8 (kept by Python as
    lone surrogates) become U+FFFD instead of stopping the output with an encoding error."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def emit_json(data: Any) -> None:
    click.echo(_shown(json.dumps(data, indent=2, default=_default, ensure_ascii=False)))


def table(rows: Iterable[dict], columns: list[str] | None = None, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = list(rows)
    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=None if title is None else _shown(title), show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if r.get(c) is None else _shown(str(r.get(c))) for c in columns))
    Console().print(t)


def key_values(data: dict, title: str | None = None) -> None:
    """A two-column table of a dict (nested values as compact JSON)."""
    rows = [{"field": k, "value": v if isinstance(v, (str, int, float)) or v is None
             else json.dumps(v, default=_default, ensure_ascii=False)} for k, v in data.items()]
    table(rows, ["field", "value"], title)


def emit(data: Any, as_json: bool, render=None) -> None:
    """JSON when asked, else ``render(data)`` (default: a key/value table)."""
    if as_json:
        emit_json(data)
    elif render is not None:
        render(data)
    else:
        key_values(data)


PLAIN_INTERVAL = 5.0  # seconds between progress lines when stderr is not a terminal (logs, CI, nohup)


def _now() -> float:
    return time.monotonic()


def _plain_line(description: str, done: int, total: int | None, elapsed: float) -> str:
    count = f"{done}/{total} ({100 * done // total}%)" if total else f"{done}"
    return f"{description}: {count}, {elapsed:.1f} s"


@contextmanager
def _plain_progress(description: str, total: int | None) -> Iterator:
    """Progress as plain lines on stderr: the first step, then at most one line per ``PLAIN_INTERVAL``, and the
    last step always (a log shows the run is alive without one line per step)."""
    start = _now()
    state = {"done": 0, "shown": 0, "at": None}

    def show(now: float) -> None:
        click.echo(_plain_line(description, state["done"], total, now - start), err=True)
        state["shown"], state["at"] = state["done"], now

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = _now()
        if state["at"] is None or now - state["at"] >= PLAIN_INTERVAL or (total and state["done"] >= total):
            show(now)

    yield advance
    if state["done"] != state["shown"]:
        show(_now())


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator:
    """Progress on stderr (JSON on stdout stays clean); yields ``advance(n=1)``. A rich bar on a terminal;
    elsewhere (logs, CI, ``nohup``, pipes), where rich would print nothing, rate-limited plain lines."""
    import sys

    if not _is_terminal(sys.stderr):
        with _plain_progress(description, total) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream is no terminal
        return False


def quiet_model_loading() -> None:
    """Commands that load models show their own progress: silence diffusers' loading bars."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
