"""Learning-rate schedules: the usual shapes, and AUTOMATIC1111's ``rate:until_step`` strings.

An A1111 schedule (``modules/textual_inversion/learn_schedule.py``) is a comma-separated list of
``rate:until_step`` pairs: ``"5e-5:100, 5e-6:1500"`` trains at 5e-5 through step 100, then at 5e-6
through step 1500, where training ends. A bare rate (or ``rate:-1``) lasts until the last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from adapterhub.errors import AdapterhubError


@dataclass(frozen=True)
class Piece:
    rate: float
    until: int | None  # last step (1-based) at this rate; None: to the end


def parse_a1111(text: str) -> list[Piece]:
    pieces = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        rate, _, until = part.partition(":")
        try:
            value = float(rate)
            step = int(until) if until.strip() else None
        except ValueError:
            raise AdapterhubError(f"--lr-schedule: {part!r} is not 'rate' or 'rate:step' "
                                  "(e.g. '5e-5:100, 5e-6:1500')") from None
        if value <= 0:
            raise AdapterhubError(f"--lr-schedule: rate {value} must be positive")
        step = None if step == -1 else step
        if step is not None and (step <= 0 or pieces and pieces[-1].until is not None and step <= pieces[-1].until):
            raise AdapterhubError(f"--lr-schedule: steps must increase ({part!r})")
        if pieces and pieces[-1].until is None:
            raise AdapterhubError(f"--lr-schedule: {part!r} follows a rate that lasts to the end")
        pieces.append(Piece(value, step))
    if not pieces:
        raise AdapterhubError("--lr-schedule is empty")
    return pieces


def a1111_end(pieces: list[Piece]) -> int | None:
    return pieces[-1].until


def a1111_rate(pieces: list[Piece], step: int) -> float:
    """The rate of 1-based optimiser step ``step``."""
    for piece in pieces:
        if piece.until is None or step <= piece.until:
            return piece.rate
    return pieces[-1].rate


class LrFactor:
    """``LambdaLR`` multiplier for 0-based scheduler step ``i`` (optimiser step ``i + 1``).

    A callable object rather than a lambda so that ``LambdaLR.state_dict`` can keep it; its inputs all
    come from the config, so a resumed run rebuilds the same one.
    """

    def __init__(self, kind: str, warmup: int, total: int, a1111: list[Piece] | None = None):
        self.kind, self.warmup, self.total, self.a1111 = kind, int(warmup), max(1, int(total)), a1111

    def __call__(self, i: int) -> float:
        if self.a1111 is not None:
            return a1111_rate(self.a1111, i + 1)  # base lr is 1: the schedule gives the rate itself
        if self.warmup and i < self.warmup:
            return (i + 1) / (self.warmup + 1)
        if self.kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine
