"""A DoRA module's merge into one FLUX.1-sized Linear (3072 x 3072) vs the same LoRA without its magnitude.

    python benchmarks/dora.py                        # CPU, rank 16, best of 3
    python benchmarks/dora.py --device cuda --repeat 5

Reference path: the plain LoRA's ``add_to`` (one fused ``addmm_`` into the float32 accumulator). adapterhub
path: the DoRA patch's ``add_to`` around the same LoRA, at multiplier 1 (one ``addmm_``, the norms, one
product) and at 0.8 (a second ``addmm_``). Each takes its turn on a fresh copy of the weight, round by round;
the script prints the time ratio (DoRA / LoRA) and checks the result against ``D = m V / (||V|| + eps)``
computed the plain way (float32, max |difference|).
"""
from __future__ import annotations

import argparse

import torch
from _common import timed  # noqa: F401 - benchmarks/ is on sys.path

OUT, WIDTH = 3072, 3072


def main() -> None:
    from adapterhub_plugins.lora.dora import EPS, DoRAPatch
    from adapterhub_plugins.lora.patches import LoRAPatch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, WIDTH, generator=gen).to(args.device)
    lora = LoRAPatch("t", "m", {"up": (torch.randn(OUT, args.rank, generator=gen) * 0.01).to(args.device),
                                "down": (torch.randn(args.rank, WIDTH, generator=gen) * 0.01).to(args.device)},
                     alpha=args.rank / 2)
    dora = DoRAPatch(lora, (torch.rand(OUT, 1, generator=gen) + 0.5).to(args.device))
    v = weight + lora.delta(weight)
    plain = dora.magnitude * v / (v.norm(dim=1, keepdim=True) + EPS)
    acc = weight.clone()
    dora.add_to(acc, 1.0)
    error = float((acc - plain).abs().max())
    for s in (1.0, 0.8):
        ref, ours = [], []
        for _ in range(args.repeat):
            acc = weight.clone()
            ref.append(timed(lambda: lora.add_to(acc, s), args.device))
            acc = weight.clone()
            ours.append(timed(lambda: dora.add_to(acc, s), args.device))
        print(f"multiplier {s}: LoRA add_to {min(ref) * 1e3:.1f} ms, DoRA add_to {min(ours) * 1e3:.1f} ms, "
              f"ratio {min(ours) / min(ref):.2f}")
    print(f"max |DoRA add_to - plain formula| at multiplier 1: {error:.2e}")


if __name__ == "__main__":
    main()
