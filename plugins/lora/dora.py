"""DoRA (weight-decomposed low-rank adaptation): a magnitude beside any LoRA-family module.

A DoRA module is an inner patch (LoRA, LoCon, LoHa, LoKr) plus a magnitude ``m``. With the base weight
``W`` (float32) and the inner delta at its own scale (``alpha / rank``), ``V = W + delta`` and
``D = m * V / (||V|| + eps)``: the norm per output row when ``m`` has the output dim (LyCORIS'
``wd_on_out=True``: ``(out, 1, ...)``; PEFT's ``lora_magnitude_vector``: ``(out,)``), per input channel
(over the output rows and the kernel) when ``m`` is ``(1, in, ...)`` (LyCORIS' ``wd_on_out=False``,
OneTrainer). ``eps`` is float32's machine epsilon, as lycoris-lora adds it (PEFT adds none: the results
differ by ``eps / ||V||`` relatively, and a zero column stays zero instead of NaN). The multiplier ``s``
acts outside, ``W' = W + s * (D - W)``, as the webui and ComfyUI apply it (alpha inside, multiplier
outside); at ``s = 1`` this is exactly lycoris-lora's and PEFT's merged weight.

The change depends on the base weight, so what works without one (the LoRA algebra, the norm chart)
gets no factors and no norm from this patch: :attr:`algebra_refusal` says why.
"""
from __future__ import annotations

import math as pymath
from typing import TYPE_CHECKING

from adapterhub.types import Patch

from .patches import InnerPatch

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch

EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, lycoris-lora's epsilon on the norm
ROW, COLUMN = "output row", "input channel"


def orientation(magnitude_shape, weight_shape=None) -> str | None:
    """``ROW`` or ``COLUMN``: where a magnitude of ``magnitude_shape`` scales a weight of ``weight_shape``;
    None when it fits neither. Without the weight's shape, from the magnitude's alone (the position of its
    one dimension that is not 1; a 1-D one is PEFT's, per output row). For a square weight the position of
    the 1 decides: ``(out, 1)`` is per row, ``(1, in)`` per column."""
    m = tuple(magnitude_shape)
    n = pymath.prod(m) if m else 1
    if weight_shape is None:
        if len(m) == 1 or (m and m[0] == n):
            return ROW
        return COLUMN if len(m) >= 2 and m[0] == 1 and m[1] == n else None
    w = tuple(weight_shape)
    if len(m) == 1:
        return ROW if m[0] == w[0] else None
    if m and m[0] == w[0] and n == w[0]:
        return ROW
    if len(m) >= 2 and len(w) >= 2 and m[0] == 1 and m[1] == w[1] and n == w[1]:
        return COLUMN
    return None


class DoRAPatch(InnerPatch):
    """``inner`` (a LoRA-family patch) with the magnitude ``dora_scale``; see the module docstring.

    ``tensors`` holds the inner patch's tensors and ``dora_scale`` (what the finiteness checks and the
    writers read); the facts inspect shows (rank, alpha, shape) are the inner patch's."""

    kind = "dora"
    linear_in_multiplier = False  # D depends on what the accumulator holds before it, not only on the multiplier
    algebra_refusal = ("a DoRA module's change depends on the base weights: it has no low-rank factors to combine, "
                       "resize or chart (merge it into a base instead)")

    def __init__(self, inner: Patch, magnitude, side: str | None = None):
        """``side``: ``ROW`` where the file's layout fixes it (PEFT's ``lora_magnitude_vector``, a conv's held as
        ``(1, out, 1, 1)``); None: the magnitude's shape tells it (:func:`orientation`)."""
        super().__init__(inner, inner.target, {**inner.tensors, "dora_scale": magnitude})
        self.side = side

    # -- the inner patch's facts (rank, alpha, scale: InnerPatch) ------------------------------
    @property
    def inner_kind(self) -> str:
        return self.inner.kind

    @property
    def in_features(self):
        return self.inner.in_features

    @property
    def out_features(self):
        return self.inner.out_features

    @property
    def is_conv_kxk(self):
        return self.inner.is_conv_kxk

    @property
    def magnitude(self):
        return self.tensors["dora_scale"]

    def side_for(self, shape) -> str | None:
        """Per ``ROW`` or per ``COLUMN`` on a weight of ``shape`` (None: the magnitude fits neither)."""
        if self.side is not None:
            size = pymath.prod(tuple(self.magnitude.shape))
            return self.side if shape is None or size == shape[0] else None
        return orientation(self.magnitude.shape, shape)

    @property
    def orientation(self) -> str | None:
        """Per ``ROW`` or per ``COLUMN``, from the magnitude's shape alone (the weight's when it is known)."""
        return self.side_for(self.expected_shape())

    def expected_shape(self):
        return self.inner.expected_shape()

    def fits(self, shape):
        return self.inner.fits(shape) and self.side_for(tuple(shape)) is not None

    # -- what needs no base: nothing ---------------------------------------------------------
    def low_rank_factors(self):
        """None: ``D - W`` is no low-rank product (it depends on ``W``)."""
        return None

    def squared_norm(self):
        """None: the change's norm depends on the base weight, which the chart does not have."""
        return None

    def delta_bound(self) -> float:
        """Infinite: ``|D - W|`` is bounded by ``|m| + |W|``, and ``W`` is not known here; the weight engine then
        computes the exact result once to check it (:func:`adapterhub.weights.check_finite`)."""
        return pymath.inf

    # -- the math ----------------------------------------------------------------------------
    def _factor(self, v: torch.Tensor) -> torch.Tensor:
        """``m / (||V|| + eps)``, per row or per input channel of ``V``, shaped to broadcast over it."""
        import torch

        m = self.magnitude.to(device=v.device, dtype=torch.float32)
        if self.side_for(tuple(v.shape)) == ROW:
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *[1] * (v.dim() - 1))
        else:  # per input channel: over the output rows and the kernel taps
            norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, v.shape[1], *[1] * (v.dim() - 2))
        return m.reshape(norm.shape) / (norm + EPS)

    def decomposed(self, weight: torch.Tensor) -> torch.Tensor:
        """``D = m * V / (||V|| + eps)`` with ``V = weight + inner delta`` (float32, ``weight``'s shape)."""
        import torch

        v = weight.to(dtype=torch.float32, copy=True)
        self.inner.add_to(v, 1.0)  # V = W + delta, in the inner patch's fused form where it has one (a LoRA's addmm)
        # the factor first, then the product: the order lycoris-lora and PEFT compute it in
        return v.mul_(self._factor(v))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``D(weight) - weight``: the change at multiplier 1 to this base weight."""
        return self.decomposed(weight) - weight.float()

    def add_to(self, acc: torch.Tensor, multiplier: float) -> None:
        """``acc <- acc + s * (D(acc) - acc)`` in place, with no temporary of the weight's size: with
        ``V = acc + delta`` and ``c = m / (||V|| + eps)``, that is ``V * ((1 - s) + s * c) - (1 - s) * delta``;
        at ``s = 1`` exactly ``V * c``, lycoris-lora's and PEFT's product."""
        self.inner.add_to(acc, 1.0)  # acc = V
        factor = self._factor(acc)
        if multiplier == 1:
            acc.mul_(factor)
            return
        acc.mul_(factor.mul_(multiplier).add_(1 - multiplier))
        self.inner.add_to(acc, -(1 - multiplier))
