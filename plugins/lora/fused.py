"""Patches that hold their rows of a fused module's delta: a LoKr, LoHa or full diff on BFL's ``qkv`` / ``linear1``.

BFL's Flux holds q, k and v (and a single block's MLP input) in one Linear whose rows diffusers keeps in
separate modules. A LoRA's product splits into one LoRA per module (see :mod:`.transformer_keys`); a Kronecker
or Hadamard product does not, so each diffusers module gets a :class:`RowsPatch`: the whole module's patch
(``inner``), asked for its rows only. Merged, the result is the fused weight plus the inner delta, split by
rows as diffusers' Flux single-file converter splits the weight (``torch.chunk`` / ``torch.split`` on dim 0).

The rows are computed exactly without the fused delta where the algebra allows (rows ``a .. b`` of
``kron(L, R)``, ``R`` of ``k`` rows, are in ``kron(L[a // k : ceil(b / k)], R)``; a row of a LoHa is the Hadamard
product of its halves' rows); any other inner patch computes its full delta (float32, one at a time) and
keeps the rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub.types import Patch

from .patches import InnerPatch

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch

Rows = tuple[tuple[int, int], ...]  # (start, stop) ranges of the fused rows, concatenated in order


class RowsPatch(InnerPatch):
    """``rows`` of ``inner``'s delta on a fused weight of ``fused_shape``, as the patch of ``target``.

    Every fact is the inner patch's (kind, rank, alpha, scale, tensors, file keys) except the shape: the
    target's weight is ``(len(rows), *fused_shape[1:])``. No low-rank factors (the algebra re-factorises by SVD)."""

    def __init__(self, inner: Patch, target: str, rows: Rows, fused_shape: tuple[int, ...]):
        super().__init__(inner, target, inner.tensors)
        self.rows, self.fused_shape = tuple(rows), tuple(fused_shape)
        self.kind = inner.kind

    # the tensors are the inner patch's (a cast or a device move of one is a move of both)
    @property
    def tensors(self):
        return self.inner.tensors

    @tensors.setter
    def tensors(self, value):
        self.inner.tensors = value

    @property
    def out_features(self) -> int:
        return sum(b - a for a, b in self.rows)

    @property
    def in_features(self) -> int | None:
        return self.fused_shape[1] if len(self.fused_shape) > 1 else None

    def expected_shape(self):
        return (self.out_features, *self.fused_shape[1:])

    def delta_bound(self) -> float:
        """The inner patch's bound: ``max |rows of delta| <= max |delta|``."""
        return self.inner.delta_bound()

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        import torch

        found = _exact_rows(self.inner, self.rows, weight.device)
        if found is None:  # the fused delta, then its rows (a stand-in weight of the fused shape: no memory)
            full = self.inner.delta(torch.empty(1, device=weight.device).expand(self.fused_shape))
            found = _joined([full[a:b] for a, b in self.rows])
        return found.reshape(weight.shape)


def _exact_rows(inner: Patch, rows: Rows, device) -> torch.Tensor | None:
    """The ``rows`` of a 2-D LoKr / LoHa delta (scaled, float32) from its factors, bit for bit the rows of the
    fused delta; None for any other patch (a Tucker core, a conv kernel, a full diff)."""
    from . import math as lmath

    t = {k: v.to(device) for k, v in inner.tensors.items()}
    if inner.kind == "loha" and "hada_t1" not in t:
        part = lmath.loha_rows(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], rows)
        return part.mul_(inner.scale)
    if inner.kind != "lokr" or "lokr_t2" in t or ("lokr_w2" in t and t["lokr_w2"].dim() != 2):
        return None
    part = lmath.lokr_rows(rows, **{k.removeprefix("lokr_"): v for k, v in t.items() if k.startswith("lokr_")})
    return lmath.scaled(part, part.shape, inner.scale)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated by rows; one part as it is (no copy: a part's rows are already contiguous)."""
    import torch

    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_patches(inner: Patch, pieces, fused_shape: tuple[int, ...]) -> list[Patch]:
    """One :class:`RowsPatch` per piece (``transformer_keys.Piece``: its target and rows) of ``inner``."""
    whole = ((0, fused_shape[0]),)
    return [RowsPatch(inner, p.target, p.rows or whole, fused_shape) for p in pieces]
