"""Hostile files benchmark: ``adapterhub inspect`` of a "billion laughs" pickle and a torch zip bomb.

    python benchmarks/hostile.py                 # builds the files in a temp folder (the bomb: ~20 s)
    python benchmarks/hostile.py --keep DIR      # builds them in DIR once, reuses them after
    python benchmarks/hostile.py --quick         # a 256 MiB bomb instead of 3 GiB

Target (issue #16): inspect answers each in under 2 s with under 500 MB peak RSS.

Two figures per file, each from a fresh process:
  * ``cli``: ``python -m adapterhub inspect --no-hash FILE`` as a whole (wall seconds, peak RSS from
    ``wait4``), which includes starting Python and importing torch and the plugins;
  * ``work``: the same command run in-process after those imports, with the kernel's peak-RSS mark
    reset first (``/proc/self/clear_refs``): its seconds and its peak RSS growth are what the file
    itself costs (the target is checked on these; importing torch alone peaks near 650 MB here).
A tiny valid LoRA is measured the same way as the baseline for the imports.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

_WORK = r"""
import json, sys, time
import adapterhub.api, adapterhub.cli, adapterhub.plugins, torch
adapterhub.plugins.adapter_types()
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
imports_peak = status("VmHWM")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark to the current RSS
rss = status("VmRSS")
start = time.perf_counter()
rc = adapterhub.cli.main(["inspect", "--no-hash", sys.argv[1]])
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"rc": rc, "seconds": seconds, "rss_growth_mb": peak - rss, "peak_rss_mb": peak,
                  "imports_peak_mb": imports_peak}))
"""


def build_laughs(path: Path, levels: int = 40) -> Path:
    """A ~2 KB pickle whose dicts share references ``levels`` deep (2**levels paths to one tensor)."""
    node = {"w": torch.zeros(2)}
    for _ in range(levels):
        node = {"a": node, "b": node}
    torch.save(node, path)
    return path


def build_bomb(path: Path, inflated: int) -> Path:
    """A real zip bomb: a torch zip whose tensor claims 16 bytes and whose record deflates ``inflated``
    bytes of zeros (3 GiB become ~3 MB)."""
    plain = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, plain)
    src = zipfile.ZipFile(plain)
    chunk = bytes(64 << 20)
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(record, "w", force_zip64=True) as out:
                for start in range(0, inflated, len(chunk)):
                    out.write(chunk[: min(len(chunk), inflated - start)])
    return path


def build_valid(path: Path) -> Path:
    save_file({f"{KOHYA}.lora_down.weight": torch.zeros(4, 320), f"{KOHYA}.lora_up.weight": torch.zeros(320, 4),
               f"{KOHYA}.alpha": torch.tensor(4.0)}, str(path))
    return path


def measure_cli(path: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub", "inspect", "--no-hash", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().strip().splitlines()
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(seconds, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stderr": err[-1] if err else ""}


def measure_work(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _WORK, str(path)], capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="build the files here once and reuse them")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB bomb instead of 3 GiB")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="adapterhub-hostile-"))
    folder.mkdir(parents=True, exist_ok=True)
    inflated = (256 << 20) if args.quick else (3 << 30)
    files = {"valid": folder / "valid.safetensors", "laughs": folder / "laughs.pt",
             "bomb": folder / f"bomb_{inflated >> 20}MiB.pt"}
    for name, build in (("valid", build_valid), ("laughs", build_laughs),
                        ("bomb", lambda p: build_bomb(p, inflated))):
        if not files[name].exists():
            build(files[name])
    report = {}
    for name, path in files.items():
        report[name] = {"file_bytes": path.stat().st_size, "cli": measure_cli(path), "work": measure_work(path)}
        print(name, json.dumps(report[name]), flush=True)
    ok = all(report[n]["work"]["seconds"] < 2 and report[n]["work"]["rss_growth_mb"] < 500
             and report[n]["cli"]["rc"] == 2 for n in ("laughs", "bomb"))
    print("target (work under 2 s and 500 MB, one-line refusal):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
