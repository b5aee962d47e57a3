"""A LoKr / LoHa on FLUX.1's fused ``linear1`` (21504 x 3072): its four diffusers parts' rows vs the fused delta.

    python benchmarks/fused_rows.py                  # CPU, rank 4, best of 3
    python benchmarks/fused_rows.py --device cuda --repeat 5

Reference path: the inner patch's delta on the whole fused weight (what splitting a merged BFL weight
starts from). adapterhub path: the four ``RowsPatch`` deltas (``to_q``, ``to_k``, ``to_v``, ``proj_mlp``) one
after the other. The two take turns, round by round; the script checks that the rows are equal bit for bit
and prints the time ratio (rows / fused) per kind. Peak memory of the rows path is one part's rows (a LoKr
at most ``2 x k`` rows more), where the reference holds the whole fused delta.
"""
from __future__ import annotations

import argparse

import torch
from _common import timed  # noqa: F401 - benchmarks/ is on sys.path

OUT, WIDTH = 21504, 3072  # FLUX.1's linear1: q, k, v (3 x 3072) and the MLP's 12288
ROWS = (((0, WIDTH),), ((WIDTH, 2 * WIDTH),), ((2 * WIDTH, 3 * WIDTH),), ((3 * WIDTH, OUT),))


def patches(rank: int) -> dict:
    """LyCORIS' shapes for 21504 x 3072 at factor -1: w1 (128, 48) whole, w2 (168, 64) as a rank-``rank`` product."""
    from adapterhub_plugins.lora.patches import LoHaPatch, LoKrPatch

    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return {"lokr": LoKrPatch("t", "m", {"lokr_w1": r(128, 48), "lokr_w2_a": r(168, rank), "lokr_w2_b": r(rank, 64)},
                              alpha=1.0),
            "loha": LoHaPatch("t", "m", {"hada_w1_a": r(OUT, rank), "hada_w1_b": r(rank, WIDTH),
                                         "hada_w2_a": r(OUT, rank), "hada_w2_b": r(rank, WIDTH)}, alpha=1.0)}


def main() -> None:
    from adapterhub_plugins.lora.fused import RowsPatch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for kind, inner in patches(args.rank).items():
        inner.tensors = {k: v.to(args.device) for k, v in inner.tensors.items()}
        stand_in = torch.empty(1, device=args.device).expand(OUT, WIDTH)
        parts = [RowsPatch(inner, f"part{j}", rows, (OUT, WIDTH)) for j, rows in enumerate(ROWS)]
        weights = [torch.empty(p.expected_shape(), device=args.device) for p in parts]
        full = inner.delta(stand_in)
        same = all(torch.equal(p.delta(w), full[rows[0][0]:rows[0][1]]) for p, w, rows in zip(parts, weights, ROWS))
        del full
        fused, split = [], []
        for _ in range(args.repeat):
            fused.append(timed(lambda: inner.delta(stand_in), args.device))
            split.append(timed(lambda: [p.delta(w) for p, w in zip(parts, weights)], args.device))
        print(f"{kind}: fused delta {min(fused) * 1e3:.0f} ms, four parts' rows {min(split) * 1e3:.0f} ms, "
              f"ratio {min(split) / min(fused):.2f}; rows equal bit for bit: {same}")


if __name__ == "__main__":
    main()
