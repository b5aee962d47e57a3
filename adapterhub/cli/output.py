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


WHOLE_COLUMNS = frozenset({"name", "path", "file", "sha256", "hash", "image", "field", "key"})  # never cut
MIN_FOLDED = 16  # narrower than this, a folded column reads one word a line: switch to the list layout


def _terminal_width() -> int | None:
    """The width of the terminal stdout is, or None when it is not a terminal (piped, redirected)."""
    import shutil
    import sys

    if not _is_terminal(sys.stdout):
        return None
    return shutil.get_terminal_size((80, 24)).columns


def table(rows: Iterable[dict], columns: list[str] | None = None, title: str | None = None,
          whole: Iterable[str] | None = None) -> None:
    """Rows as a table on stdout. Names and paths are never cut: the ``whole`` columns (default: those named in
    ``WHOLE_COLUMNS``) keep their full width, the others fold into it; when even that leaves the others under
    ``MIN_FOLDED`` characters, each row is printed as ``column: value`` lines instead. Piped output is not
    wrapped at all (the table is as wide as its content), so ``grep`` and ``cut`` see every value whole."""
    from rich.cells import cell_len  # terminal cells, not characters: a CJK name is twice as wide

    rows = list(rows)
    columns = columns or (list(rows[0]) if rows else [])
    cells = [["" if r.get(c) is None else _shown(str(r.get(c))) for c in columns] for r in rows]
    keep = set(WHOLE_COLUMNS if whole is None else whole)
    natural = [max([cell_len(c), *(cell_len(line) for row in cells for line in row[i].splitlines() or [""])])
               for i, c in enumerate(columns)]
    frame = 3 * len(columns) + 1  # rich's borders and one space of padding each side
    width = _terminal_width()
    if width is None or sum(natural) + frame <= width:
        _rich_table(columns, cells, title, sum(natural) + frame if width is None else width, keep, fold=False)
        return
    folded = [i for i, c in enumerate(columns) if c not in keep]
    room = width - frame - sum(n for i, n in enumerate(natural) if i not in folded)
    if not folded or room < MIN_FOLDED * sum(1 for i in folded if natural[i] > MIN_FOLDED) + sum(
            natural[i] for i in folded if natural[i] <= MIN_FOLDED):
        _list_layout(columns, cells, title)
        return
    _rich_table(columns, cells, title, width, keep, fold=True)


def _rich_table(columns: list[str], cells: list[list[str]], title: str | None, width: int, keep: set[str],
                fold: bool) -> None:
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    t = Table(title=None if title is None else _shown(title), show_lines=False)
    for i, c in enumerate(columns):
        if c in keep or not fold:
            t.add_column(c, no_wrap=True, overflow="ignore",
                         min_width=max([cell_len(c), *(cell_len(line) for row in cells for line in
                                                       row[i].splitlines() or [""])]))
        else:
            t.add_column(c, overflow="fold")
    for row in cells:
        t.add_row(*row)
    Console(width=width, soft_wrap=False).print(t)


def _list_layout(columns: list[str], cells: list[list[str]], title: str | None) -> None:
    """One block per row: its first column, then ``column: value`` lines (long values run on, never cut)."""
    if title:
        click.echo(title)
    for row in cells:
        click.echo("")
        first, *rest = zip(columns, row)
        click.echo(f"{first[0]}: {first[1]}")
        for name, value in rest:
            if value:
                click.echo(f"  {name}: {value}")


def key_values(data: dict, title: str | None = None) -> None:
    """A two-column table of a dict (nested values as compact JSON)."""
    rows = [{"field": k, "value": v if isinstance(v, (str, int, float)) or v is None
             else json.dumps(v, default=_default, ensure_ascii=False)} for k, v in data.items()]
    table(rows, ["field", "value"], title, whole=("field", "value"))  # paths and hashes are values: never cut


def emit(data: Any, as_json: bool, render=None) -> None:
    """JSON when asked, else ``render(data)`` (default: a key/value table)."""
    if as_json:
        emit_json(data)
    elif render is not None:
        render(data)
    else:
        key_values(data)


PLAIN_INTERVAL = 5.0  # seconds between progress lines when stderr is not a terminal (logs, CI, nohup)
PLAIN_FIRST = 2.0  # seconds of work before the first of them


def _now() -> float:
    return time.monotonic()


def _plain_line(description: str, done: int, total: int | None, elapsed: float, info: str = "") -> str:
    count = f"{done}/{total} ({100 * done // total}%)" if total else f"{done}"
    return f"{description}: {count}, {elapsed:.1f} s" + (f", {info}" if info else "")


class _PlainLines:
    """One task's progress as plain lines on stderr: nothing in the first ``PLAIN_FIRST`` seconds (a quick
    command, or one that fails at once, stays one line), then at most one line per ``PLAIN_INTERVAL``, and the
    last step always (a log shows the run is alive without one line per step). ``info`` (a running loss ...)
    ends the line."""

    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.start = description, total, _now()
        self.done, self.shown, self.at, self.info = 0, 0, None, ""

    def _show(self, now: float) -> None:
        click.echo(_plain_line(self.description, self.done, self.total, now - self.start, self.info), err=True)
        self.shown, self.at = self.done, now

    def update(self, done: int, info: str | None = None) -> None:
        self.done = done
        self.info = self.info if info is None else info
        now = _now()
        due = now - self.start >= PLAIN_FIRST if self.at is None else now - self.at >= PLAIN_INTERVAL
        if due or (self.total and self.done >= self.total and self.shown != self.done):
            self._show(now)

    def close(self) -> None:
        """The last step reached, if no line showed it yet."""
        if self.done != self.shown:
            self._show(_now())


@contextmanager
def _plain_progress(description: str, total: int | None) -> Iterator:
    lines = _PlainLines(description, total)
    yield lambda n=1: lines.update(lines.done + n)
    lines.close()


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


class _PlainTasks:
    """The part of rich's ``Progress`` a command with several tasks uses (``add_task``, ``advance``,
    ``update``, ``console.print``), as rate-limited plain lines per task (:class:`_PlainLines`) with the
    task's ``info`` field at the end: what :func:`tasks` gives when stderr is not a terminal."""

    def __init__(self):
        self.lines: list[_PlainLines] = []
        self.console = self

    def print(self, text: str) -> None:
        click.echo(_shown(str(text)), err=True)

    def add_task(self, description: str, total: int | None = None, info: str = "", **_fields) -> int:
        self.lines.append(_PlainLines(description, total))
        self.lines[-1].info = info
        return len(self.lines) - 1

    def advance(self, task: int, advance: int = 1) -> None:
        self.lines[task].update(self.lines[task].done + advance)

    def update(self, task: int, completed: int | None = None, info: str | None = None, **_fields) -> None:
        lines = self.lines[task]
        lines.update(lines.done if completed is None else completed, info)

    def close(self) -> None:
        for lines in self.lines:
            lines.close()


@contextmanager
def tasks() -> Iterator:
    """Several progress tasks on stderr, each with an ``info`` field (a running loss, a rate): rich's
    ``Progress`` with a time-remaining column on a terminal, rate-limited plain lines elsewhere (logs, CI,
    ``nohup``), where rich would show only the final state."""
    import sys

    if not _is_terminal(sys.stderr):
        plain = _PlainTasks()
        try:
            yield plain
        finally:
            plain.close()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True)) as bar:
        yield bar


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream is no terminal
        return False


def quiet_model_loading() -> None:
    """Commands that load models show their own progress: silence diffusers' loading bars."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
