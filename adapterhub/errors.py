"""Errors users see: one line, naming the file and the first offending key."""
from __future__ import annotations

from pathlib import Path


class AdapterhubError(Exception):
    """An error with a one-line, user-facing message. The CLI prints it and exits with code 2."""

    exit_code = 2


class AdapterError(AdapterhubError):
    """A problem with one adapter file (unreadable, unsupported, or not fitting the model)."""

    def __init__(self, path: str | Path | None, problem: str, key: str | None = None):
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.key = key
        where = f"{self.path}: " if self.path else ""
        at = f" (key {key})" if key else ""
        super().__init__(f"{where}{problem}{at}")
