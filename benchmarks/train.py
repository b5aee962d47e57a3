"""Training throughput of the one loop, per adapter type (random-weight bases, no downloads).

    python benchmarks/train.py                                   # CPU: tiny-sd1, 64 px, 20 steps per type
    python benchmarks/train.py --base sd1 --resolution 512 --batch-size 4 --steps 50 --device cuda \\
        --mixed-precision bf16 --types lora,loha

For each type it trains on the demo dataset (copied to a temporary kohya folder) and reports: setup
seconds (base load, PEFT/processor injection, latent caching, text cache), steady-state steps/s and
images/s (the first two steps, which include allocator warm-up, are left out), the final loss, and
the peak CUDA memory. A second run of the first type shows the cost of setup with the latent cache
already filled. ``--json`` prints the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo"


def bench(kind: str, args, data: Path, out: Path) -> dict:
    import torch

    from adapterhub.train import TrainConfig, train

    marks: list[float] = []
    started = time.perf_counter()
    setup: dict = {}

    def on_event(event, **info):
        if event == "start":
            setup["seconds"] = time.perf_counter() - started
        elif event == "step":
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    extra = {"lr_schedule": f"1e-4:{args.steps}"} if kind == "hypernetwork" else {}
    suffix = ".pt" if kind == "hypernetwork" else ".safetensors"
    result = train(TrainConfig(type=kind, base=args.base, dataset=data, out=out / f"bench_{kind}{suffix}",
                               max_steps=args.steps, batch_size=args.batch_size, resolution=args.resolution,
                               bucket_step=args.bucket_step, rank=args.rank, alpha=args.rank, seed=0,
                               device=args.device, mixed_precision=args.mixed_precision,
                               gradient_checkpointing=args.gradient_checkpointing, cache_dir=out / "latents",
                               **extra), on_event=on_event)
    steady = marks[2:] if len(marks) > 3 else marks
    seconds = steady[-1] - steady[0] if len(steady) > 1 else float("nan")
    steps = len(steady) - 1
    return {"type": kind, "setup_s": round(setup.get("seconds", float("nan")), 2),
            "steps_per_s": round(steps / seconds, 3) if steps > 0 else None,
            "images_per_s": round(steps * args.batch_size / seconds, 2) if steps > 0 else None,
            "last_loss": round(result["last_loss"], 4), "total_s": result["seconds"],
            "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available()
            else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-sd1")
    parser.add_argument("--types", default="lora,locon,loha,textual_inversion,hypernetwork")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--bucket-step", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-train-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        shutil.copytree(DEMO, data)
        kinds = [k.strip() for k in args.types.split(",") if k.strip()]
        for kind in kinds:
            rows.append(bench(kind, args, data, tmp))
        rows.append({**bench(kinds[0], args, data, tmp), "type": f"{kinds[0]} (latents cached)"})
    if args.json:
        print(json.dumps({"base": args.base, "device": args.device, "rows": rows}, indent=2))
    else:
        print(f"base {args.base}, {args.resolution} px, batch {args.batch_size}, {args.steps} steps, "
              f"device {args.device}, precision {args.mixed_precision}")
        cols = list(rows[0])
        print("  ".join(f"{c:>24}" if c == "type" else f"{c:>13}" for c in cols))
        for r in rows:
            print("  ".join(f"{str(r[c]):>24}" if c == "type" else f"{str(r[c]):>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
