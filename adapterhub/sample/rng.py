"""Where the noise comes from: the webui's ``RNG`` sources (its option ``randn_source``; infotext key ``RNG``).

* ``CPU``: ``torch.randn`` from a CPU ``torch.Generator`` seeded with the image's seed, moved to the device
  (the same numbers on any machine; adapterhub's default).
* ``GPU``: the same from a CUDA generator, on the GPU (the webui's default; NVIDIA cards only). An infotext
  without ``RNG`` means GPU.
* ``NV``: the webui's emulation of what torch's CUDA generator gives, on any device: Philox 4x32-10
  (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the counter-based generator
  behind cuRAND's ``curand_init(seed, subsequence, offset)``) and the Box-Muller transform, as cuRAND's
  ``curand_normal`` applies it. Element ``i`` of a draw is the first normal of Philox with key = the
  seed (low word, high word) and counter = (draw number, 0, i, 0); each draw takes the next draw number.

Per image one generator, seeded with that image's seed, draws its initial noise of shape (C, H/8, W/8)
(the webui's ``ImageRNG``). Later draws (ancestral and SDE samplers' noise) come from torch generators:
CPU ones for ``CPU`` and ``NV``, CUDA ones for ``GPU``; diffusers' schedulers take only ``torch.Generator``,
so with ``NV`` those later draws are not the webui's (:func:`later_draws_note` says so).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from adapterhub.errors import AdapterhubError

SOURCES = ("CPU", "GPU", "NV")

# Philox 4x32 constants (Random123 philox.h): the round multipliers and the Weyl key increments
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
# cuRAND's float32 constants for Box-Muller (CURAND_2POW32_INV and CURAND_2POW32_INV * 2 pi, as float32)
INV_2POW32 = float(np.float32(2.3283064e-10))
INV_2POW32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))
LOW32 = np.uint64(0xFFFFFFFF)


def source(name: str) -> str:
    """The canonical source name (``CPU``, ``GPU``, ``NV``; any case), or one line listing them."""
    canonical = str(name).strip().upper()
    if canonical not in SOURCES:
        raise AdapterhubError(f"RNG {name!r}: choose one of {', '.join(SOURCES)}")
    return canonical


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32-``rounds`` of ``counter`` (4, N) under ``key`` (2, N), both uint32; returns (4, N) uint32.

    A round multiplies words 0 and 2 by the two constants (64-bit products split into high and low
    words) and mixes the high words with the other words and the key; the key is bumped between rounds."""
    c = [counter[i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[0].astype(np.uint64), key[1].astype(np.uint64)
    for r in range(rounds):
        if r:  # the key schedule: a Weyl sequence, modulo 2^32
            k0, k1 = (k0 + PHILOX_W[0]) & LOW32, (k1 + PHILOX_W[1]) & LOW32
        p0, p1 = c[0] * np.uint64(PHILOX_M[0]), c[2] * np.uint64(PHILOX_M[1])  # < 2^64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & LOW32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & LOW32]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of cuRAND's Box-Muller pair from two uint32 arrays: ``u``, ``v`` centred in their
    2^-32 bins (``v`` scaled to the circle), ``sqrt(-2 log u) sin v``; float32. Computed in float64 from the
    float32 constants, as the webui's emulation does (CUDA's float32 arithmetic differs in the last bits)."""
    u = x.astype(np.float64) * INV_2POW32 + INV_2POW32 / 2
    v = y.astype(np.float64) * INV_2POW32_2PI + INV_2POW32_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class Philox:
    """The ``NV`` source: ``randn(shape)`` gives what ``torch.randn(shape, device="cuda")`` gives from a CUDA
    generator seeded ``seed`` (as its ``offset``-th draw), on the CPU, float32."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2 ** 32:  # the element index is one 32-bit counter word
            raise AdapterhubError(f"RNG NV: {n} numbers in one draw; at most 2^32 - 1")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        key = np.empty((2, n), dtype=np.uint32)
        key[0], key[1] = self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF
        self.offset += 1
        out = philox4x32(counter, key)
        return torch.from_numpy(box_muller(out[0], out[1]).reshape(tuple(shape)))


def _gpu_problem(device) -> str:
    return (f"RNG GPU draws CUDA's noise and this runs on {torch.device(device).type}: use --rng nv (the same "
            "numbers, emulated on any device) or --rng cpu")


def initial_noise(name: str, seeds: Sequence[int], shape: Sequence[int], device,
                  ensd: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per seed its first draw of ``shape`` (C, H, W) from source ``name``, stacked (B, C, H, W) float32 on
    the CPU for ``CPU``/``NV`` and on the GPU for ``GPU``, and the per-image torch generators for later
    draws: CPU ones seeded with the seeds for ``CPU``/``NV``, the CUDA ones themselves for ``GPU``; with
    ``ensd`` (the webui's eta noise seed delta) new ones seeded ``seed + ensd``, as ``ImageRNG.first`` does."""
    name = source(name)
    shape = tuple(int(s) for s in shape)
    if name == "GPU":
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise AdapterhubError(_gpu_problem(device))
        gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in gens])
    else:
        device = torch.device("cpu")
        gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        noise = torch.stack([Philox(s).randn(shape) for s in seeds]) if name == "NV" else \
            torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])
    if ensd:
        gens = [torch.Generator(device).manual_seed(int(s) + int(ensd)) for s in seeds]
    return noise, gens


def check_device(name: str, device) -> None:
    """One line if source ``name`` cannot run on ``device`` (GPU needs CUDA), before anything is sampled."""
    if source(name) == "GPU" and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise AdapterhubError(_gpu_problem(device))


def draws_more(sampler_name: str) -> bool:
    """Whether the sampler draws noise after the first (ancestral, SDE, restart and LCM steps)."""
    return (sampler_name.endswith(" a") or "SDE" in sampler_name
            or sampler_name in ("DPM fast", "DPM adaptive", "Restart", "LCM"))


def later_draws_note(name: str, sampler_name: str) -> str | None:
    """The warning for ``NV`` with a sampler that draws more noise: only the initial noise is the webui's."""
    if source(name) != "NV" or not draws_more(sampler_name):
        return None
    return (f"RNG NV with {sampler_name}: the initial noise is the webui's NV noise, the sampler's later noise is "
            "not (it is drawn on the CPU), so the image will not match the webui's")
