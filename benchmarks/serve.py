"""``adapterhub serve`` throughput and latency against calling the Generator directly, in the same run.

    python benchmarks/serve.py                                   # tiny-sd1 on CPU, 64 px, 4 steps
    python benchmarks/serve.py --device cuda --size 512 --steps 20 --backend compiled

A stream of txt2img requests alternating between two stacks (``<lora:a:1>`` and ``<lora:b:0.8>``, two
random LoRAs) or staying on one (``--streams``) goes, in turn:

* **direct**: ``Generator.generate`` with the same :class:`~adapterhub.sample.generator.Request` objects
  the server plans, built before the clock starts;
* **serve**: one HTTP client (``requests.Session``, keep-alive) against the real server (uvicorn on a free
  loopback port, in this process), request after request: the JSON body, planning, the queue, the worker,
  PNG encoding with the infotext, base64 and JSON back, decoded by the client;
* **serve xC**: ``--clients`` such clients at once (the queue keeps one request running at a time).

Direct and serve run on two generators of the same base (each switching its own stacks in the stream's
order) and take turns request by request, so a shared machine's load hits both alike; serve xC follows in
each of ``--rounds`` rounds. Each path prints requests/s (one client: 1 / mean latency; xC: requests over wall
time) and p50/p95 latency; the ratios serve / direct are the figure. The stack switch
(``Generator.use_stack``, device synchronised around it) is timed inside every request, and reported as ms
per request and its share of the request's time. The first image of each stack through the server is
checked pixel for pixel against the direct one.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import sync  # noqa: E402 - benchmarks/ is on sys.path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STACKS = {"alternating": ["a hill <lora:a:1>", "a hill <lora:b:0.8>"], "same": ["a hill <lora:a:1>"]}


class SwitchClock:
    """Wraps ``generator.use_stack`` (an instance attribute shadowing the method): seconds spent switching."""

    def __init__(self, generator, device: str):
        self.generator, self.device, self.seconds = generator, device, 0.0
        self._use_stack = generator.use_stack
        generator.use_stack = self

    def __call__(self, stack) -> None:
        sync(self.device)
        start = time.perf_counter()
        self._use_stack(stack)
        sync(self.device)
        self.seconds += time.perf_counter() - start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Server:
    """The app on a free loopback port, in a thread of this process."""

    def __init__(self, service):
        import uvicorn

        from adapterhub.cli.serve import bind
        from adapterhub.serve.app import create_app

        self.sock = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/sdapi/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def body(prompt: str, args, seed: int) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": args.steps, "width": args.size, "height": args.size,
            "sampler_name": args.sampler, "cfg_scale": 7.0}


def direct_one(generator, req, clock: SwitchClock, device: str) -> tuple[float, float]:
    """One request on the generator: its latency and the seconds it spent switching stacks."""
    clock.take()
    sync(device)
    start = time.perf_counter()
    generator.generate(req)
    sync(device)
    return time.perf_counter() - start, clock.take()


def served_one(session, url: str, payload: dict, clock: SwitchClock) -> tuple[float, float]:
    """One request through the server, its images decoded as a client does: latency and switch seconds."""
    from PIL import Image

    clock.take()
    start = time.perf_counter()
    response = session.post(f"{url}/txt2img", json=payload, timeout=600)
    response.raise_for_status()
    for image in response.json()["images"]:
        Image.open(io.BytesIO(base64.b64decode(image))).load()
    return time.perf_counter() - start, clock.take()


def run_concurrent(url: str, bodies: list[dict], clients: int) -> tuple[list[float], float]:
    """``clients`` sessions sending ``bodies`` between them; per-request latency and the wall time."""
    import requests

    sessions = [requests.Session() for _ in range(clients)]

    def one(k: int) -> float:
        start = time.perf_counter()
        response = sessions[k % clients].post(f"{url}/txt2img", json=bodies[k], timeout=600)
        response.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(len(bodies))))
    return latencies, time.perf_counter() - start


def row(name: str, latencies: list[float], wall: float | None, switches: list[float] | None) -> dict:
    """A path's figures; ``wall`` None: one client, requests/s from its own latencies."""
    out = {"path": name, "requests": len(latencies), "req_s": len(latencies) / (wall or sum(latencies)),
           "p50_ms": 1e3 * statistics.median(latencies), "p95_ms": 1e3 * percentile(latencies, 0.95)}
    if switches is not None:
        out["switch_ms"] = 1e3 * sum(switches) / len(switches)
        out["switch_share"] = sum(switches) / sum(latencies)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sampler", default="Euler a")
    ap.add_argument("--requests", type=int, default=8, help="requests per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of the serve xC path (0: skip)")
    ap.add_argument("--streams", nargs="+", default=["alternating", "same"], choices=sorted(STACKS))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import numpy as np
    import requests
    from PIL import Image

    from adapterhub.cli.output import quiet_model_loading
    from adapterhub.plugins import adapter_type
    from adapterhub.sample.generator import Generator, Request
    from adapterhub.serve.app import Service

    quiet_model_loading()
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    direct = Generator(args.base, backend=args.backend, dtype=args.dtype, device=args.device, adapter_dirs=[folder])
    for name, seed in (("a", 1), ("b", 2)):
        adapter_type("lora").example(direct.pipe, folder / f"{name}.safetensors", seed=seed, rank=args.rank)
    generator = Generator(args.base, backend=args.backend, dtype=args.dtype, device=args.device)
    service = Service(generator, adapter_dirs=[folder], catalog=False, max_queue=max(16, args.clients * 2),
                      max_size=None)
    direct_clock, served_clock = SwitchClock(direct, args.device), SwitchClock(generator, args.device)
    server = Server(service)
    session = requests.Session()
    print(f"base {args.base}, {args.device}, backend {args.backend}, {args.size}x{args.size}, {args.steps} steps "
          f"{args.sampler}, LoRA rank {args.rank}, {args.requests} requests x {args.rounds} rounds", flush=True)
    try:
        for stream in args.streams:
            prompts = STACKS[stream]
            picks = [prompts[k % len(prompts)] for k in range(args.requests)]
            bodies = [body(p, args, seed=100 + k) for k, p in enumerate(picks)]
            reqs = [Request(p, seed=100 + k, steps=args.steps, width=args.size, height=args.size,
                            sampler=args.sampler, cfg=7.0) for k, p in enumerate(picks)]
            # warm-up (first reads of the LoRAs, a compile) and the check: served = direct, pixel for pixel
            identical = True
            for k in range(len(prompts)):
                ours = np.asarray(direct.generate(reqs[k]).images[0])
                served = session.post(f"{server.url}/txt2img", json=bodies[k], timeout=600).json()["images"][0]
                identical &= np.array_equal(ours, np.asarray(Image.open(io.BytesIO(base64.b64decode(served)))
                                                             .convert("RGB")))
            got = {"direct": ([], []), "serve": ([], [])}
            many, many_wall = [], 0.0
            for _ in range(args.rounds):
                for req, payload in zip(reqs, bodies):  # request by request: the load hits both alike
                    for name, (lat, sw) in (("direct", direct_one(direct, req, direct_clock, args.device)),
                                            ("serve", served_one(session, server.url, payload, served_clock))):
                        got[name][0].append(lat)
                        got[name][1].append(sw)
                if args.clients:
                    lat, wall = run_concurrent(server.url, bodies, args.clients)
                    many += lat
                    many_wall += wall
            rows = [row(name, lat, None, sw) for name, (lat, sw) in got.items()]
            if many:
                rows.append(row(f"serve x{args.clients}", many, many_wall, None))
            report(stream, rows, identical)
    finally:
        server.close()
        service.close()
        generator.close()
        direct.close()


def report(stream: str, rows: list[dict], identical: bool) -> None:
    print(f"\nstream: {stream} stacks; served image == direct image: {identical}")
    print(f"{'path':<10} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'switch ms':>10} {'switch %':>9}")
    for r in rows:
        switch = f"{r['switch_ms']:10.2f} {100 * r['switch_share']:8.1f}%" if "switch_ms" in r else f"{'':>10} {'':>9}"
        print(f"{r['path']:<10} {r['requests']:>8} {r['req_s']:8.2f} {r['p50_ms']:9.1f} {r['p95_ms']:9.1f} {switch}")
    direct = rows[0]
    for r in rows[1:]:
        print(f"{r['path']} / direct: req/s x{r['req_s'] / direct['req_s']:.2f}, "
              f"p50 x{r['p50_ms'] / direct['p50_ms']:.2f}")


if __name__ == "__main__":
    main()
