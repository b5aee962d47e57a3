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


def adalora(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """AdaLoRA (PEFT): ``B @ (A * E)`` (SVD-form triplet; the scale is applied by the caller)."""
    return lora_b.to(F32) @ (lora_a.to(F32) * lora_e.to(F32))


def ia3_delta(weight: torch.Tensor, scale: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)^3 as a delta linear in the multiplier: ``W * w`` over input columns or output rows."""
    w = scale.to(F32).flatten()
    shape = (1, -1) + (1,) * (weight.dim() - 2) if on_input else (-1,) + (1,) * (weight.dim() - 1)
    return weight.to(F32) * w.reshape(shape)
