"""The LoRA algebra's pure math: truncated SVD, kohya's dynamic-rank rules, PEFT's TIES / DARE.

Tensors in, tensors out; nothing here knows about files, modules or plugins.

* :func:`factorise` is kohya ``svd_merge_lora`` / ``extract_lora_from_models`` / ``resize_lora``:
  ``up = U_k diag(S_k)``, ``down = Vh_k``; :func:`factorise_product` gives the same for a product of
  low-rank factors without forming it. kohya then clamps both at the 0.99 quantile of their values
  (``CLAMP_QUANTILE``); here clamping is opt-in (``clamp_quantile``), so that by default the result
  is the optimal rank-k approximation (Eckart-Young: error = sqrt of the discarded squared singular
  values).
* :func:`dynamic_rank` is ``resize_lora.rank_resize`` as sd-scripts 48d368f has it, quirks included:
  the index functions add one and clamp to [1, len(S) - 1], then the caller adds one again.
* :func:`ties`, :func:`dare_linear`, :func:`dare_ties`, :func:`magnitude_prune` follow
  ``peft.utils.merge_utils`` step for step, but on whole deltas (PEFT prunes A and B separately) and
  with an explicit ``torch.Generator`` for DARE's random masks.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

MIN_SV = 1e-6  # kohya: a largest singular value at or below this means a zero matrix (rank 1)
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass
class Factors:
    """``up @ down`` approximates a 2-D matrix; ``singular`` are all its singular values."""

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in)
    singular: torch.Tensor
    error: float  # Frobenius norm of what is lost

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def retained(self) -> tuple[float, float]:
        """(kohya's "fro retained" = ||S_k|| / ||S||, energy = ||S_k||^2 / ||S||^2); 1 for a zero matrix."""
        sq = self.singular.double().pow(2)
        total = float(sq.sum())
        if total == 0.0:
            return 1.0, 1.0
        energy = float(sq[: self.rank].sum()) / total
        return energy ** 0.5, energy


def dynamic_rank(singular: torch.Tensor, method: str, param: float, cap: int) -> int:
    """The rank kohya's ``--dynamic_method`` picks from descending singular values, capped at ``cap``.

    * ``sv_ratio``: count of ``S > S[0] / param``;
    * ``sv_cumulative``: ``searchsorted(cumsum(S) / sum(S), param) + 1``;
    * ``sv_fro``: ``searchsorted(cumsum(S^2) / sum(S^2), param^2) + 1``;

    each clamped to [1, len(S) - 1], then + 1; a zero matrix (``S[0] <= 1e-6``) gets rank 1.
    """
    s = singular.double()
    n = len(s)
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param), dtype=s.dtype))) + 1
    elif method == "sv_fro":
        sq = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(),
                                       torch.tensor(float(param) ** 2, dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    rank = max(1, min(index, n - 1)) + 1
    if float(s[0]) <= MIN_SV:
        return 1
    return max(1, min(rank, cap))


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: both factors to [-h, h], h the ``quantile`` of their signed values together."""
    values = torch.cat([up.flatten(), down.flatten()])
    high = torch.quantile(values, quantile)
    return up.clamp(-high, high), down.clamp(-high, high)


def factorise(mat: torch.Tensor, rank: int | None = None, **options) -> Factors:
    """Best rank-k factors of a 2-D matrix: k = ``rank`` (capped at the matrix's size), or the rank a
    ``dynamic`` rule picks (capped at ``rank``). Options: ``dynamic``, ``clamp_quantile``,
    ``zero_is_rank_one`` (kohya resize's rule for a zero matrix, in fixed mode too)."""
    mat = mat.float()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return _truncate(u, s, vh, tuple(mat.shape), rank, lambda: mat, **options)


def factorise_product(up: torch.Tensor, down: torch.Tensor, rank: int | None = None, **options) -> Factors:
    """:func:`factorise` of ``up @ down`` (out x r, r x in), exactly, without forming the product: QR of
    each factor and SVD of the small core, in float64. O((out + in) r^2) instead of O(out in min(out, in)):
    what makes resizing or SVD-merging real LoRAs fast."""
    u, s, vh = svd_of_product(up, down)
    return _truncate(u, s, vh, (up.shape[0], down.shape[1]), rank, lambda: up.float() @ down.float(), **options)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``up @ down``: ``up = Q1 R1``, ``down^T = Q2 R2``, ``R1 R2^T = Uc S Vc^T``."""
    with _one_cpu_thread(up.device):
        q1, r1 = torch.linalg.qr(up.double())
        q2, r2 = torch.linalg.qr(down.double().T)
        uc, s, vch = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
        return (q1 @ uc).float(), s.float(), (vch @ q2.T).float()


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Thin factors are too small for a thread pool: on CPU one thread is faster, and many times faster
    on a busy machine (measured: 1 s vs 1.5-8 s for an SD1 LoRA on 2 loaded cores)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _truncate(u, s, vh, shape: tuple[int, int], rank: int | None, dense, dynamic: tuple[str, float] | None = None,
              clamp_quantile: float | None = None, zero_is_rank_one: bool = False) -> Factors:
    """Keep k components of a thin SVD; ``s`` may be shorter than min(shape) (the rest are zeros)."""
    n = min(shape)
    singular = torch.cat([s, s.new_zeros(n - len(s))]) if len(s) < n else s
    cap = n if rank is None else max(1, min(rank, n))
    if dynamic is not None:
        k = dynamic_rank(singular, dynamic[0], dynamic[1], cap)
    else:
        k = 1 if zero_is_rank_one and float(singular[0]) <= MIN_SV else cap
    m = min(k, len(s))
    up, down = u[:, :m] * s[:m], vh[:m]
    if k > m:  # the matrix has lower rank than asked: zero components, as a full SVD would give
        up = torch.cat([up, up.new_zeros(up.shape[0], k - m)], dim=1)
        down = torch.cat([down, down.new_zeros(k - m, down.shape[1])])
    if clamp_quantile is not None:
        up, down = clamp_factors(up, down, clamp_quantile)
        error = float(torch.linalg.matrix_norm(dense() - up @ down))
    else:
        error = float(singular[k:].double().pow(2).sum().sqrt())
    return Factors(up.contiguous(), down.contiguous(), singular, error)


# ---------------------------------------------------------------------------------------------
# task-vector merging (peft.utils.merge_utils semantics)
# ---------------------------------------------------------------------------------------------
def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest |values| (PEFT ``magnitude_based_pruning``)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each value with probability ``density`` and rescale by ``1/density`` (DARE). The mask is
    drawn on the CPU from ``generator`` so a seed gives the same mask on any device."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full(tensor.shape, float(density), dtype=tensor.dtype), generator=generator)
    return tensor * mask.to(tensor.device) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each task agrees with the elected sign: of the sum (``total``) or of the sign count."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the tasks that agree with the elected sign (at least one in the divisor)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _weights(weights, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    return w.view(w.shape + (1,) * (like.dim() - 1))


def ties(tensors: list[torch.Tensor], weights, density: float, majority: str = "total") -> torch.Tensor:
    """TIES: magnitude-prune each task, elect a sign (unweighted, as PEFT), disjoint weighted mean."""
    stacked = torch.stack([prune_magnitude(t, density) for t in tensors])
    mask = majority_sign_mask(stacked, majority)
    return disjoint_merge(stacked * _weights(weights, stacked), mask)


def dare_linear(tensors: list[torch.Tensor], weights, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: random keep with probability ``density``, rescale ``1/density``, weighted sum."""
    stacked = torch.stack([prune_random(t, density, generator) for t in tensors])
    return (stacked * _weights(weights, stacked)).sum(dim=0)


def dare_ties(tensors: list[torch.Tensor], weights, density: float, generator: torch.Generator | None = None,
              majority: str = "total") -> torch.Tensor:
    """DARE pruning, then TIES' sign election and disjoint mean."""
    stacked = torch.stack([prune_random(t, density, generator) for t in tensors])
    mask = majority_sign_mask(stacked, majority)
    return disjoint_merge(stacked * _weights(weights, stacked), mask)


def magnitude_prune(tensors: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    """Magnitude-prune each task, weighted sum."""
    stacked = torch.stack([prune_magnitude(t, density) for t in tensors])
    return (stacked * _weights(weights, stacked)).sum(dim=0)
