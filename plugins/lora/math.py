"""The LoRA family's weight math: pure tensors in, float32 delta out. The only place a delta is computed.

Shapes follow the kohya / LyCORIS / PEFT conventions (see ``shared/reference/formats.md``):
``up`` (out, r[,1,1]), ``down`` (r, in[,kh,kw]), LoHa ``w1_a`` (out, r), ``w1_b`` (r, in*kh*kw), ...
"""
from __future__ import annotations

import torch

F32 = torch.float32


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def lora(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """up @ down, with the conv identity ``flat(U) @ flat(D)`` (kohya, A1111, ComfyUI, PEFT agree).

    With a CP/Tucker core ``mid`` (r, r, kh, kw) and 1x1 ``down``: ``einsum(mid, flat(up), flat(down))``.
    Returns (out, in) for linear layers and (out, in, kh, kw) for convs.
    """
    up, down = up.to(F32), down.to(F32)
    if mid is not None:
        return torch.einsum("nmkl,in,mj->ijkl", mid.to(F32), flat(up), flat(down))
    delta = flat(up) @ flat(down)
    if down.dim() == 4:
        return delta.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return delta


def lora_norm(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of ``up @ down`` (kohya's max-norm measure; the caller applies the scale)."""
    return (flat(up.to(F32)) @ flat(down.to(F32))).norm()


def fold_core(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker core folded into ``down`` (exact, per kernel tap: ``down'[n] = sum_m mid[n, m] * down[m]``),
    float32 (r, in, kh, kw): then ``lora(up, down') == lora(up, down, mid)``."""
    return torch.einsum("nmkl,mj->njkl", mid.to(F32), flat(down.to(F32)))


def conv_factors(up: torch.Tensor, down: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``up`` (out, r) and ``down`` (r, in*kh*kw) in the shapes a layer of weight ``shape`` holds them:
    up (out, r[, 1, 1]), down (r, in[, kh, kw])."""
    ones = (1,) * (len(shape) - 2)
    return up.reshape(up.shape[0], up.shape[1], *ones), down.reshape(down.shape[0], *shape[1:])


def scaled(factor: torch.Tensor, shape, scale: float) -> torch.Tensor:
    """The delta of a weight of ``shape`` from its unscaled ``factor``: reshaped, times ``scale`` (in place)."""
    return factor.reshape(shape).mul_(scale)


def orthogonality(p: torch.Tensor, rows: bool) -> torch.Tensor:
    """``||P Pᵀ - I||_F`` (``rows``) or ``||Pᵀ P - I||_F``, in ``p``'s dtype and differentiable (AdaLoRA's
    regulariser on ``lora_A`` and ``lora_B``)."""
    cov = p @ p.T if rows else p.T @ p
    return torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro")


def lora_add_(acc2d: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
    """``acc2d += scale * flat(up) @ flat(down)`` in one fused ``addmm_`` (no delta-sized temporary)."""
    device = acc2d.device
    acc2d.addmm_(flat(up).to(device, F32), flat(down).to(device, F32), alpha=scale)


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS CP/Tucker rebuild: ``einsum('i j k l, j r, i p -> p r k l', core, b, a)``."""
    return torch.einsum("ijkl,jr,ip->prkl", core.to(F32), b.to(F32), a.to(F32))


def loha(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None) -> torch.Tensor:
    """LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``, or the product of two Tucker rebuilds with ``t1/t2``."""
    if t1 is not None and t2 is not None:
        return tucker(t1, w1_a, w1_b) * tucker(t2, w2_a, w2_b)
    return (w1_a.to(F32) @ w1_b.to(F32)) * (w2_a.to(F32) @ w2_b.to(F32))


def lokr(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None) -> torch.Tensor:
    """LoKr: ``kron(W1, W2)``; each factor given whole or as a low-rank (or Tucker) product.

    Returned 2-D (out, in*kh*kw); the caller reshapes to the weight's shape.
    """
    left = w1.to(F32) if w1 is not None else w1_a.to(F32) @ w1_b.to(F32)
    if w2 is not None:
        right = w2.to(F32)
    elif t2 is not None:
        right = tucker(t2, w2_a, w2_b)
    else:
        right = w2_a.to(F32) @ w2_b.to(F32)
    return torch.kron(left, flat(right).contiguous())  # kron views its inputs; a Tucker rebuild is strided


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated by rows; one part as it is (its rows are already contiguous)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def loha_rows(w1_a, w1_b, w2_a, w2_b, rows) -> torch.Tensor:
    """The rows ``rows`` ((start, stop) pairs, in order) of a 2-D :func:`loha` product, unscaled, bit for bit those
    of the whole product, without forming the others: each row is its own row of both factors' products."""
    return _joined([(w1_a[a:b].to(F32) @ w1_b.to(F32)) * (w2_a[a:b].to(F32) @ w2_b.to(F32)) for a, b in rows])


def lokr_rows(rows, w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None) -> torch.Tensor:
    """The rows ``rows`` of a 2-D :func:`lokr` product, unscaled, bit for bit those of the whole product: rows
    a..b of ``kron(L, R)`` lie in L's rows ``a // k .. ceil(b / k)`` (k = R's rows), so the Kronecker product of
    those, trimmed (at most 2 k rows more than asked for, where a boundary falls inside one of R's blocks)."""
    left = w1.to(F32) if w1 is not None else w1_a.to(F32) @ w1_b.to(F32)
    right = w2.to(F32) if w2 is not None else w2_a.to(F32) @ w2_b.to(F32)
    k = right.shape[0]
    return _joined([torch.kron(left[a // k: -(-b // k)], right)[a - a // k * k: b - a // k * k] for a, b in rows])


def adalora(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """AdaLoRA (PEFT): ``B @ (A * E)`` (SVD-form triplet; the scale is applied by the caller)."""
    return lora_b.to(F32) @ (lora_a.to(F32) * lora_e.to(F32))


def ia3_delta(weight: torch.Tensor, scale: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)^3 as a delta linear in the multiplier: ``W * w`` over input columns or output rows."""
    w = scale.to(F32).flatten()
    shape = (1, -1) + (1,) * (weight.dim() - 2) if on_input else (-1,) + (1,) * (weight.dim() - 1)
    return weight.to(F32) * w.reshape(shape)


# ---------------------------------------------------------------------------------------------
# bounds: max |delta| from O(size of the factors) work, so the engine can tell that a result stays
# finite in the model's dtype without computing it (NaN / Inf in a factor gives a NaN / Inf bound;
# only float32 overflow of the bound itself is Inf too, and the engine then computes the exact result)
# ---------------------------------------------------------------------------------------------
def _abs32(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float32 (no copy beyond the one ``abs`` makes for float32 factors). A bound that
    overflows float32 itself is Inf: the engine then checks the factors and computes the exact result."""
    return x.detach().to(F32).abs()


def _largest(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0  # torch's max propagates NaN


def magnitude(x: torch.Tensor) -> float:
    """``max |x|`` without a temporary the size of ``x`` (NaN if ``x`` holds a NaN; 0 if empty)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return float(torch.stack([lo.abs(), hi.abs()]).float().max())


def product_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """``>= max |flat(a) @ flat(b)|``: row sums of ``|a|`` weighted by the row maxima of ``|b|``."""
    if a.numel() == 0 or b.numel() == 0:  # an empty factor (AdaLoRA rank 0): a zero delta
        return 0.0
    a, b = _abs32(flat(a)), _abs32(flat(b))
    return _largest(a @ b.amax(dim=1))


def tucker_bound(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``>= max |tucker(core, a, b)|`` (``sum_ij |core_ijkl| |a_ip| max_r |b_jr|``)."""
    if core.numel() == 0 or a.numel() == 0 or b.numel() == 0:
        return 0.0
    core, a, b = _abs32(core), _abs32(a), _abs32(b)
    inner = torch.einsum("ijkl,j->ikl", core, b.amax(dim=1))
    return _largest(a.T @ inner.reshape(inner.shape[0], -1))


def lora_bound(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> float:
    """``>= max |lora(up, down, mid)|``."""
    if mid is None:
        return product_bound(up, down)
    if up.numel() == 0 or down.numel() == 0 or mid.numel() == 0:
        return 0.0
    up, down, mid = _abs32(flat(up)), _abs32(flat(down)), _abs32(mid)
    inner = torch.einsum("nmkl,m->nkl", mid, down.amax(dim=1))
    return _largest(up @ inner.reshape(inner.shape[0], -1))


def loha_bound(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None) -> float:
    """``>= max |loha(...)|``: the product of the two halves' bounds."""
    if t1 is not None and t2 is not None:
        return tucker_bound(t1, w1_a, w1_b) * tucker_bound(t2, w2_a, w2_b)
    return product_bound(w1_a, w1_b) * product_bound(w2_a, w2_b)


def lokr_bound(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None) -> float:
    """``>= max |lokr(...)|`` (``max |kron(L, R)| = max |L| * max |R|``)."""
    left = magnitude(w1) if w1 is not None else product_bound(w1_a, w1_b)
    if w2 is not None:
        right = magnitude(w2)
    elif t2 is not None:
        right = tucker_bound(t2, w2_a, w2_b)
    else:
        right = product_bound(w2_a, w2_b)
    return left * right


def adalora_bound(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor) -> float:
    """``>= max |adalora(...)|``."""
    return product_bound(lora_b, lora_a.to(F32) * lora_e.to(F32))
