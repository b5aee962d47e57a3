"""Training throughput of the one loop: per adapter type, or LoRA against a plain diffusers + PEFT loop.

    python benchmarks/train.py                                   # CPU: tiny-sd1, 64 px, 20 steps per type
    python benchmarks/train.py --base sd1 --resolution 512 --batch-size 4 --steps 50 --device cuda \\
        --mixed-precision bf16 --types lora,loha

For each type it trains on the demo dataset (copied to a temporary kohya folder) and reports: setup
seconds (base load, PEFT/processor injection, latent caching, text cache), steady-state steps/s and
images/s (the first two steps, which include allocator warm-up, are left out), the final loss, and
the peak CUDA memory. A second run of the first type shows the cost of setup with the latent cache
already filled. ``--json`` prints the rows as JSON.

``compare``: adapterhub LoRA training against the recipe of diffusers' ``train_text_to_image_lora.py``
written out here (UNet ``add_adapter(LoraConfig(r, lora_alpha=r, target_modules=[to_k, to_q, to_v,
to_out.0]))``, AdamW, frozen weights cast to the mixed-precision dtype and LoRA weights kept in fp32, the
VAE and the text encoder run every step, DDPM noise, MSE), on the same images (the demo set cropped to
squares) and the same model::

    python benchmarks/train.py compare --size tiny --resolution 64 --batch 1 4 --steps 30 --device cpu
    python benchmarks/train.py compare --size sd1 --resolution 512 --batch 1 4 --steps 50 --device cuda

``--size sd1`` is an SD1-sized model with random weights built from the ``sd1`` preset (no download).
The plain loop runs twice: encoding every batch with the VAE (the example's way) and with the latents
encoded once beforehand (``--no-plain-cached`` / ``--no-plain-uncached`` skip one); adapterhub always
caches latents and, with the text encoder frozen, the text conditioning (in its setup, not its steps).
Each run is its own process, so the peak memory is that run's: ``torch.cuda.max_memory_allocated`` on
CUDA, the peak resident set size on CPU. It prints steps/s, images/s, peak memory, trainable LoRA
parameters and the ratio adapterhub / plain per batch size; on CUDA also the share of the device's peak
(a LoRA step is about 1.6 TFLOP per SD1 image at 512², scaled by pixel count; ``--peak-tflops``, default
989, the H100 SXM dense bf16 figure). adapterhub's LoRA targets every Linear / 1x1 layer of the
attention blocks (kohya's set: also ``proj_in``, ``proj_out`` and the feed-forward layers);
``--plain-targets kohya`` gives the plain loop the same set for a like-for-like comparison.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import DTYPES, sync  # benchmarks/ is on sys.path

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


# --------------------------------------------------------------------------------------------
# compare: adapterhub LoRA vs a plain diffusers + PEFT loop
# --------------------------------------------------------------------------------------------
BASES = {"tiny": "tiny-sd1", "sd1": "sd1"}
PLAIN_TARGETS = {"attention": ["to_k", "to_q", "to_v", "to_out.0"],  # train_text_to_image_lora.py
                 "kohya": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]}
SD1_LORA_TFLOP_512 = 1.6  # per image and LoRA step (2 x the 0.803 TFLOP forward, shared/reference/training.md §3.2)
ROW = "ROW "


def square_dataset(folder: Path, resolution: int) -> Path:
    """The demo images center-cropped and resized to ``resolution``² PNGs (one bucket for both loops)."""
    from PIL import Image

    sub = folder / "1_demo subject"
    sub.mkdir(parents=True)
    for image in sorted((DEMO / "10_demo subject").glob("*.jpg")):
        with Image.open(image) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC) \
                .save(sub / f"{image.stem}.png")
        shutil.copy(image.with_suffix(".txt"), sub / f"{image.stem}.txt")
    return folder


def _steady(marks: list[float], warmup: int) -> tuple[int, float]:
    """(steps, seconds) after the warm-up steps; ``marks`` = [loop start, end of step 1, ...]."""
    skip = min(warmup, len(marks) - 2)
    steady = marks[skip:]
    return len(steady) - 1, steady[-1] - steady[0]


def _peak_memory_gib(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def adapterhub_run(spec: dict) -> dict:
    from adapterhub.train import TrainConfig, train

    marks: list[float] = []
    info: dict = {}
    started = time.perf_counter()

    def on_event(event, **data):
        if event in ("start", "step"):
            sync(spec["device"])
            marks.append(time.perf_counter())
        if event == "start":
            info["setup_s"] = marks[-1] - started
            info["trainable"] = sum(data["trainable"].values())

    cfg = TrainConfig(type="lora", base=BASES[spec["size"]], dataset=Path(spec["data"]), out=Path(spec["out"]),
                      max_steps=spec["steps"], batch_size=spec["batch"], resolution=spec["resolution"],
                      bucket_step=min(64, spec["resolution"]), rank=spec["rank"], alpha=spec["rank"], lr=1e-4,
                      seed=0, device=spec["device"], mixed_precision=spec["mixed_precision"],
                      cache_dir=Path(spec["cache"]))
    result = train(cfg, on_event=on_event)
    return {**info, "marks": marks, "last_loss": result["last_loss"]}


def _load_images(data: Path):
    import numpy as np
    import torch
    from PIL import Image

    pixels, captions = [], []
    for image in sorted(data.rglob("*.png")):
        with Image.open(image) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(image.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return torch.stack(pixels), captions


def plain_run(spec: dict) -> dict:
    """The diffusers ``train_text_to_image_lora.py`` recipe, written out (no accelerate, one device)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from adapterhub.base import load_base

    started = time.perf_counter()
    device = torch.device(spec["device"])
    weight_dtype = DTYPES[spec["mixed_precision"] if spec["mixed_precision"] != "no" else "fp32"]
    pipe = load_base(BASES[spec["size"]], device=str(device))
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).to(dtype=weight_dtype)  # the example's weight_dtype cast
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian",
                                target_modules=PLAIN_TARGETS[spec["targets"]]))
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels, captions = _load_images(Path(spec["data"]))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    cached = None
    if spec["cached"]:
        with torch.no_grad():
            dists = [vae.encode(pixels[i:i + 1].to(device, weight_dtype)).latent_dist for i in range(len(pixels))]
        cached = (torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pixels), generator=gen).tolist()
    unet.train()
    sync(spec["device"])
    marks, losses = [time.perf_counter()], []
    for step in range(spec["steps"]):
        batch = [order[(step * spec["batch"] + j) % len(order)] for j in range(spec["batch"])]
        with torch.no_grad():
            if cached is not None:
                mean, std = cached[0][batch], cached[1][batch]
                latents = mean + std * torch.randn(mean.shape, generator=gen).to(mean)
            else:
                latents = vae.encode(pixels[batch].to(device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            hidden = text_encoder(ids[batch].to(device), return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, as the adapterhub loop's loss log does
        marks.append(time.perf_counter())
    tail = losses[-max(1, len(losses) // 10):]  # as adapterhub's result["last_loss"]
    return {"setup_s": marks[0] - started, "trainable": sum(p.numel() for p in params), "marks": marks,
            "last_loss": sum(tail) / len(tail) if tail else None}


def compare_worker(spec: dict) -> None:
    """One measured run in this process; prints one ``ROW {json}`` line."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    # the libraries' own imports are not setup time, for either loop (diffusers imports lazily)
    import accelerate  # noqa: F401
    import diffusers
    import peft  # noqa: F401

    import adapterhub.train.loop  # noqa: F401

    for name in ("AutoencoderKL", "DDPMScheduler", "StableDiffusionPipeline", "UNet2DConditionModel"):
        getattr(diffusers, name)

    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = adapterhub_run(spec) if spec["impl"] == "adapterhub" else plain_run(spec)
    steps, seconds = _steady(run.pop("marks"), spec["warmup"])
    row = {"impl": spec["label"], "batch": spec["batch"], "setup_s": round(run["setup_s"], 2),
           "steps_per_s": round(steps / seconds, 3) if steps > 0 and seconds > 0 else None,
           "images_per_s": round(steps * spec["batch"] / seconds, 2) if steps > 0 and seconds > 0 else None,
           "peak_gib": round(_peak_memory_gib(spec["device"]), 2), "trainable": run["trainable"],
           "last_loss": None if run["last_loss"] is None else round(run["last_loss"], 4)}
    if spec["device"].startswith("cuda") and spec["size"] == "sd1" and row["images_per_s"]:
        tflop = SD1_LORA_TFLOP_512 * (spec["resolution"] / 512) ** 2
        row["peak_share_pct"] = round(100 * row["images_per_s"] * tflop / spec["peak_tflops"], 1)
    print(ROW + json.dumps(row), flush=True)


def _spawn(spec: dict) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "compare", "--worker", json.dumps(spec)],
                          check=False, capture_output=True, text=True)
    rows = [line[len(ROW):] for line in proc.stdout.splitlines() if line.startswith(ROW)]
    if proc.returncode or not rows:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{spec['label']} (batch {spec['batch']}) failed:\n{tail}")
    return json.loads(rows[-1])


def _ratios(rows: list[dict]) -> list[dict]:
    """adapterhub / plain images/s and peak memory, per batch and plain variant (> 1: adapterhub faster / larger)."""
    out = []
    for ours in (r for r in rows if r["impl"] == "adapterhub"):
        for plain in (r for r in rows if r["impl"] != "adapterhub" and r["batch"] == ours["batch"]):
            speed = (ours["images_per_s"] / plain["images_per_s"]) if ours["images_per_s"] and plain["images_per_s"] \
                else None
            out.append({"batch": ours["batch"], "vs": plain["impl"], "speed_ratio": None if speed is None
                        else round(speed, 2), "memory_ratio": round(ours["peak_gib"] / plain["peak_gib"], 2)})
    return out


def compare_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/train.py compare",
                                     description="adapterhub LoRA training vs a plain diffusers + PEFT loop")
    parser.add_argument("--size", default="tiny", choices=tuple(BASES))
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 for sd1, 64 for tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mixed-precision", default=None, choices=("no", "bf16"),
                        help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--plain-targets", default="attention", choices=tuple(PLAIN_TARGETS))
    parser.add_argument("--no-plain-cached", action="store_true", help="skip the plain loop with cached latents")
    parser.add_argument("--no-plain-uncached", action="store_true", help="skip the plain loop encoding every step")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM dense bf16: 989)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        compare_worker(json.loads(args.worker))
        return 0
    resolution = args.resolution or (512 if args.size == "sd1" else 64)
    precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    impls = [("adapterhub", "adapterhub", False)]
    if not args.no_plain_uncached:
        impls.append(("plain", "plain (VAE each step)", False))
    if not args.no_plain_cached:
        impls.append(("plain", "plain (cached latents)", True))
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-compare-") as tmp:
        tmp = Path(tmp)
        data = square_dataset(tmp / "data", resolution)
        for batch in args.batch:
            for impl, label, cached in impls:
                spec = {"impl": impl, "label": label, "cached": cached, "size": args.size, "resolution": resolution,
                        "batch": batch, "rank": args.rank, "steps": args.steps, "warmup": args.warmup,
                        "device": args.device, "mixed_precision": precision, "targets": args.plain_targets,
                        "peak_tflops": args.peak_tflops, "threads": args.threads, "data": str(data),
                        "out": str(tmp / f"ours-{batch}.safetensors"), "cache": str(tmp / "latents")}
                rows.append(_spawn(spec))
    ratios = _ratios(rows)
    if args.json:
        print(json.dumps({"size": args.size, "resolution": resolution, "device": args.device, "precision": precision,
                          "steps": args.steps, "rank": args.rank, "plain_targets": args.plain_targets,
                          "rows": rows, "ratios": ratios}, indent=2))
        return 0
    print(f"{args.size} ({BASES[args.size]}), {resolution} px, rank {args.rank}, {args.steps} steps "
          f"({min(args.warmup, max(args.steps - 1, 0))} warm-up left out), device {args.device}, precision {precision}, "
          f"plain targets {args.plain_targets}")
    _print_table(rows)
    print("adapterhub / plain (images/s: > 1 = adapterhub faster; peak memory: > 1 = adapterhub uses more)")
    _print_table(ratios)
    return 0


def _print_table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(f"{c:>{width[c]}}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, '')!s:>{width[c]}}" for c in cols))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
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
            print("  ".join(f"{r[c]!s:>24}" if c == "type" else f"{r[c]!s:>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
