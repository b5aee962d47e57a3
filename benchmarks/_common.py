"""What the benchmark scripts share: device timing, dtypes, random example LoRAs for a UNet."""
from __future__ import annotations

import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Wall seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def write_loras(unet, folder: Path, rank: int, count: int, prefix: str = "lora") -> list[Path]:
    """``count`` random kohya LoRAs of ``rank`` for every attention module of ``unet``."""
    from adapterhub.plugins import adapter_type

    return [adapter_type("lora").example({"unet": unet}, folder / f"{prefix}{rank}_{i}.safetensors", seed=i,
                                         rank=rank, text=False) for i in range(count)]
