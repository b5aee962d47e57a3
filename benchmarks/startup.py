"""Start-up cost of CLI commands, paired against a bare interpreter in the same run.

    python benchmarks/startup.py [--repeat 7]

Each round runs, in alternating order, a bare ``python -c "import sqlite3"`` (the floor any Python CLI with
a SQLite catalog pays) and each command in a fresh process; the report gives the median wall time of each
and its ratio to the floor measured in the same rounds, and whether the command imported torch.
"""
from __future__ import annotations

import argparse
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
    "adapterhub doctor": ["-m", "adapterhub", "doctor"],
}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cwd:
        times = {name: [] for name in COMMANDS}
        for round_ in range(args.repeat):
            order = list(COMMANDS) if round_ % 2 == 0 else list(reversed(COMMANDS))
            for name in order:
                times[name].append(run_once(COMMANDS[name], cwd))
        floor = statistics.median(times[next(iter(COMMANDS))])
        print(f"{'command':34} {'median s':>9} {'x floor':>8}  imports torch")
        for name, values in times.items():
            median = statistics.median(values)
            torch_flag = imports_torch(COMMANDS[name], cwd)
            print(f"{name:34} {median:9.3f} {median / floor:8.1f}  {'' if torch_flag is None else torch_flag}")


if __name__ == "__main__":
    main()
