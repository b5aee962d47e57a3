"""Sampling throughput: adapterhub's generator against diffusers' own pipeline, measured in one run.

The harness of ``adapterhub bench sample`` (which loads this file by path: :func:`adapterhub.cli.bench.harness`)
and of ``python benchmarks/sample.py``; it is not part of the installed package.

    from adapterhub.cli.bench import harness
    bench = harness("sample")
    report = bench.bench_sample(bench.BenchConfig(base="tiny-sd1", backends=("eager",), steps=8, size=256, repeat=4))
    print(bench.format_report(report))

The base is loaded once; every path runs on the same modules, one after the other:

* adapterhub, per backend (one :class:`Generator` each; ``compiled:fuse_qkv=0,channels_last=1`` names a backend
  with options, set as its ``ADAPTERHUB_COMPILE_*`` variables for that row only): the first request
  (``compile_s`` for the compiled backend is its time beyond a steady request), then ``repeat`` requests with
  no adapters (ms per step, images/s), the switch between the stacks none, ``A:0.8``, ``A:0.8, B:0.5``, ``B:1``
  (``apply_stack``: only the changed parameters are rewritten in place), and ``repeat`` requests with
  ``A:0.8, B:0.5`` applied;
* diffusers: ``StableDiffusion(XL)Pipeline.__call__`` with the same prompt embeddings, scheduler and
  per-image CPU generators (``output_type="latent"``, like ours: no VAE decode), ``repeat`` requests;
  with peft installed also the same two LoRAs through ``load_lora_weights`` / ``set_adapters``
  (the switch, and steps with both active, unfused); then the same two fused into the weights
  (``fuse_lora``, ``lora_fused``: steps, and its latents against the unfused ones: fusing rounds
  differently), unfused and unloaded afterwards, the base weights put back bit for bit;
* diffusers + ``torch.compile`` of the UNet (``compiled``: mode ``reduce-overhead`` on CUDA, the default
  mode on CPU, ``ADAPTERHUB_COMPILE_BACKEND`` / ``ADAPTERHUB_COMPILE_MODE`` as our compiled backend):
  ``compile_s`` (the first request beyond a steady one) apart from the per-step time;
* FLOPs of one UNet step (``torch.utils.flop_counter.FlopCounterMode`` over one UNet call with the
  request's batch and classifier-free guidance, i.e. ``2 * batch`` rows) and the device's measured peak
  (the best of a few square matmuls in the benchmark dtype, timed in the same run), giving achieved
  TFLOP/s and the share of peak for every path (the base UNet's useful work: an unfused LoRA's extra
  matmuls are not counted);
* memory, per adapterhub backend: the peak (CUDA ``max_memory_allocated`` since the phase began; on CPU
  the process' peak RSS) after each round of two requests alternating between ``size`` and
  ``size + 64`` px: bounded memory shows as a list that stops growing.

Ratios are diffusers' time over ours (above 1: adapterhub is faster). Each backend's latents for one
seed are compared with diffusers' (bitwise for eager in float32; the compiled backend's fused kernels
round differently, so its largest difference is reported). A timing is the wall time between two
device synchronisations. A and B are random UNet LoRAs written by the LoRA plugin's ``example``
(the UNet is what every step runs; the text encoders run once per request).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import AdapterhubError

STACKS = (None, "A:0.8", "A:0.8, B:0.5", "B:1")
BOTH = "A:0.8, B:0.5"
PEFT_STACKS = ((), (("A", 0.8),), (("A", 0.8), ("B", 0.5)), (("B", 1.0),))


@dataclass
class BenchConfig:
    base: str = "tiny-sd1"
    backends: tuple[str, ...] = ("eager",)
    steps: int = 8
    size: int | None = 256
    repeat: int = 4
    batch: int = 1
    sampler: str = "DPM++ 2M"
    device: str | None = None
    dtype: str | None = None
    prompt: str = "a castle on a hill, (masterpiece:1.2)"
    negative: str = "blurry"
    lora_reference: bool = True  # diffusers + peft LoRAs as the reference for switches and steps with adapters
    diffusers_fused: bool = True  # the same LoRAs fused into the weights (needs lora_reference)
    diffusers_compile: bool = True  # diffusers + torch.compile of the UNet (slow to compile on CPU)
    memory: bool = True  # peak memory over requests alternating between two sizes
    profile: int = 0  # top kernels (torch.profiler) of one request per adapterhub backend: this many rows
    second_process: bool = False  # time to the first image in a fresh process (compile caches warm), per backend


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def _request(cfg: BenchConfig, seed: int, stack=None, size: int | None = None):
    from adapterhub.sample.generator import Request

    return Request(cfg.prompt, negative=cfg.negative, stack=stack, seed=seed, steps=cfg.steps, sampler=cfg.sampler,
                   width=size or cfg.size, height=size or cfg.size, batch=cfg.batch)


def check_config(cfg: BenchConfig) -> None:
    """Everything that needs no model (one-line AdapterhubError)."""
    from adapterhub.sample.backend import backend
    from adapterhub.sample.generator import DTYPES, check_request
    from adapterhub.sample import samplers

    for name in ("steps", "repeat", "batch"):
        if int(getattr(cfg, name)) < 1:
            raise AdapterhubError(f"--{name} {getattr(cfg, name)}: must be 1 or more")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise AdapterhubError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if not cfg.backends:
        raise AdapterhubError("no backend to measure")
    for name in cfg.backends:
        backend(backend_spec(name)[0])
    check_request(_request(cfg, 0, size=cfg.size or 512))
    sampler, _ = samplers.resolve_sampler(cfg.sampler)
    if sampler.scheduler == samplers.KDIFFUSION:
        raise AdapterhubError(f"--sampler {cfg.sampler!r}: diffusers' pipeline has no such scheduler to compare "
                              "with; choose a sampler diffusers runs (DPM++ 2M, Euler a, ...)")


def backend_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``compiled:fuse_qkv=0,channels_last=1`` -> ``("compiled", {"ADAPTERHUB_COMPILE_FUSE_QKV": "0", ...})``: a
    backend with options, given to it as its environment variables while it is prepared (one row each, so
    the gain of every option is measured in the same run)."""
    name, _, options = spec.partition(":")
    env = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise AdapterhubError(f"--backend {spec!r}: options are KEY=VALUE separated by commas")
        prefix = "ADAPTERHUB_COMPILE_" if name.strip() == "compiled" else f"ADAPTERHUB_{name.strip().upper()}_"
        env[prefix + key.strip().upper().replace("-", "_")] = value.strip()
    return name.strip(), env


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _per_step(cfg: BenchConfig, seconds: float) -> dict[str, float]:
    return {"ms_per_step": 1000 * seconds / (cfg.repeat * cfg.steps),
            "images_per_s": cfg.repeat * cfg.batch / seconds}


def _ours(cfg: BenchConfig, pipe, name: str, folder: Path, size: int, note) -> tuple[dict, torch.Tensor]:
    from adapterhub.sample.generator import Generator

    backend, env = backend_spec(name)
    with _environment(env):
        gen = Generator(pipe, backend=backend, adapter_dirs=[folder], hash_model=False)
    device = gen.device
    try:
        note(f"{name}: first request")
        first, result = _timed(lambda: gen.generate(_request(cfg, 0, size=size), output="latent"), device)
        latents = result.latents
        note(f"{name}: {cfg.repeat} requests")
        plain, _ = _timed(lambda: [gen.generate(_request(cfg, i, size=size), output="latent")
                                   for i in range(1, cfg.repeat + 1)], device)
        for spec in STACKS:  # read the files once; the timed cycles switch loaded adapters
            gen.apply_stack(_request(cfg, 0, spec, size))
        note(f"{name}: stack switches")
        switches = []
        for _ in range(cfg.repeat):
            for spec in STACKS:
                seconds, _ = _timed(lambda spec=spec: gen.apply_stack(_request(cfg, 0, spec, size)), device)
                switches.append(seconds)
        gen.apply_stack(_request(cfg, 0, BOTH, size))
        note(f"{name}: {cfg.repeat} requests with {BOTH}")
        stacked, _ = _timed(lambda: [gen.generate(_request(cfg, i, BOTH, size), output="latent")
                                     for i in range(1, cfg.repeat + 1)], device)
        stats = gen.runner.stats()
        profile = _profile(cfg, device, lambda: gen.generate(_request(cfg, 1, BOTH, size), output="latent"), note,
                           name) if cfg.profile else None
        memory = _memory(cfg, name, device, lambda i, px: gen.generate(_request(cfg, i, size=px), output="latent"),
                         size, note) if cfg.memory else None
    finally:
        gen.close()
    steady = plain / cfg.repeat
    row = {"backend": name, "first_s": first, "compile_s": max(first - steady, 0.0) if backend != "eager" else None,
           **_per_step(cfg, plain), "switch_ms": 1000 * sum(switches) / len(switches),
           **{f"{k}_stack": v for k, v in _per_step(cfg, stacked).items()},
           "graphs": stats.get("frames_compiled"), "recompiles": stats.get("recompiles"), "memory": memory,
           "profile": profile}
    if cfg.second_process:
        row["second_process"] = _second_process(cfg, name, size, note)
    return row, latents


def _profile(cfg: BenchConfig, device, generate: Callable[[], Any], note, name: str) -> list[dict]:
    """The top kernels of one request (``torch.profiler``; on CUDA by self device time, else self CPU time):
    where the time goes, for the report of a missed goal."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    note(f"{name}: profiling one request")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        generate()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key, "calls": int(e.count), "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total}
            for e in events[:cfg.profile]]


_SECOND = """
import json, sys, time
start = time.perf_counter()
import torch
from adapterhub.sample.generator import Generator, Request
cfg = json.loads(sys.argv[1])
gen = Generator(cfg["base"], backend=cfg["backend"], device=cfg["device"], dtype=cfg["dtype"], hash_model=False)
ready = time.perf_counter()
gen.generate(Request(cfg["prompt"], seed=0, steps=cfg["steps"], sampler=cfg["sampler"], width=cfg["size"],
                     height=cfg["size"], batch=cfg["batch"]), output="latent")
if cfg["device"].startswith("cuda"):
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"load_s": ready - start, "first_image_s": done - start, "first_request_s": done - ready}))
"""


def _second_process(cfg: BenchConfig, name: str, size: int, note) -> dict:
    """A fresh Python process builds the same generator and makes one image: with the compile caches this run
    filled, the time to the first image (imports and model load included) is what a restarted server pays."""
    import json
    import subprocess
    import sys

    backend, env = backend_spec(name)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    payload = {"base": cfg.base, "backend": backend, "device": device, "dtype": cfg.dtype, "prompt": cfg.prompt,
               "steps": cfg.steps, "sampler": cfg.sampler, "size": size, "batch": cfg.batch}
    note(f"{name}: a second process, one request")
    done = subprocess.run([sys.executable, "-c", _SECOND, json.dumps(payload)], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory(cfg: BenchConfig, name: str, device, generate: Callable[[int, int], Any], size: int, note) -> dict:
    """Peak memory after each round of two requests, ``size`` then ``size + 64`` px."""
    sizes = (size, size + 64)
    rounds = max(2, cfg.repeat)
    note(f"{name}: {rounds} rounds alternating {sizes[0]} / {sizes[1]} px (memory)")
    cuda = str(device).startswith("cuda")
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    peaks = []
    for i in range(rounds):
        for px in sizes:
            generate(i, px)
        sync(device)
        peaks.append(_peak_mb(device))
    return {"sizes": list(sizes), "rounds": rounds, "peak_mb": peaks,
            "measure": "cuda max_memory_allocated" if cuda else "process peak RSS"}


def _diffusers(cfg: BenchConfig, pipe, size: int, note):
    """diffusers' pipeline call over the same modules, our embeddings and scheduler."""
    from adapterhub.sample.conditioning import PromptEncoder
    from adapterhub.sample.samplers import make_scheduler, resolve_sampler

    encoder = PromptEncoder(pipe)
    cond, uncond = encoder.encode(cfg.prompt), encoder.encode(cfg.negative)
    sampler, schedule = resolve_sampler(cfg.sampler)
    ref = type(pipe)(**{**pipe.components, "scheduler": make_scheduler(sampler, schedule, pipe.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    kw = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
    if encoder.is_xl:
        kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)

    def call(seed: int):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(cfg.batch)]
        return ref(**kw, num_inference_steps=cfg.steps, width=size, height=size, guidance_scale=7.0,
                   num_images_per_prompt=cfg.batch, output_type="latent", generator=generators).images

    device = pipe.unet.device
    note("diffusers: first request")
    first, latents = _timed(lambda: call(0), device)
    note(f"diffusers: {cfg.repeat} requests")
    plain, _ = _timed(lambda: [call(i) for i in range(1, cfg.repeat + 1)], device)
    flops = unet_flops(pipe.unet, *_unet_inputs(pipe, cfg, size, cond, uncond, encoder.is_xl))
    return ref, call, {"first_s": first, **_per_step(cfg, plain)}, latents, flops


def _unet_inputs(pipe, cfg: BenchConfig, size: int, cond, uncond, is_xl: bool) -> tuple:
    """One UNet call's arguments: ``2 * batch`` rows (negative and positive prompt), noise of the request's size."""
    unet, rows = pipe.unet, 2 * cfg.batch
    side = size // pipe.vae_scale_factor
    sample = torch.randn(rows, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    embeds = torch.cat([uncond.embeds.expand(cfg.batch, -1, -1), cond.embeds.expand(cfg.batch, -1, -1)])
    added = None
    if is_xl:
        pooled = torch.cat([uncond.pooled.expand(cfg.batch, -1), cond.pooled.expand(cfg.batch, -1)])
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=unet.device, dtype=embeds.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(rows, -1)}
    timestep = torch.tensor(500, device=unet.device)
    return sample, timestep, embeds.to(unet.device, unet.dtype), added


def unet_flops(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None) -> int:
    """FLOPs of one UNet call as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls, convs,
    attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
             return_dict=False)
    return int(counter.get_total_flops())


def matmul_peak(device, dtype, n: int | None = None, repeat: int | None = None) -> dict:
    """The device's measured peak: the best of ``repeat`` ``n x n`` matmuls in ``dtype`` (2 n^3 FLOPs each)."""
    cuda = str(device).startswith("cuda")
    n = n or (8192 if cuda else 1024)
    repeat = repeat or (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _timed(lambda: a @ b, device)  # warm-up (kernel selection, thread pool)
    best = min(_timed(lambda: a @ b, device)[0] for _ in range(repeat))
    return {"n": n, "repeat": repeat, "tflops": 2 * n**3 / best / 1e12}


def _lora_reference_unavailable() -> str | None:
    """Why diffusers + peft cannot load LoRAs here (peft missing, or a known-bad transformers/peft pair,
    which diffusers would report as a ValueError from deep inside transformers), else None."""
    from adapterhub.compat import conflicts

    if importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return next((c for c in conflicts() if "peft" in c), None)


def _diffusers_lora(cfg: BenchConfig, ref, call, folder: Path, note) -> dict:
    """The same LoRAs through diffusers + peft: ``set_adapters`` switches, steps with both active."""
    import warnings

    device = ref.unet.device
    note("diffusers: load_lora_weights")
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.simplefilter("ignore", UserWarning)
        load, _ = _timed(lambda: [ref.load_lora_weights(str(folder / f"{n}.safetensors"), adapter_name=n)
                                  for n in ("A", "B")], device)
    try:
        def switch(pairs) -> None:
            if not pairs:
                ref.disable_lora()
                return
            ref.enable_lora()
            ref.set_adapters([n for n, _ in pairs], adapter_weights=[w for _, w in pairs])

        for pairs in PEFT_STACKS:
            switch(pairs)
        switches = []
        for _ in range(cfg.repeat):
            for pairs in PEFT_STACKS:
                seconds, _ = _timed(lambda pairs=pairs: switch(pairs), device)
                switches.append(seconds)
        switch(PEFT_STACKS[2])
        note(f"diffusers: {cfg.repeat} requests with {BOTH} (peft, unfused)")
        stacked, results = _timed(lambda: [call(i) for i in range(1, cfg.repeat + 1)], device)
        lora = {"load_s": load, "switch_ms": 1000 * sum(switches) / len(switches),
                **{f"{k}_stack": v for k, v in _per_step(cfg, stacked).items()}}
        fused = _diffusers_fused(cfg, ref, call, results[0], note) if cfg.diffusers_fused else None
    finally:
        ref.unload_lora_weights()
    return lora, fused


def _diffusers_fused(cfg: BenchConfig, ref, call, unfused: torch.Tensor, note) -> dict:
    """``fuse_lora`` of the active ``A:0.8, B:0.5``, steps, then ``unfuse_lora`` and the base weights put back.

    Unfusing subtracts the product it added, which need not give back the same bits: the base weights
    are saved before and copied back after (``unfuse_exact`` says whether that was needed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    device = ref.unet.device
    saved = [(param, param.detach().clone()) for module in ref.unet.modules() if isinstance(module, BaseTunerLayer)
             for param in module.get_base_layer().parameters(recurse=False)]
    note("diffusers: fuse_lora")
    fuse, _ = _timed(lambda: ref.fuse_lora(components=["unet"], adapter_names=["A", "B"]), device)
    try:
        note(f"diffusers: {cfg.repeat} requests with {BOTH} (fused)")
        seconds, results = _timed(lambda: [call(i) for i in range(1, cfg.repeat + 1)], device)
    finally:
        ref.unfuse_lora(components=["unet"])
        exact = all(torch.equal(param, copy) for param, copy in saved)
        with torch.no_grad():
            for param, copy in saved:
                param.copy_(copy)
    fused = results[0]
    return {"fuse_s": fuse, **_per_step(cfg, seconds), "unfuse_exact": exact,
            "max_abs_diff": float((fused.float() - unfused.float()).abs().max()),
            "max_abs_unfused": float(unfused.float().abs().max()), "latents": fused}


def _diffusers_compiled(cfg: BenchConfig, ref, call, reference: torch.Tensor, note) -> dict:
    """``torch.compile`` of the UNet inside diffusers' pipeline; ``compile_s`` apart from the steps."""
    device = ref.unet.device
    mode = os.environ.get("ADAPTERHUB_COMPILE_MODE") or ("reduce-overhead" if str(device).startswith("cuda") else None)
    backend = os.environ.get("ADAPTERHUB_COMPILE_BACKEND") or "inductor"
    unet = ref.unet
    ref.unet = torch.compile(unet, mode=mode, backend=backend)
    try:
        note(f"diffusers compiled ({backend}, {mode or 'default'}): first request")
        first, latents = _timed(lambda: call(0).clone(), device)
        note(f"diffusers compiled: {cfg.repeat} requests")
        plain, _ = _timed(lambda: [call(i) for i in range(1, cfg.repeat + 1)], device)
    finally:
        ref.unet = unet
    steady = plain / cfg.repeat
    return {"backend": backend, "mode": mode or "default", "first_s": first, "compile_s": max(first - steady, 0.0),
            **_per_step(cfg, plain), "max_abs_diff": float((latents.float() - reference.float()).abs().max())}


def _ratio(theirs: float | None, ours: float | None) -> float | None:
    return theirs / ours if theirs and ours else None


def bench_sample(cfg: BenchConfig, note: Callable[[str], None] | None = None) -> dict:
    """Measure (see the module docstring); returns plain data (seconds, ms, ratios)."""
    from adapterhub.base import load_base
    from adapterhub.plugins import adapter_type
    from adapterhub.sample.generator import DTYPES

    check_config(cfg)
    note = note or (lambda _text: None)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    note(f"loading {cfg.base}")
    load_s, pipe = _timed(lambda: load_base(cfg.base, dtype=dtype, device=device), device)
    pipe.set_progress_bar_config(disable=True)
    size = cfg.size or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    report: dict[str, Any] = {"config": {**asdict(cfg), "size": size, "device": device,
                                         "dtype": str(dtype).split(".")[-1]}, "load_s": load_s}
    note(f"peak: matmuls in {report['config']['dtype']}")
    peak = matmul_peak(device, dtype)
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-") as tmp:
        folder = Path(tmp)
        for name, seed in (("A", 1), ("B", 2)):
            adapter_type("lora").example(pipe, folder / f"{name}.safetensors", seed=seed, text=False)
        rows, latents = [], {}
        for name in cfg.backends:
            row, latents[name] = _ours(cfg, pipe, name, folder, size, note)
            rows.append(row)
        ref, call, theirs, reference, flops = _diffusers(cfg, pipe, size, note)
        if cfg.lora_reference:
            skipped = _lora_reference_unavailable()
            if skipped:
                theirs["lora"] = {"skipped": skipped}
                note(f"diffusers + peft LoRAs skipped: {skipped}")
            else:
                theirs["lora"], fused = _diffusers_lora(cfg, ref, call, folder, note)
                if fused is not None:
                    fused.pop("latents")
                    theirs["lora_fused"] = fused
        if cfg.diffusers_compile:
            theirs["compiled"] = _diffusers_compiled(cfg, ref, call, reference, note)
    lora = theirs.get("lora") or {}
    for row in rows:
        ours = latents[row["backend"]]
        row["latents_equal"] = bool(torch.equal(ours, reference))
        row["max_abs_diff"] = float((ours.float() - reference.float()).abs().max())
    report["adapterhub"], report["diffusers"] = rows, theirs
    report["flops"] = {"unet_step": flops, "unet_rows": 2 * cfg.batch, "peak_tflops": peak["tflops"],
                       "peak_matmul_n": peak["n"]}
    for row in [*rows, theirs, lora, theirs.get("lora_fused") or {}, theirs.get("compiled") or {}]:
        for suffix in ("", "_stack"):
            if row.get(f"ms_per_step{suffix}"):
                achieved = flops / (row[f"ms_per_step{suffix}"] / 1000) / 1e12
                row[f"tflops{suffix}"], row[f"share_of_peak{suffix}"] = achieved, achieved / peak["tflops"]
    report["ratios"] = [{"backend": r["backend"], "step": _ratio(theirs["ms_per_step"], r["ms_per_step"]),
                         "images_per_s": _ratio(r["images_per_s"], theirs["images_per_s"]),
                         "step_with_stack": _ratio(lora.get("ms_per_step_stack"), r["ms_per_step_stack"]),
                         "switch": _ratio(lora.get("switch_ms"), r["switch_ms"])} for r in rows]
    return report


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(share) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def rows(report: dict) -> list[dict[str, str]]:
    """One table row per measured path; the ``x`` columns are diffusers' time over ours; TFLOP/s and
    the share of the measured peak from the steps with no adapters (the fused row: with its fused stack)."""
    theirs, lora = report["diffusers"], report["diffusers"].get("lora") or {}
    out = []
    for row, ratio in zip(report["adapterhub"], report["ratios"]):
        out.append({"path": f"adapterhub {row['backend']}", "ms/step": _fmt(row["ms_per_step"]),
                    "images/s": _fmt(row["images_per_s"]), "ms/step +stack": _fmt(row["ms_per_step_stack"]),
                    "switch ms": _fmt(row["switch_ms"], 3), "compile s": _fmt(row["compile_s"]),
                    "TFLOP/s": _fmt(row.get("tflops"), 4), "peak": _pct(row.get("share_of_peak")),
                    "x step": _fmt(ratio["step"], suffix="x"), "x +stack": _fmt(ratio["step_with_stack"], suffix="x"),
                    "x switch": _fmt(ratio["switch"], suffix="x")})
    peft = " (peft)" if "switch_ms" in lora else ""
    out.append({"path": f"diffusers{peft}", "ms/step": _fmt(theirs["ms_per_step"]),
                "images/s": _fmt(theirs["images_per_s"]), "ms/step +stack": _fmt(lora.get("ms_per_step_stack")),
                "switch ms": _fmt(lora.get("switch_ms"), 3), "compile s": "-", "TFLOP/s": _fmt(theirs.get("tflops"), 4),
                "peak": _pct(theirs.get("share_of_peak")), "x step": "1x", "x +stack": "1x", "x switch": "1x"})
    if "lora_fused" in theirs:
        fused = theirs["lora_fused"]
        out.append({"path": "diffusers fused LoRA", "ms/step": "-", "images/s": _fmt(fused["images_per_s"]),
                    "ms/step +stack": _fmt(fused["ms_per_step"]), "switch ms": "-", "compile s": "-",
                    "TFLOP/s": _fmt(fused.get("tflops"), 4), "peak": _pct(fused.get("share_of_peak")),
                    "x step": "-",
                    "x +stack": _fmt(_ratio(lora.get("ms_per_step_stack"), fused["ms_per_step"]), suffix="x"),
                    "x switch": "-"})
    if "compiled" in theirs:
        comp = theirs["compiled"]
        out.append({"path": "diffusers compiled", "ms/step": _fmt(comp["ms_per_step"]),
                    "images/s": _fmt(comp["images_per_s"]), "ms/step +stack": "-", "switch ms": "-",
                    "compile s": _fmt(comp["compile_s"]), "TFLOP/s": _fmt(comp.get("tflops"), 4),
                    "peak": _pct(comp.get("share_of_peak")),
                    "x step": _fmt(_ratio(theirs["ms_per_step"], comp["ms_per_step"]), suffix="x"),
                    "x +stack": "-", "x switch": "-"})
    return out


COLUMNS = ["path", "ms/step", "images/s", "ms/step +stack", "switch ms", "compile s", "TFLOP/s", "peak", "x step",
           "x +stack", "x switch"]


def title(report: dict) -> str:
    c = report["config"]
    return (f"{c['base']} on {c['device']} {c['dtype']}, {c['size']}px, {c['steps']} steps, batch {c['batch']}, "
            f"{c['sampler']}, {c['repeat']} requests; stacks {' | '.join(s or 'none' for s in STACKS)}")


def format_report(report: dict) -> str:
    """Plain text: the title, a fixed-width table, the latents checks, FLOPs and peak, memory."""
    table = rows(report)
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in COLUMNS}
    lines = [title(report), "  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in table]
    for row in report["adapterhub"]:
        lines.append(f"{row['backend']} latents vs diffusers: bitwise equal {row['latents_equal']}, "
                     f"max |diff| {row['max_abs_diff']:.3g}")
    theirs = report["diffusers"]
    if "lora_fused" in theirs:
        fused = theirs["lora_fused"]
        lines.append(f"diffusers fused LoRA latents vs unfused: max |diff| {fused['max_abs_diff']:.3g} "
                     f"(of max |latent| {fused['max_abs_unfused']:.3g}); unfuse gave the weights back bitwise "
                     f"{fused['unfuse_exact']} (restored from a copy)")
    if "compiled" in theirs:
        comp = theirs["compiled"]
        lines.append(f"diffusers compiled ({comp['backend']}, {comp['mode']}) latents vs eager: "
                     f"max |diff| {comp['max_abs_diff']:.3g}")
    flops = report.get("flops")
    if flops:
        lines.append(f"UNet step: {flops['unet_step'] / 1e9:.4g} GFLOP ({flops['unet_rows']} rows, FlopCounterMode); "
                     f"peak {flops['peak_tflops']:.3g} TFLOP/s ({flops['peak_matmul_n']}^2 matmul, "
                     f"{report['config']['dtype']})")
    for row in report["adapterhub"]:
        second = row.get("second_process")
        if second:
            lines.append(f"{row['backend']} second process: " + (
                f"failed: {second['error']}" if "error" in second else
                f"first image after {second['first_image_s']:.2f} s (model load {second['load_s']:.2f} s, "
                f"request {second['first_request_s']:.2f} s)"))
        if row.get("recompiles") is not None:
            lines.append(f"{row['backend']} recompiles: {row['recompiles']}")
    for row in report["adapterhub"]:
        if row.get("profile"):
            lines.append(f"{row['backend']} top kernels of one request ({BOTH}):")
            lines += [f"  {p['share'] * 100:5.1f}%  {p['self_ms']:9.2f} ms  {p['calls']:6d}x  {p['name'][:90]}"
                      for p in row["profile"]]
    for row in report["adapterhub"]:
        mem = row.get("memory")
        if mem:
            peaks = ", ".join(f"{mb:.0f}" for mb in mem["peak_mb"])
            lines.append(f"{row['backend']} memory, alternating {mem['sizes'][0]} / {mem['sizes'][1]} px: "
                         f"peak MB after each round {peaks} ({mem['measure']})")
    return "\n".join(lines)
