"""The LoRA family's patches: declared tensors, a scale rule, and a call into ``math``."""
from __future__ import annotations

import math as pymath
from typing import TYPE_CHECKING

from adapterhub.types import Patch

# torch and ``math`` (which imports torch) are imported by the methods that compute: ``inspect`` builds
# patches from a file's shapes and scalars (``adapterhub.io.StoredTensor``) without torch
if TYPE_CHECKING:  # pragma: no cover - types only
    import torch


def _prod(shape) -> int:
    return pymath.prod(shape) if shape else 1


class ScaledPatch(Patch):
    """A low-rank patch with ``scale = alpha / rank`` (no alpha: scale 1), the rule everyone shares.

    ``file_keys`` maps each role (``up``, ``alpha`` ...) to its key in the file, for error messages."""

    def __init__(self, target, source, tensors, alpha: float | None = None, scale: float | None = None):
        super().__init__(target, source, tensors)
        self.alpha = alpha
        self._scale = scale
        self.file_keys: dict[str, str] = {}

    @property
    def scale(self) -> float:
        if self._scale is not None:
            return self._scale
        if self.alpha is None or not self.rank:
            return 1.0
        return self.alpha / self.rank

    def factor(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def factor_bound(self) -> float:  # pragma: no cover - interface
        """``>= max |factor|``, from work on the factors only (NaN / Inf if a factor holds one)."""
        raise NotImplementedError

    def delta_bound(self) -> float:
        """``>= max |delta|`` at multiplier 1: what the weight engine checks against the model's dtype."""
        return abs(self.scale) * self.factor_bound()

    def squared_norm(self) -> float | None:
        """As :meth:`Patch.squared_norm`; where the file leaves the weight's shape open (LoKr), from the factor
        alone: it holds the delta / scale in some layout of the same elements, which is all a norm needs."""
        import torch

        value = super().squared_norm()
        if value is not None:
            return value
        with torch.no_grad():
            return float(self.scale) ** 2 * float((self.factor(torch.zeros(0)).double() ** 2).sum())

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        from . import math as lmath

        moved = {k: v.to(weight.device) for k, v in self.tensors.items()}
        saved, self.tensors = self.tensors, moved
        try:
            d = self.factor(weight)
        finally:
            self.tensors = saved
        return lmath.scaled(d, weight.shape, self.scale)


class LoRAPatch(ScaledPatch):
    kind = "lora"

    @property
    def rank(self):
        return self.tensors["down"].shape[0]

    @property
    def in_features(self):
        return self.tensors["down"].shape[1]

    @property
    def is_conv_kxk(self):
        d = self.tensors["down"]
        return "mid" in self.tensors or (d.dim() == 4 and d.shape[2] * d.shape[3] > 1)

    def expected_shape(self):
        up, down = self.tensors["up"], self.tensors["down"]
        if "mid" in self.tensors:
            return (up.shape[0], down.shape[1], *self.tensors["mid"].shape[2:])
        return (up.shape[0], *down.shape[1:])

    def factor(self, weight):
        from . import math as lmath

        t = self.tensors
        return lmath.lora(t["up"], t["down"], t.get("mid"))

    def factor_bound(self):
        from . import math as lmath

        t = self.tensors
        return lmath.lora_bound(t["up"], t["down"], t.get("mid"))

    def add_to(self, acc, multiplier):
        from . import math as lmath

        t = self.tensors
        if "mid" in t or not acc.is_contiguous():
            return super().add_to(acc, multiplier)
        lmath.lora_add_(acc.view(acc.shape[0], -1), t["up"], t["down"], multiplier * self.scale)

    def low_rank_factors(self):
        """Flattened ``(up, down, scale)``; a CP/Tucker core is folded into ``down`` (exact:
        ``down'[n] = sum_m mid[n, m] * down[m]`` per kernel tap), so LoCon-CP concatenates too."""
        from . import math as lmath

        t = self.tensors
        down = lmath.fold_core(t["mid"], t["down"]) if "mid" in t else t["down"].float()
        return lmath.flat(t["up"].float()), lmath.flat(down), float(self.scale)


class AdaLoRAPatch(ScaledPatch):
    """PEFT AdaLoRA: ``B @ (A * E) * lora_alpha / (ranknum + 1e-5)``.

    ``ranknum`` is the config's ``init_r``: PEFT keeps it when the rank allocator's ``rank_pattern``
    slices the saved triplets to fewer ranks (``resize_modules_by_rank_pattern``); without a config,
    the saved rank."""

    kind = "adalora"

    def __init__(self, target, source, tensors, lora_alpha: float, ranknum: int | None = None,
                 alpha_known: bool = True):
        super().__init__(target, source, tensors)
        self.lora_alpha = lora_alpha
        # without adapter_config.json the alpha is unknown: reported as such (None), merged as PEFT does
        # with lora_alpha 0 (scaling r / (r + 1e-5))
        self.alpha = lora_alpha if alpha_known else None
        self.ranknum = ranknum

    @property
    def rank(self):
        return self.tensors["down"].shape[0]

    @property
    def in_features(self):
        return self.tensors["down"].shape[1]

    @property
    def scale(self):
        rank = self.rank
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(rank)
        return scaling / ((self.ranknum or rank) + 1e-5)

    def expected_shape(self):
        return (self.tensors["up"].shape[0], self.tensors["down"].shape[1])

    def fits(self, shape):
        return shape[0] == self.tensors["up"].shape[0] and _prod(shape[1:]) == self.tensors["down"].shape[1]

    def factor(self, weight):
        from . import math as lmath

        t = self.tensors
        return lmath.adalora(t["down"], t["E"], t["up"])

    def factor_bound(self):
        from . import math as lmath

        t = self.tensors
        return lmath.adalora_bound(t["down"], t["E"], t["up"])

    def low_rank_factors(self):
        t = self.tensors
        return t["up"].float(), t["down"].float() * t["E"].float(), float(self.scale)


class LoHaPatch(ScaledPatch):
    kind = "loha"

    @property
    def cp(self):
        return "hada_t1" in self.tensors

    @property
    def rank(self):
        return self.tensors["hada_w1_b"].shape[0]

    @property
    def out_features(self):
        a = self.tensors["hada_w1_a"]
        return a.shape[1] if self.cp else a.shape[0]

    @property
    def in_features(self):
        return self.tensors["hada_w1_b"].shape[1]

    @property
    def is_conv_kxk(self):
        return self.cp

    def expected_shape(self):
        if self.cp:
            return (self.out_features, self.in_features, *self.tensors["hada_t1"].shape[2:])
        return None

    def fits(self, shape):
        if self.cp:
            return tuple(shape) == self.expected_shape()
        return shape[0] == self.out_features and _prod(shape[1:]) == self.in_features

    def factor(self, weight):
        from . import math as lmath

        t = self.tensors
        return lmath.loha(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                          t.get("hada_t1"), t.get("hada_t2"))

    def factor_bound(self):
        from . import math as lmath

        t = self.tensors
        return lmath.loha_bound(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                                t.get("hada_t1"), t.get("hada_t2"))


class LoKrPatch(ScaledPatch):
    """LoKr: rank from ``w1_b`` else ``w2_b``; both factors whole means no rank and scale 1."""

    kind = "lokr"

    @property
    def rank(self):
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in self.tensors:
                return self.tensors[k].shape[0]
        return None

    def _factor_dims(self):
        t = self.tensors
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = (t["lokr_w2"].shape[0], _prod(t["lokr_w2"].shape[1:]))
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * _prod(t["lokr_t2"].shape[2:]))
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        return w1, w2

    @property
    def in_features(self):
        (l, m), (k, n) = self._factor_dims()
        return m * n

    @property
    def is_conv_kxk(self):
        t = self.tensors
        return "lokr_t2" in t or ("lokr_w2" in t and t["lokr_w2"].dim() == 4 and _prod(t["lokr_w2"].shape[2:]) > 1)

    def fits(self, shape):
        (l, m), (k, n) = self._factor_dims()
        return shape[0] == l * k and _prod(shape[1:]) == m * n

    def expected_shape(self):
        """``kron(W1, W2)``'s shape where a whole ``w2`` tells it: (l k, m n) for a 2-D one (a Linear), (l k, m c,
        kh, kw) for a 4-D one (a conv); None for a low-rank ``w2`` (its flat ``w2_b`` may hold a conv kernel, whose
        layout the model tells: :meth:`fits` checks the sizes)."""
        w2 = self.tensors.get("lokr_w2")
        if w2 is None:
            return None
        (l, m), (k, n) = self._factor_dims()
        return (l * k, m * n) if w2.dim() == 2 else (l * k, m * w2.shape[1], *w2.shape[2:])

    def factor(self, weight):
        from . import math as lmath

        t = self.tensors
        return lmath.lokr(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                          t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))

    def factor_bound(self):
        from . import math as lmath

        t = self.tensors
        return lmath.lokr_bound(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))


class InnerPatch(Patch):
    """A patch that answers for another, ``inner`` (a DoRA's, a fused module's rows): the rank, alpha, scale and
    file keys inspect and the writers read are the inner patch's."""

    def __init__(self, inner: Patch, target: str, tensors: dict):
        self.inner = inner  # first: a subclass's ``tensors`` may be the inner patch's own
        super().__init__(target, inner.source, tensors, param=inner.param)
        self.file_keys: dict[str, str] = dict(getattr(inner, "file_keys", {}))

    @property
    def rank(self):
        return getattr(self.inner, "rank", None)

    @property
    def alpha(self):
        return getattr(self.inner, "alpha", None)

    @property
    def scale(self):
        return getattr(self.inner, "scale", 1.0)


class DiffPatch(Patch):
    """A full difference (LyCORIS ``full``: ``diff``/``diff_b``; ``train_norm``: ``w_norm``/``b_norm``)."""

    kind = "diff"

    def __init__(self, target, source, tensors, param="weight"):
        super().__init__(target, source, tensors, param=param)
        self.file_keys: dict[str, str] = {}

    def expected_shape(self):
        return tuple(self.tensors["diff"].shape)

    def delta_bound(self) -> float:
        from . import math as lmath

        return lmath.magnitude(self.tensors["diff"])

    def delta(self, weight):
        import torch

        return self.tensors["diff"].to(device=weight.device, dtype=torch.float32).reshape(weight.shape).clone()
