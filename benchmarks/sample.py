"""Sampling throughput: adapterhub's generator (eager, compiled) vs diffusers' pipeline, with stack switches.

    python benchmarks/sample.py                                  # tiny-sd1 on CPU, 256 px, 8 steps
    python benchmarks/sample.py --base sd1 --device cuda --dtype fp16 --size 512 --steps 20 --backends eager compiled

For each backend the script builds one generator, warms it up (compiling, for ``compiled``), then runs
``--requests`` requests that cycle through stacks of two random LoRAs (none, A, A+B, B): each request
switches the stack, encodes the prompt and samples. It prints seconds per request and per step, the
stack-switch cost, and (compiled) how many graphs dynamo built; the same requests through
``StableDiffusionPipeline.__call__`` with the LoRAs merged beforehand give the reference time per step.
The eager and diffusers latents are checked to agree (same scheduler, seeds and embeddings).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--backends", nargs="+", default=["eager"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import adapterhub.plugins as plugins
    import adapterhub_plugins.backends as backends_module
    from adapterhub.base import load_base
    from adapterhub.plugins import adapter_type
    from adapterhub.sample.generator import DTYPES, Generator, Request

    if "eager" not in plugins.sampler_backends():
        plugins.manager().register(backends_module)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    base = load_base(args.base, dtype=dtype, device=args.device)
    base.set_progress_bar_config(disable=True)
    folder = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
    for name, seed in (("A", 1), ("B", 2)):
        adapter_type("lora").example(base, folder / f"{name}.safetensors", seed=seed)
    stacks = [None, "A:0.8", "A:0.8, B:0.5", "B:1"]

    def request(i: int) -> Request:
        return Request("a castle on a hill, (masterpiece:1.2)", negative="blurry", stack=stacks[i % len(stacks)],
                       seed=i, steps=args.steps, sampler=args.sampler, width=args.size, height=args.size,
                       batch=args.batch)

    rows = []
    for name in args.backends:
        gen = Generator(copy.deepcopy(base), backend=name, adapter_dirs=[folder], hash_model=False)
        sync(args.device)
        start = time.perf_counter()
        gen.generate(request(0), output="latent")  # warm-up / compile
        sync(args.device)
        warm = time.perf_counter() - start
        switch = []
        start = time.perf_counter()
        for i in range(args.requests):
            t0 = time.perf_counter()
            stack, _ = gen._request_stack(request(i))
            gen.use_stack(stack)
            sync(args.device)
            switch.append(time.perf_counter() - t0)
            gen.generate(request(i), output="latent")
        sync(args.device)
        total = time.perf_counter() - start
        stats = gen.runner.stats()
        rows.append((name, warm, total / args.requests, total / args.requests / args.steps,
                     sum(switch) / len(switch), stats.get("frames_compiled", "-")))
        gen.close()

    from adapterhub.sample.samplers import make_scheduler

    ref = Generator(copy.deepcopy(base), hash_model=False)
    cond, uncond = ref.encode("a castle on a hill, (masterpiece:1.2)", "blurry")
    scheduler = make_scheduler(args.sampler, "Automatic", base.scheduler.config)
    pipe = type(base)(**{**base.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
    if ref.is_xl:
        kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)

    def diffusers_call(seed):
        return pipe(**kw, num_inference_steps=args.steps, width=args.size, height=args.size, guidance_scale=7.0,
                    num_images_per_prompt=args.batch, output_type="latent",
                    generator=[torch.Generator().manual_seed(seed + i) for i in range(args.batch)]).images

    diffusers_call(0)
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.requests):
        theirs = diffusers_call(i)
    sync(args.device)
    per_request = (time.perf_counter() - start) / args.requests
    ours = ref.generate(Request("a castle on a hill, (masterpiece:1.2)", negative="blurry", seed=args.requests - 1,
                                steps=args.steps, sampler=args.sampler, width=args.size, height=args.size,
                                batch=args.batch), output="latent").latents
    agree = torch.equal(ours, theirs)

    print(f"base {args.base}, {args.device} {str(dtype).split('.')[-1]}, {args.size}px, {args.steps} steps, "
          f"batch {args.batch}, {args.sampler}, {args.requests} requests cycling stacks {stacks}")
    print(f"{'backend':<10}{'warm-up s':>10}{'s/request':>11}{'s/step':>9}{'switch s':>10}{'graphs':>8}")
    for name, warm, req, step, sw, graphs in rows:
        print(f"{name:<10}{warm:>10.2f}{req:>11.3f}{step:>9.4f}{sw:>10.4f}{str(graphs):>8}")
    print(f"{'diffusers':<10}{'':>10}{per_request:>11.3f}{per_request / args.steps:>9.4f}{'(no stack)':>10}")
    print(f"eager latents == diffusers latents (bitwise): {agree}")


if __name__ == "__main__":
    main()
