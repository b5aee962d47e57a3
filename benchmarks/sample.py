"""Sampling throughput: adapterhub's generator (eager, compiled) vs diffusers' pipeline, with stack switches.

    python benchmarks/sample.py                                  # tiny-sd1 on CPU, 256 px, 8 steps
    python benchmarks/sample.py --base sd1 --device cuda --dtype fp16 --size 512 --steps 20 --backends eager compiled
    python benchmarks/sample.py --backends compiled compiled:fuse_qkv=0 compiled:channels_last=1 --profile 10

A thin script over ``sample_harness.py`` beside it (also ``adapterhub bench sample``), which documents
what is measured: ms per step and images/s with no adapters and with a stack of two random LoRAs,
the stack-switch time, the compile time of the compiled backend, and the same through diffusers'
own pipeline (diffusers + peft LoRAs unfused and fused, diffusers + ``torch.compile`` of the UNet) in the
same run, printed as ratios; FLOPs per UNet step against the measured matmul peak (TFLOP/s, share of
peak) and peak memory over requests alternating between two sizes. A backend may carry options
(``compiled:fuse_qkv=0,mode=reduce-overhead``) to measure each option's gain as its own row; ``--profile N``
prints the top kernels of one request, ``--second-process`` the time a fresh process takes to its first image.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # as the CLI: no safety-checker notice, no load reports
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--requests", type=int, default=8, help="timed requests (and switch cycles) per path")
    ap.add_argument("--backends", nargs="+", default=["eager"])
    ap.add_argument("--no-lora-reference", action="store_true")
    ap.add_argument("--no-diffusers-fused", action="store_true", help="skip diffusers with the LoRAs fused")
    ap.add_argument("--no-diffusers-compile", action="store_true", help="skip diffusers + torch.compile (slow on CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak memory over alternating sizes")
    ap.add_argument("--profile", type=int, default=0, help="top kernels of one request per backend (rows)")
    ap.add_argument("--second-process", action="store_true", help="time a fresh process to its first image")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from adapterhub import plugins
    from sample_harness import BenchConfig, bench_sample, format_report  # benchmarks/ is on sys.path

    if "eager" not in plugins.sampler_backends():  # running from a checkout without the entry points
        import adapterhub_plugins.backends as backends_module

        plugins.manager().register(backends_module)
    cfg = BenchConfig(base=args.base, backends=tuple(args.backends), steps=args.steps, size=args.size,
                      repeat=args.requests, batch=args.batch, sampler=args.sampler, device=args.device,
                      dtype=args.dtype, lora_reference=not args.no_lora_reference,
                      diffusers_fused=not args.no_diffusers_fused, diffusers_compile=not args.no_diffusers_compile,
                      memory=not args.no_memory, profile=args.profile, second_process=args.second_process)
    report = bench_sample(cfg, note=None if args.json else lambda text: print(f"... {text}", flush=True))
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))


if __name__ == "__main__":
    main()
