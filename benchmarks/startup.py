"""Start-up cost of CLI commands, paired against a bare interpreter in the same run.

    python benchmarks/startup.py [--repeat 7]

Each round runs, in alternating order, a bare ``python -c "import sqlite3"`` (the floor any Python CLI with
a SQLite catalog pays), ``python -c "import torch"`` (what a command that needs torch pays on top) and each
command in a fresh process; the report gives the median wall time of each and its ratio to the floor
measured in the same rounds, and whether the command imported torch. ``inspect`` reads a small kohya LoRA
(two modules, float32 and float16) written into the temporary working folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "floor: python -c 'import sqlite3'": ["-c", "import sqlite3"],
    "adapterhub --help": ["-m", "adapterhub", "--help"],
    "adapterhub catalog list": ["-m", "adapterhub", "catalog", "list"],
    "adapterhub plugins": ["-m", "adapterhub", "plugins"],
    "adapterhub inspect lora.safetensors": ["-m", "adapterhub", "inspect", "lora.safetensors"],
    "adapterhub inspect --json": ["-m", "adapterhub", "inspect", "--json", "lora.safetensors"],
    "adapterhub doctor": ["-m", "adapterhub", "doctor"],
    "reference: python -c 'import torch'": ["-c", "import torch"],
}
LORA = "lora.safetensors"
TORCH_PROBE = ("import sys, runpy; sys.argv = {argv!r}; "
               "import atexit; atexit.register(lambda: sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))); "
               "runpy.run_module('adapterhub', run_name='__main__')")


def run_once(args: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imports_torch(args: list[str], cwd: str) -> bool | None:
    if args[:2] != ["-m", "adapterhub"]:
        return None
    code = TORCH_PROBE.format(argv=["adapterhub", *args[2:]])
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    return "TORCH=True" in done.stderr


def write_lora(path: str) -> None:
    """A kohya LoRA of two modules, written with numpy (this process stays free of torch too)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    unet, te = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    save_file({f"{unet}.lora_down.weight": rng.standard_normal((4, 768), dtype=np.float32),
               f"{unet}.lora_up.weight": rng.standard_normal((320, 4), dtype=np.float32),
               f"{unet}.alpha": np.array(2.0, dtype=np.float16),
               f"{te}.lora_down.weight": rng.standard_normal((4, 768)).astype(np.float16),
               f"{te}.lora_up.weight": rng.standard_normal((768, 4)).astype(np.float16),
               f"{te}.alpha": np.array(4.0, dtype=np.float32)}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cwd:
        write_lora(f"{cwd}/{LORA}")
        os.mkdir(f"{cwd}/empty")  # an empty catalog, so that ``catalog list`` lists rather than fails
        subprocess.run([sys.executable, "-m", "adapterhub", "catalog", "scan", "empty"], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = {name: [] for name in COMMANDS}
        for round_ in range(args.repeat):
            order = list(COMMANDS) if round_ % 2 == 0 else list(reversed(COMMANDS))
            for name in order:
                times[name].append(run_once(COMMANDS[name], cwd))
        floor = statistics.median(times[next(iter(COMMANDS))])
        print(f"{'command':38} {'median s':>9} {'x floor':>8}  imports torch")
        for name, values in times.items():
            median = statistics.median(values)
            torch_flag = imports_torch(COMMANDS[name], cwd)
            print(f"{name:38} {median:9.3f} {median / floor:8.1f}  {'' if torch_flag is None else torch_flag}")


if __name__ == "__main__":
    main()
